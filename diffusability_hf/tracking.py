"""Images, clips and spectra to the trackers of an accelerate run (TensorBoard, Weights & Biases).

Every ``log_*`` function takes ``accelerator.trackers`` and writes to the ones it knows (others are skipped).
Pixels are in ``[-1, 1]``: images ``(N, 3, H, W)``, clips ``(N, 3, T, H, W)``. The spectrum figures
(:func:`log_spectra`, :func:`log_frame_profiles`) go to TensorBoard only. :func:`log_reconstruction_metrics` logs a
fine-tuning run's validation (scalars, reconstructions, spectra) in one call.
"""

from __future__ import annotations

import io
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8_frames(clips: torch.Tensor) -> np.ndarray:
    """``(N, 3, T, H, W)`` in ``[-1, 1]`` -> ``(T, H, N*W, 3)`` uint8: the clips side by side."""
    x = clips.detach().float().clamp(-1, 1).add(1).mul(127.5).round().byte().cpu()
    return x.permute(2, 3, 0, 4, 1).flatten(2, 3).numpy()  # (T, H, N*W, 3)


def clips_to_gif(clips: torch.Tensor, recon: Optional[torch.Tensor] = None, fps: float = 8.0) -> bytes:
    """An animated GIF of ``clips`` (``(N, 3, T, H, W)``) side by side, with ``recon`` below them when given."""
    frames = to_uint8_frames(clips)
    if recon is not None:
        frames = np.concatenate([frames, to_uint8_frames(recon)], axis=1)  # (T, 2H, N*W, 3)
    images = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def log_images(
    trackers: Iterable, pixels: torch.Tensor, recon: torch.Tensor, step: int, tag: str = "validation/reconstruction"
) -> None:
    """Originals, then their reconstructions, as one image series: ``(2N, 3, H, W)``."""
    grid = torch.cat([pixels, recon]).clamp(-1, 1).add(1).div(2).cpu()  # (2N, 3, H, W) in [0, 1]
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, grid, step, dataformats="NCHW")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(img) for img in grid]}, step=step)


def log_clips(
    trackers: Iterable,
    clips: torch.Tensor,
    recon: torch.Tensor,
    step: int,
    tag: str = "validation/reconstruction_clips",
) -> bytes:
    """Originals above reconstructions, clips side by side, as one animated GIF per tracker; returns the GIF."""
    gif = clips_to_gif(clips, recon)
    for tracker in trackers:
        if tracker.name == "tensorboard":  # TensorBoard shows an image summary holding GIF bytes as an animation
            from tensorboard.compat.proto.summary_pb2 import Summary

            h, w = clips.shape[-2] * 2, clips.shape[-1] * clips.shape[0]
            image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif)
            tracker.writer._get_file_writer().add_summary(
                Summary(value=[Summary.Value(tag=tag, image=image)]), global_step=step
            )
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Video(io.BytesIO(gif), format="gif")}, step=step)
    return gif


def log_image_grid(trackers: Iterable, tag: str, grid: Image.Image, step: int) -> None:
    """One RGB image (e.g. a grid of samples, ``pipelines.training.class_sample_grid``) as a single image."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(grid)}, step=step)


def _tensorboards(trackers: Iterable) -> list:
    return [tracker for tracker in trackers if tracker.name == "tensorboard"]


def log_spectra(
    trackers: Iterable,
    tag: str,
    profiles: Mapping[str, Sequence[float]],
    energies: Mapping[str, Sequence[float]],
    step: int,
) -> None:
    """The two-panel spectrum figure of ``figures.plot_spectra`` (paper eq. 1 profiles and AC energy shares)."""
    from .figures import plot_spectra

    for tracker in _tensorboards(trackers):
        tracker.writer.add_figure(tag, plot_spectra(profiles, energies), step)


def log_frame_profiles(trackers: Iterable, tag: str, frame_profiles: Sequence[Sequence[float]], step: int) -> None:
    """One eq. 1 profile per latent frame of a video AE, in one figure."""
    from .spectral import plot_frequency_profiles

    for tracker in _tensorboards(trackers):
        frames = {f"latent frame {k}": profile for k, profile in enumerate(frame_profiles)}
        fig = plot_frequency_profiles(frames, title=f"Per-frame latent profiles (step {step})")
        tracker.writer.add_figure(tag, fig, step)


def log_reconstruction_metrics(accelerator, val: Mapping, results: Mapping, rgb: Mapping, step: int) -> None:
    """A fine-tuning run's validation to ``accelerator``'s trackers: per kind of ``val`` pixels ("image", "video"),
    the PSNR and latent HF share of ``results`` (``metrics.reconstruction.reconstruction_metrics``), the
    reconstructions, the spectrum beside RGB's (``rgb``: ``metrics.reconstruction.rgb_spectrum``) and, for clips,
    one profile per latent frame."""
    for kind, result in results.items():
        prefix = "" if kind == "image" else "video_"
        accelerator.log({f"val/{prefix}psnr": result["psnr"], f"val/{prefix}hf_share": result["hf_share"]}, step=step)
        if kind == "image":
            log_images(accelerator.trackers, val[kind], result["recon"], step)
        else:
            log_clips(accelerator.trackers, val[kind], result["recon"], step)
        labels = ("RGB at the latent size", f"latents (step {step})")
        profiles = dict(zip(labels, (rgb[kind]["profile"], result["profile"])))
        energies = dict(zip(labels, (rgb[kind]["energy"], result["energy"])))
        log_spectra(accelerator.trackers, f"validation/spectrum_{kind}", profiles, energies, step)
        if "frame_profiles" in result:  # one curve per latent frame
            log_frame_profiles(accelerator.trackers, "validation/spectrum_per_frame", result["frame_profiles"], step)
