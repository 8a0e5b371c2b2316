"""Model cards and Hub uploads.

- Rendering: ``model_cards/<name>.md`` templates with ``{{ placeholder }}`` fields (:func:`render_model_card`), the
  front matter (``base_model`` only for Hub repo ids, the license read from the base model's card).
- The SE fine-tuned autoencoder's card (:func:`se_autoencoder_card_fields`): built from the run's ``metrics.json``
  and settings; ``train_scripts/train_ae_se.py`` renders and writes it.
- The DiT pipeline's card (:func:`dit_pipeline_card_fields`): built from the latents' metadata, the transformer and
  the run's settings; ``train_scripts/train_dit_flow.py`` renders and writes it.
- Uploads: :func:`check_hub_access` before training, :func:`push_folder` after it.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, Optional

from .errors import UsageError

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


# ----------------------------------------------------------------------------------------------------------------
# The model card of an SE fine-tuned autoencoder (train_scripts/train_ae_se.py, template model_cards/se_autoencoder.md)


def hyperparameters_table(hyperparameters: Mapping[str, object]) -> str:
    """The card's table of a run's settings: one row per flag with a scalar value, sorted; ``None`` left out."""
    rows = [
        (f"`{k}`", f"`{v}`")
        for k, v in sorted(hyperparameters.items())
        if v is not None and not isinstance(v, (list, dict))
    ]
    return markdown_table(rows, ["flag", "value"])


def compatibility_text(cross_decoding: Optional[Mapping[str, Mapping[str, float]]]) -> str:
    """What "drop-in replacement" means for an SE fine-tuned AE: the API, not the latent space.

    ``cross_decoding``: ``{"image" or "video": {"base_encoder_base_decoder": PSNR, "base_encoder_new_decoder",
    "new_encoder_base_decoder", "new_encoder_new_decoder"}}`` in dB, or ``None`` (trained from random init)."""
    lines = [
        "It loads and runs wherever the base model does (same class and config layout), but its latent space is not "
        "the base's: **a diffusion model trained on the base's latents must be retrained** on this autoencoder's "
        "latents (extract them again)."
    ]
    if cross_decoding is None:
        lines.append("(Trained from random initialisation: there is no base to cross-decode with.)")
        return "\n".join(lines)
    rows = []
    for kind, c in cross_decoding.items():
        what = "" if kind == "image" else " (clips)"
        rows += [
            (f"base encoder -> base decoder{what}", f"{c['base_encoder_base_decoder']:.2f}"),
            (f"base encoder -> this decoder{what}", f"{c['base_encoder_new_decoder']:.2f}"),
            (f"this encoder -> base decoder{what}", f"{c['new_encoder_base_decoder']:.2f}"),
            (f"this encoder -> this decoder{what}", f"{c['new_encoder_new_decoder']:.2f}"),
        ]
    lines += [
        "",
        "Cross-decoding on the validation set (PSNR in dB, posterior mean): how far the latent space moved.",
        "",
        markdown_table(rows, ["latents -> decoder", "PSNR (dB)"]),
    ]
    return "\n".join(lines)


def normalization_table(normalization: Mapping[str, object], base: Mapping[str, object]) -> str:
    """The latent normalisation fields, ``base`` vs saved, and how well each normalises the training latents.

    ``normalization``: the record train_ae_se.py keeps under ``latent_normalization`` in ``metrics.json``
    (``saved``, ``reestimated``, ``form`` or ``reason``, ``num_samples``, ``kind``, the normalised stds)."""
    saved = normalization["saved"]

    def show(v):
        if isinstance(v, list):
            return "[" + ", ".join(f"{x:.4g}" for x in v[:4]) + (", ..." if len(v) > 4 else "") + "]"
        return f"{v:.6g}" if isinstance(v, float) else str(v)

    rows = [(f"`{k}`", show(base.get(k, "-")), show(saved.get(k, "-"))) for k in sorted(set(base) | set(saved))]
    rows.append(
        (
            "std of the normalised latents",
            f"{normalization['normalized_std_with_base_values']:.3f}",
            f"{normalization['normalized_std_with_saved_values']:.3f}",
        )
    )
    how = (
        f"re-estimated ({normalization['form']}) on posterior samples of {normalization['num_samples']} training "
        f"{normalization['kind']}"
        if normalization["reestimated"]
        else f"kept as the base's ({normalization['reason']})"
    )
    return f"Latent normalisation {how}:\n\n" + markdown_table(rows, ["field", "base", "saved"])


def dataset_description(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    video_dataset_name: Optional[str] = None,
    video_data_dir: Optional[str] = None,
    video: bool = False,
    images: bool = True,
) -> str:
    """The card's "Training data" line from the data flags (none given: the embedded photographs and pans).
    ``video``: a video AE (then the clips are named too); ``images``: it also trained on images."""
    embedded = dataset_name is None and train_data_dir is None
    text = "scikit-image sample photographs (embedded)" if embedded else (dataset_name or "local image folder")
    if not video:
        return text
    clips = (
        "camera pans over the embedded photographs and scikit-image's GIF"
        if video_dataset_name is None and video_data_dir is None
        else (video_dataset_name or "local video folder")
    )
    return f"{text if images else 'no images'}; clips: {clips}"


def usage_snippet(
    class_name: str,
    num_frames: Optional[int] = None,
    decode_timestep: float = 0.05,
    timestep_conditioning: bool = False,
) -> str:
    """The card's Python usage example for ``class_name``; ``num_frames`` for a video AE (``None``: images)."""
    video = num_frames is not None
    shape = f"1, 3, {num_frames}, 256, 256" if video else "1, 3, 256, 256"
    lines = ["import torch", f"from diffusers import {class_name}", ""]
    lines.append(f'vae = {class_name}.from_pretrained("path/or/repo-id")')
    if class_name == "AutoencoderKLAllegro":
        lines.append("vae.enable_tiling()  # diffusers implements only Allegro's tiled path")
    lines.append(f"x = torch.rand({shape}) * 2 - 1  # pixels in [-1, 1]" + ("; (B, C, T, H, W)" if video else ""))
    lines.append("z = vae.encode(x).latent_dist.mode()")
    if timestep_conditioning:
        lines.append(f"recon = vae.decode(z, temb=torch.tensor([{decode_timestep}])).sample")
    else:
        lines.append("recon = vae.decode(z).sample")
    return "\n".join(lines)


