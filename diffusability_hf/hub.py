"""Model cards and Hub uploads."""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional

MODEL_CARDS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards")
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


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


def markdown_table(rows, header) -> str:
    """A GitHub markdown table from a header and rows of cells."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def check_hub_access(hub_model_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Create (or reuse) the Hub repo before any training, so an offline or unauthorised push fails early.

    Returns the repo id. Raises ``RuntimeError`` saying what to do when the Hub cannot be reached.
    """
    from huggingface_hub import create_repo
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE:
        raise RuntimeError(
            "--push_to_hub was given but the Hugging Face Hub is disabled (HF_HUB_OFFLINE=1). Unset HF_HUB_OFFLINE "
            "and log in (`hf auth login`), or drop --push_to_hub and upload the output folder later with "
            "`hf upload REPO_ID OUTPUT_DIR`."
        )
    try:
        return create_repo(hub_model_id, exist_ok=True, token=token, private=private).repo_id
    except Exception as err:  # network, auth, or name errors all end the same way
        raise RuntimeError(
            f"Could not create or reach the Hub repo '{hub_model_id}': {err}. Check the network and your token "
            "(`hf auth login` or --hub_token), or drop --push_to_hub and upload the output folder later."
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
            ignore_patterns=["checkpoint-*", "checkpoint-*/**", "logs/**", "step_*", "epoch_*"],
        )
    except Exception as err:
        raise RuntimeError(
            f"Upload to '{repo_id}' failed ({err}); everything is still in {folder}. Retry with "
            f"`hf upload {repo_id} {folder}`."
        ) from err
    return str(getattr(info, "commit_url", info))
