"""The ``DiTFlowMatchPipeline`` of a training run: around the EMA weights, with its provenance, saved as a snapshot,
sampled as a seeded class grid (``train_scripts/train_dit_flow.py``).

Not part of ``pipeline_dit_flow.py``, which is copied into every saved pipeline and imports nothing of the toolkit.
"""

from __future__ import annotations

import copy as copy_module
import os
from typing import Mapping, Optional

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from ..files import atomic_save
from .pipeline_dit_flow import DiTFlowMatchPipeline


def pipeline_provenance(meta: Mapping, latents_dir: Optional[str] = None, step: Optional[int] = None) -> dict:
    """What the pipeline records (``model_index.json`` -> ``provenance``) about the latents it was trained on.

    Args:
        meta: the latents' metadata (``latents.read_latents_metadata``, or that of images encoded on the fly) with
            ``vae_weights_fingerprint``, the fingerprint of the pipeline's VAE.
        latents_dir: the latents folder; ``None`` for images encoded on the fly (``meta["dataset"]``).
        step: after how many optimizer steps (the snapshots' and the final save's); ``None`` records none.
    """
    provenance = {
        "latents_ae_weights_fingerprint": meta["ae_weights_fingerprint"],
        "vae_weights_fingerprint": meta["vae_weights_fingerprint"],
        "latents_ae": meta["ae"],
        "latents": os.path.abspath(latents_dir) if latents_dir else f"encoded on the fly: {meta['dataset']}",
        "fingerprint_function": "diffusability_hf.autoencoders.weights_fingerprint",
    }
    if step is not None:
        provenance["step"] = int(step)
    return provenance


def make_pipeline(
    transformer: torch.nn.Module,
    vae: torch.nn.Module,
    meta: Mapping,
    ema=None,
    shift: float = 1.0,
    latents_dir: Optional[str] = None,
    step: Optional[int] = None,
    copy: bool = True,
) -> DiTFlowMatchPipeline:
    """A ``DiTFlowMatchPipeline`` (``DiTFlowMatchVideoPipeline`` for video latents, ``meta["video"]``) around the EMA
    weights of ``transformer``.

    Args:
        transformer, vae: the trained transformer and the autoencoder that decodes its latents.
        meta: the latents' metadata (``id2label``, ``latents_mean``, ``latents_std``; see :func:`pipeline_provenance`).
        ema: an ``ema.EMA`` of the transformer's parameters, copied into the pipeline's; ``None`` keeps the weights.
        shift: the time shift (paper eq. 3) of the pipeline's ``FlowMatchEulerDiscreteScheduler``.
        latents_dir, step: recorded in the provenance (:func:`pipeline_provenance`).
        copy: wrap a deep copy (validation and snapshots, while training goes on); ``False`` changes ``transformer``
            in place (the final save).
    """
    model = copy_module.deepcopy(transformer) if copy else transformer
    if ema is not None:
        ema.copy_to(list(model.parameters()))
    model.eval()
    pipeline_class = DiTFlowMatchPipeline
    if meta.get("video"):  # (C, T', h, w) latents: frames out, decoded by the video AE
        from .pipeline_dit_flow import DiTFlowMatchVideoPipeline as pipeline_class
    return pipeline_class(
        transformer=model,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        id2label=meta["id2label"],
        latents_mean=meta["latents_mean"],
        latents_std=meta["latents_std"],
        provenance=pipeline_provenance(meta, latents_dir, step),
    )


def save_snapshot(pipeline: DiTFlowMatchPipeline, snapshots_dir: str, step: int) -> str:
    """Save ``pipeline`` (remote-code layout, as the final save) as ``snapshots_dir/step-{step}``; returns that path.

    Written into a temporary folder inside ``snapshots_dir`` and renamed into place (a snapshot of that step, a
    resumed run's, is renamed aside first), so that a killed save never leaves a half pipeline there. Main process
    only.
    """
    name = f"step-{step}"
    with atomic_save(snapshots_dir) as tmp:  # moves tmp/step-N into snapshots_dir when the save completed
        pipeline.save_pretrained(os.path.join(tmp, name))
    return os.path.join(snapshots_dir, name)


def class_sample_grid(
    pipeline: DiTFlowMatchPipeline,
    num_classes: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.5,
    shift: float = 1.0,
    seed: int = 0,
    per_class: int = 2,
    max_classes: int = 16,
) -> Image.Image:
    """A seeded grid of samples: one row of ``per_class`` samples for each of the first ``max_classes`` classes,
    labelled ``"<class>: <label>"`` (28 characters at most); of a video pipeline, the first, middle and last frame of
    each sample."""
    from ..figures import labelled_image_grid

    classes = list(range(min(num_classes, max_classes)))
    out = pipeline(
        [c for c in classes for _ in range(per_class)], num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, shift=shift,
        generator=torch.Generator(pipeline.device).manual_seed(seed), output_type="pt",
    )  # fmt: skip
    if hasattr(out, "frames"):  # clips (K * per_class, T, 3, H, W): first, middle and last frame of each, in a row
        frames = out.frames.cpu()
        t = frames.shape[1]
        shown = sorted({0, t // 2, t - 1})
        images = frames[:, shown].flatten(0, 1)  # (K * per_class * 3, 3, H, W)
        per_class *= len(shown)
    else:
        images = out.images
    images = images.cpu() * 2 - 1  # (K * per_class, 3, H, W) in [-1, 1]
    id2label = pipeline.config.id2label or {}
    row_labels = [f"{c}: {id2label.get(str(c), c)}"[:28] for c in classes]
    return labelled_image_grid(list(images.split(per_class)), row_labels)
