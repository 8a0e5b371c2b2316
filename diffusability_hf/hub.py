"""Model cards and Hub uploads."""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional

from diffusability_hf.training_utils import UsageError

MODEL_CARDS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards")
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


class HubError(UsageError, RuntimeError):
    """The Hub cannot be reached or refused the push: the message says what to do (printed as one line)."""


def render_template(text: str, fields: Mapping[str, object]) -> str:
    """Fill ``{{ name }}`` placeholders; a placeholder without a value is an error (no half-filled cards)."""
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(text)} - set(fields))
    if missing:
        raise KeyError(f"Model card template needs values for {missing}.")
    return _PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]), text)


def render_model_card(template: str, fields: Mapping[str, object], template_dir: Optional[str] = None) -> str:
    """Render ``model_cards/<template>.md`` with ``fields``."""
    path = os.path.join(template_dir or MODEL_CARDS_DIR, f"{template}.md")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Model card template {path} not found: run the scripts from a clone of the repository."
        )
    with open(path) as f:
        return render_template(f.read(), fields)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TOOLKIT_LICENSE = "apache-2.0"  # the toolkit's own weights (embedded AE, random inits)


def hub_repo_id(path: Optional[str]) -> Optional[str]:
    """``path`` when it names a Hub repo (``owner/name`` and no local folder of that name), else ``None``.

    Only real repo ids go into a card's ``base_model``: the Hub rejects a card whose ``base_model`` is not one.
    """
    if not path or os.path.exists(path) or not _HUB_ID.match(path):
        return None
    return path


def parse_front_matter(text: str) -> dict:
    """The YAML front matter of a model card (``{}`` when there is none)."""
    import yaml

    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    data = yaml.safe_load(text[3:end])
    return data if isinstance(data, dict) else {}


def read_card_metadata(path_or_id: str, cache_dir: Optional[str] = None, online: bool = False) -> dict:
    """Front matter of a model's ``README.md``: a local folder (or the folder above it, for a ``vae`` subfolder of a
    pipeline), else the Hugging Face cache, else (``online`` and not ``HF_HUB_OFFLINE``) the Hub. ``{}`` when none
    can be read."""
    candidates = []
    if os.path.isdir(path_or_id):
        candidates = [os.path.join(path_or_id, "README.md"), os.path.join(path_or_id, os.pardir, "README.md")]
    elif hub_repo_id(path_or_id):
        from huggingface_hub import hf_hub_download
        from huggingface_hub.constants import HF_HUB_OFFLINE

        try:
            candidates = [
                hf_hub_download(
                    path_or_id, "README.md", cache_dir=cache_dir, local_files_only=HF_HUB_OFFLINE or not online
                )
            ]
        except Exception:  # not cached offline, no network, gated repo: the license is then unknown
            candidates = []
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                meta = parse_front_matter(fh.read())
            if meta:
                return meta
    return {}


def card_license(
    given: Optional[str], base: Optional[str], cache_dir: Optional[str] = None, online: bool = False
) -> dict:
    """The license fields of a derived model's card: ``given`` (e.g. ``--license``), else the base model's
    (``license`` and, for ``other``, ``license_name`` / ``license_link``; see :func:`read_card_metadata`), else the
    toolkit's own when there is no pretrained base (``base=None``), else ``{}`` (unknown: the card then says to check
    the base model's)."""
    if given:
        return {"license": given}
    if base is None:
        return {"license": TOOLKIT_LICENSE}
    meta = read_card_metadata(base, cache_dir, online)
    return {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}


def metadata_yaml(base_model: Optional[str], license_fields: Mapping[str, object]) -> str:
    """``base_model`` (only a Hub repo id) and license lines of a card's front matter, YAML-quoted, each ending
    with a newline ("" when there is nothing to say)."""
    import yaml

    fields = {}
    if hub_repo_id(base_model):
        fields["base_model"] = base_model
    fields.update(license_fields)
    return yaml.safe_dump(fields, sort_keys=False, allow_unicode=True) if fields else ""


def license_sentence(license_fields: Mapping[str, object], base: Optional[str]) -> str:
    """One line for the card body: the license, or where to find it when unknown."""
    if license_fields.get("license"):
        name = license_fields.get("license_name") or license_fields["license"]
        return f"License: {name}" + (
            f" ({license_fields['license_link']})" if license_fields.get("license_link") else ""
        )
    return (
        f"License: that of the base model {base} (its model card could not be read here: check it, and add its "
        "license to this card's front matter)"
    )


def markdown_table(rows, header) -> str:
    """A GitHub markdown table from a header and rows of cells."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def check_hub_access(hub_model_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Create (or reuse) the Hub repo before any training, so an offline or unauthorised push fails early.

    Returns the repo id. Raises :class:`HubError` (a ``RuntimeError``) saying what to do when the Hub cannot be
    reached.
    """
    from huggingface_hub import create_repo
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise HubError(
            "--push_to_hub was given but the Hugging Face Hub is disabled (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE "
            "and log in (`hf auth login`), or drop --push_to_hub and upload the output folder later with "
            "`hf upload REPO_ID OUTPUT_DIR`."
        )
    try:
        return create_repo(hub_model_id, exist_ok=True, token=token, private=private).repo_id
    except Exception as err:  # network, auth, or name errors all end the same way
        raise HubError(
            f"Could not create or reach the Hub repo '{hub_model_id}': {err}. Check the network and your token "
            "(`hf auth login` or HF_TOKEN), or drop --push_to_hub and upload the output folder later."
        ) from err


def push_folder(repo_id: str, folder: str, token: Optional[str] = None, commit_message: str = "Upload model") -> str:
    """Upload ``folder`` (without training checkpoints and logs). On failure the local folder is kept and the
    error says how to retry."""
    from huggingface_hub import upload_folder

    try:
        info = upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            token=token,
            commit_message=commit_message,
            ignore_patterns=["checkpoint-*", "checkpoint-*/**", ".tmp-*", ".tmp-*/**", "logs/**", "step_*", "epoch_*"],
        )
    except Exception as err:
        raise HubError(
            f"Upload to '{repo_id}' failed ({err}); everything is still in {folder}. Retry with "
            f"`hf upload {repo_id} {folder}`."
        ) from err
    return str(getattr(info, "commit_url", info))