def se_autoencoder_card_fields(
    metrics: Mapping,
    hyperparameters: Mapping[str, object],
    *,
    class_name: str,
    se_weight: float,
    scale_factors: str,
    num_frames: int,
    decode_timestep: float,
    timestep_conditioning: bool,
    global_batch: str,
    trainable: int,
    total: int,
    dataset: str,
    base_id: Optional[str],
    license_fields: Mapping[str, object],
) -> dict:
    """The values of every placeholder of ``model_cards/se_autoencoder.md``.

    Args:
        metrics: what train_ae_se.py writes to ``metrics.json``: the image results at the top level, the clips'
            under ``"video"`` (``before``/``after`` PSNR and high-frequency share, ``num_validation_images`` or
            ``num_validation_videos``, ``validation``, ``cross_decoding_psnr`` for a pretrained base),
            ``base_model``, the two weights fingerprints, ``latent_normalization`` and ``train_steps``.
        hyperparameters: the run's settings for the table (see :func:`hyperparameters_table`).
        class_name: the diffusers class of the saved model.
        se_weight, scale_factors: alpha of eq. 2 and the SE factors as text (e.g. ``"2 4"``).
        num_frames, decode_timestep, timestep_conditioning: clip length and LTX decode settings (usage snippet).
        global_batch: what one optimizer step sees, in words.
        trainable, total: parameter counts.
        dataset: the training data, in words (:func:`dataset_description`).
        base_id: the base model's Hub repo id (``None`` for local or random-init bases): the card's ``base_model``.
        license_fields: from :func:`card_license`.
    """
    from . import __version__

    results = {"image": metrics} if "before" in metrics else {}
    if "video" in metrics:
        results["video"] = metrics["video"]
    rows, described, cross = [], [], {}
    for kind, entry in results.items():
        what = "" if kind == "image" else " (clips)"
        b, a = entry["before"], entry["after"]
        rows += [
            (f"PSNR{what} (dB)", f"{b['psnr']:.2f}", f"{a['psnr']:.2f}"),
            (f"latent high-frequency share{what}", f"{b['hf_share']:.4f}", f"{a['hf_share']:.4f}"),
        ]
        n = entry[f"num_validation_{kind}s"]
        items = f"{n} images" if kind == "image" else f"{n} clips of {num_frames} frames"
        described.append(f"{items} ({entry['validation'].get('source', 'fixed')})")
        if "cross_decoding_psnr" in entry:
            cross[kind] = entry["cross_decoding_psnr"]
    normalization = {k: v for k, v in metrics["latent_normalization"].items() if k != "base"}
    video_frames = num_frames if "video" in results else None
    media = "\n![Validation clips (top) and reconstructions (bottom)](reconstruction.gif)\n" if video_frames else ""
    return {
        "base_model": metrics["base_model"],
        "card_metadata": metadata_yaml(base_id, license_fields),
        "license_sentence": license_sentence(license_fields, base_id),
        "class_name": class_name,
        "se_weight": se_weight,
        "scale_factors": scale_factors,
        "steps": metrics["train_steps"],
        "global_batch": global_batch,
        "trainable": f"{trainable:,}",
        "total": f"{total:,}",
        "results_table": markdown_table(rows, ["metric", "before", "after"]),
        "validation_description": "; ".join(described),
        "compatibility": compatibility_text(cross or None),
        "normalization_table": normalization_table(normalization, metrics["latent_normalization"]["base"]),
        "base_fingerprint": metrics["base_weights_fingerprint"],
        "fingerprint": metrics["weights_fingerprint"],
        "hyperparameters_table": hyperparameters_table(hyperparameters),
        "version": __version__,
        "dataset": dataset,
        "usage": usage_snippet(class_name, video_frames, decode_timestep, timestep_conditioning),
        "media": media,
    }


# ----------------------------------------------------------------------------------------------------------------
# The card of a DiT flow-matching pipeline (train_scripts/train_dit_flow.py, template model_cards/dit_pipeline.md)


def dit_pipeline_card_fields(
    meta: Mapping,
    hyperparameters: Mapping[str, object],
    *,
    transformer,
    model: str,
    steps: int,
    seconds: float,
    final_loss: float,
    global_batch: str,
    num_inference_steps: int,
    guidance_scale: float,
    shift: float,
    base_id: Optional[str],
    license_fields: Mapping[str, object],
) -> dict:
    """The values of every placeholder of ``model_cards/dit_pipeline.md``.

    Args:
        meta: the latents' metadata (``ae``, ``ae_class``, ``ae_weights_fingerprint``, ``num_classes``,
            ``dataset``, ``id2label``, ``video``) with ``vae_weights_fingerprint``, the pipeline's VAE's.
        hyperparameters: the run's settings for the table (see :func:`hyperparameters_table`).
        transformer: the trained transformer (its class and parameter count).
        model: the DiT size (e.g. ``"DiT-S/2"``) or the config it was built from.
        steps, seconds, final_loss: optimizer steps, training time and the last logged loss (``nan`` when none).
        global_batch: what one optimizer step sees, in words.
        num_inference_steps, guidance_scale, shift: the sampling settings of the card's grid and usage example.
        base_id: the VAE's Hub repo id (``None`` for a local or the embedded one): the card's ``base_model``.
        license_fields: from :func:`card_license`.
    """
    from . import __version__

    return {
        "card_metadata": metadata_yaml(base_id, license_fields),
        "license_sentence": license_sentence(license_fields, base_id),
        "vae": meta["ae"],
        "vae_class": meta["ae_class"],
        "latents_ae_fingerprint": meta["ae_weights_fingerprint"],
        "vae_fingerprint": meta["vae_weights_fingerprint"],
        "model": model,
        "transformer_class": type(transformer).__name__,
        "num_parameters": f"{sum(p.numel() for p in transformer.parameters()) / 1e6:.1f}M",
        "steps": steps,
        "global_batch": global_batch,
        "minutes": f"{seconds / 60:.1f}",
        "final_loss": f"{final_loss:.4f}",
        "num_classes": meta["num_classes"],
        "dataset": meta["dataset"],
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "shift": shift,
        "first_label": meta["id2label"]["0"],
        # A video pipeline returns .frames (diffusers' video pipelines' convention), written out as a GIF
        "output_name": "frames" if meta.get("video") else "images",
        "output_type": ' output_type="pil",' if meta.get("video") else "",
        "export_import": "\nfrom diffusers.utils import export_to_gif" if meta.get("video") else "",
        "export_line": '\nexport_to_gif(frames[0], "sample.gif")' if meta.get("video") else "",
        "hyperparameters_table": hyperparameters_table(hyperparameters),
        "version": __version__,
    }


# ----------------------------------------------------------------------------------------------------------------
# The training scripts' Hub flags


HUB_TOKEN_REFUSAL = (
    "--hub_token is refused: a token on the command line shows in process lists, shell history and the "
    "launcher's error messages. Log in with `hf auth login` or set the HF_TOKEN environment variable."
)


def refuse_hub_token(parser, args) -> None:
    """``parser.error`` for a ``--hub_token`` on the command line (the value itself is never echoed)."""
    if getattr(args, "hub_token", None) is not None:
        parser.error(HUB_TOKEN_REFUSAL)


def hub_repo(args) -> Optional[str]:
    """With ``--push_to_hub``, the Hub repo the run will upload to, checked (login, access) before any training;
    ``--hub_model_id`` or the output folder's name. ``None`` without ``--push_to_hub``."""
    if not args.push_to_hub:
        return None
    return check_hub_access(
        args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), None, args.private
    )
