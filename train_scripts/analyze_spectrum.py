#!/usr/bin/env python
"""Frequency profiles of RGB and of the latents of several autoencoders on the same images (paper Fig. 2 and 4).

    accelerate launch train_scripts/analyze_spectrum.py \\
        --models flux=black-forest-labs/FLUX.1-dev:vae flux-se=./flux-se \\
        --dataset_name ILSVRC/imagenet-1k --num_samples 256 --resolution 256 --per_channel --output_dir spectrum

The profile is eq. 1: block-DCT amplitudes ``|D_uv / D_00|`` in zigzag order, averaged over blocks, channels and
samples (:func:`diffusability_hf.spectral.frequency_profile`); RGB is measured at the latents' spatial size
("RGB of the same spatial dimension", Fig. 2) and at full resolution. The scalar high-frequency share is the part of
the AC energy in the upper half of the zigzag order. Latents are posterior means in the AE's raw space
(``--normalize_latents``: as the diffusion model sees them). Clips (``--video_data_dir`` etc. or ``--num_frames``)
are analysed frame by frame; ``--per_frame`` also plots one profile per latent frame.

``spectrum.png`` shows eq. 1 beside each zigzag index's share of the AC energy (``E_k / sum_{j >= 1} E_j``, no
division by the near-zero DC of zero-mean latents), where an SE autoencoder's lower high-frequency energy shows at a
glance; ``spectrum.json`` records the profiles, the mean energies and these shares, ``spectrum.md`` the shares by
quarter of the zigzag order. Also ``spectrum_channels.png`` / ``spectrum_frames.png`` with ``--per_channel`` /
``--per_frame``. An ``--output_dir`` that holds these results is refused unless ``--overwrite_output_dir``.
"""

import argparse
import logging
import math
import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from diffusability_hf import autoencoders as ae
from diffusability_hf.data import evaluation_samples
from diffusability_hf.figures import plot_spectra, save_png
from diffusability_hf.hub import markdown_table
from diffusability_hf.losses import downsample
from diffusability_hf.spectral import (
    ac_energy_shares,
    energy_profile,
    frequency_profile,
    plot_frequency_profiles,
    share_of_high_frequencies,
)
from diffusability_hf.training_utils import (
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    report_written,
    run_script,
    use_all_cpu_cores,
)

logger = get_logger(__name__)

# What a finished run leaves in --output_dir (a second run into it needs --overwrite_output_dir)
RESULTS = ("spectrum.json", "spectrum.md", "spectrum.png", "spectrum_channels.png", "spectrum_frames.png")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        type=str,
        nargs="+",
        default=None,
        help="Autoencoders as [LABEL=]PATH[:SUBFOLDER] (local folder or Hub id). Default: the embedded AutoencoderKL.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of Hub models.")
    parser.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. 'fp16'.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where datasets and models are cached.")
    parser.add_argument("--dataset_name", type=str, default=None, help="HF image dataset.")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="HF dataset config.")
    parser.add_argument("--split", type=str, default=None, help="Split (default: validation; train for folders).")
    parser.add_argument("--data_dir", type=str, default=None, help="A local image folder.")
    parser.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image one).")
    parser.add_argument("--video_data_dir", type=str, default=None, help="A folder of videos or frame folders.")
    parser.add_argument("--video_dataset_name", type=str, default=None, help="HF dataset with a Video column.")
    parser.add_argument("--video_column", type=str, default=None, help="Video column (default: the first Video one).")
    parser.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="Frames per clip (clips are analysed when given; 17 for video data).",
    )
    parser.add_argument("--frame_stride", type=int, default=1, help="Take every n-th frame.")
    parser.add_argument("--num_samples", type=int, default=None, help="Images or clips (default 256; embedded 64).")
    parser.add_argument("--resolution", type=int, default=None, help="Centre-crop side (default 256; embedded: 64).")
    parser.add_argument("--batch_size", type=int, default=16, help="Images (or clips) per encoder call.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    parser.add_argument("--block_size", type=int, default=8, help="DCT block size B (profiles have B*B entries).")
    parser.add_argument("--hf_cutoff", type=float, default=0.5, help="Zigzag share where 'high frequencies' start.")
    parser.add_argument("--per_channel", action="store_true", help="Also one profile per latent channel.")
    parser.add_argument("--per_frame", action="store_true", help="Clips: also one profile per latent frame.")
    parser.add_argument(
        "--normalize_latents", action="store_true", help="Analyse latents normalised as the diffusion model sees them."
    )
    parser.add_argument(
        "--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="Autocast for the AEs."
    )
    parser.add_argument("--output_dir", type=str, default="spectrum", help="Where the plots and JSON go.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace the results of an earlier run in --output_dir (without it such a folder is refused).",
    )
    args = parser.parse_args(input_args)

    video_source = args.video_data_dir is not None or args.video_dataset_name is not None
    args.embedded = not video_source and args.dataset_name is None and args.data_dir is None
    if args.dataset_name is not None and args.data_dir is not None:
        parser.error("Give either --dataset_name or --data_dir, not both.")
    if video_source and (args.dataset_name or args.data_dir):
        parser.error("Analyse images and clips in separate runs: give an image source or a video source.")
    if args.models is None:
        args.models = [f"embedded={ae.EMBEDDED_AE}"]
    if video_source and args.num_frames is None:
        args.num_frames = 17
    if args.per_frame and args.num_frames is None:
        parser.error("--per_frame needs clips: give a video source or --num_frames.")
    if args.resolution is None:
        args.resolution = 64 if args.embedded else 256
    if args.num_samples is None:
        args.num_samples = 64 if args.embedded else 256
    for flag in ("resolution", "batch_size", "num_samples", "block_size", "frame_stride"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive.")
    if not 0 < args.hf_cutoff < 1:
        parser.error("--hf_cutoff must be in (0, 1).")
    labels = [ae.parse_model_spec(s)[0] for s in args.models]
    if len(set(labels)) != len(labels):
        parser.error(f"Two --models share a label ({labels}): name them as LABEL=PATH.")
    return args


def check_models(args):
    """Configs only: every AE must fit the resolution, frame count and block size. Returns ``[(label, path, sub,
    config)]``."""
    return ae.check_model_specs(
        args.models, args.resolution, args.num_frames, args.revision, args.cache_dir, args.block_size, "--block_size"
    )


class ProfileSums:
    """Sums of per-signal profiles and energies (weighted by signal count) that processes can add up."""

    def __init__(self):
        self.sums = {}

    def add(self, key, x, block_size):
        n = x.shape[0] * x.shape[1] * (x.shape[2] if x.ndim == 5 else 1)  # signals: samples x channels x frames
        p, e = frequency_profile(x, block_size).double() * n, energy_profile(x, block_size).double() * n
        old = self.sums.get(key)
        self.sums[key] = (p, e, n) if old is None else (old[0] + p, old[1] + e, old[2] + n)

    @staticmethod
    def merge(parts):
        total = ProfileSums()
        for part in parts:
            for key, (p, e, n) in part.sums.items():
                old = total.sums.get(key)
                total.sums[key] = (p, e, n) if old is None else (old[0] + p, old[1] + e, old[2] + n)
        return total

    def result(self, key, cutoff):
        p, e, n = self.sums[key]
        return {
            "profile": (p / n).tolist(),  # eq. 1
            "energy": (e / n).tolist(),  # mean E[D_uv ** 2] in zigzag order
            "ac_energy_shares": ac_energy_shares(e / n).tolist(),  # E_k / sum_{j >= 1} E_j (entry 0, the DC: 0)
            "hf_share": float(share_of_high_frequencies(e / n, cutoff)),
        }


def zigzag_quarters(num):
    """``[(start, stop)]``: the AC indices ``1 .. num - 1`` split at the quarters of the zigzag order."""
    edges = sorted({1, *(math.ceil(q * num / 4) for q in (1, 2, 3)), num})
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a >= 1]


@torch.no_grad()
def analyse(vae, loader, args, accelerator, sums, label, rgb_done):
    f = ae.spatial_compression(vae)
    skipped = 0
    for pixels, ok in tqdm(loader, disable=not accelerator.is_local_main_process, leave=False):
        skipped += int((~ok).sum())
        pixels = pixels[ok].to(accelerator.device)
        if len(pixels) == 0:
            continue
        with accelerator.autocast():
            z = ae.encode(vae, pixels).mode()
        z = (ae.normalize_latents(vae, z) if args.normalize_latents else z).float()  # (N, C, [T,] h, w)
        sums.add(label, z, args.block_size)
        if args.per_channel:
            for c in range(z.shape[1]):
                sums.add((label, "channel", c), z[:, c : c + 1], args.block_size)
        if args.per_frame and z.ndim == 5:
            for t in range(z.shape[2]):
                sums.add((label, "frame", t), z[:, :, t], args.block_size)
        if not rgb_done:
            sums.add(("RGB", f), downsample(pixels.float(), f, "area"), args.block_size)
            sums.add(("RGB", 1), pixels.float(), args.block_size)
    return skipped


def plot_groups(path, groups, per):
    """One subplot per AE, one line per channel or frame."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * len(groups), 3.8), dpi=120)
    axes = fig.subplots(1, len(groups), squeeze=False)
    for ax, (label, profiles) in zip(axes[0], groups.items()):
        plot_frequency_profiles(profiles, title=f"{label}: per {per}", ax=ax)
    fig.tight_layout()
    save_png(fig, path)


def main(args):
    use_all_cpu_cores()
    # Validate everything cheap before any weights or data load
    check_output_dir(args.output_dir, RESULTS, args.overwrite_output_dir)
    models = check_models(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    samples = evaluation_samples(
        args.resolution, args.num_samples, args.dataset_name, args.data_dir, args.image_column,
        args.dataset_config_name, args.split, args.cache_dir, args.video_data_dir, args.video_dataset_name,
        args.video_column, args.num_frames, args.frame_stride,
    )  # fmt: skip
    indices = list(range(accelerator.process_index, len(samples), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(samples, indices), batch_size=args.batch_size, num_workers=args.dataloader_num_workers
    )

    sums, info, skipped, done = ProfileSums(), {}, 0, set()
    for label, path, sub, config in models:
        logger.info(f"Encoding with {label} ({config['_class_name']})")
        vae = ae.load_pretrained(path, sub, args.revision, args.variant, args.cache_dir).to(accelerator.device)
        f = ae.spatial_compression(config)
        skipped = analyse(vae, loader, args, accelerator, sums, label, f in done)
        done.add(f)
        info[label] = {
            "model": path + (f":{sub}" if sub else ""),
            "class": config["_class_name"],
            "weights_fingerprint": ae.weights_fingerprint(vae),
            "compression": f,
        }
        del vae
    sums = ProfileSums.merge(gather_object([sums]))
    skipped = sum(gather_object([skipped]))
    if accelerator.is_main_process:
        written = write_outputs(args, samples, sums, info, sorted(done), skipped)
        for name in set(RESULTS) - set(written):  # --overwrite_output_dir: no stale plot of the earlier run stays
            if os.path.isfile(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
        report_written(args.output_dir, written)
    accelerator.end_training()


def write_outputs(args, samples, sums, info, compressions, skipped):
    """spectrum.json, spectrum.md and the plots, each written atomically; returns the names written."""
    cut = args.hf_cutoff
    result = {
        "samples": samples.description,
        "resolution": args.resolution,
        "num_frames": args.num_frames,
        "skipped": skipped,
        "block_size": args.block_size,
        "hf_cutoff": cut,
        "latents": "normalised" if args.normalize_latents else "raw posterior means",
        "rgb": {str(f): sums.result(("RGB", f), cut) for f in [1] + compressions},
        "models": {},
    }
    profiles, energies = {}, {}
    for f in compressions:  # RGB at each latent size ("RGB of the same spatial dimension", Fig. 2)
        profiles[f"RGB ({args.resolution // f} px)"] = result["rgb"][str(f)]["profile"]
        energies[f"RGB ({args.resolution // f} px)"] = result["rgb"][str(f)]["energy"]
    for label, meta in info.items():
        entry = {**meta, **sums.result(label, cut)}
        if args.per_channel:
            keys = sorted(k[2] for k in sums.sums if isinstance(k, tuple) and k[:2] == (label, "channel"))
            entry["channels"] = [sums.result((label, "channel", c), cut) for c in keys]
        if args.per_frame:
            keys = sorted(k[2] for k in sums.sums if isinstance(k, tuple) and k[:2] == (label, "frame"))
            entry["frames"] = [sums.result((label, "frame", t), cut) for t in keys]
        result["models"][label] = entry
        profiles[label], energies[label] = entry["profile"], entry["energy"]
    os.makedirs(args.output_dir, exist_ok=True)
    written = ["spectrum.json", "spectrum.md", "spectrum.png"]
    title = f"Latent vs RGB spectrum ({args.block_size}x{args.block_size} block DCT, {args.resolution} px samples)"
    save_png(
        plot_spectra(profiles, energies, title=title, hf_cutoff=cut), os.path.join(args.output_dir, "spectrum.png")
    )
    for kind, suffix in (("channels", "channel"), ("frames", "frame")):
        groups = {
            label: {f"{suffix} {i}": r["profile"] for i, r in enumerate(entry[kind])}
            for label, entry in result["models"].items()
            if entry.get(kind)
        }
        if groups:
            plot_groups(os.path.join(args.output_dir, f"spectrum_{kind}.png"), groups, suffix)
            written.append(f"spectrum_{kind}.png")
    atomic_write_json(os.path.join(args.output_dir, "spectrum.json"), result)

    # One row per signal: the high-frequency share, then the AC energy by quarter of the zigzag order
    quarters = zigzag_quarters(args.block_size**2)
    signals = [(f"RGB at {args.resolution // int(f)} px", "", r) for f, r in result["rgb"].items()]
    signals += [(label, e["class"], e) for label, e in result["models"].items()]
    rows = [
        [name, cls, f"{r['hf_share']:.4f}"] + [f"{sum(r['ac_energy_shares'][a:b]):.4f}" for a, b in quarters]
        for name, cls, r in signals
    ]
    header = ["signal", "autoencoder", f"high-frequency share (top {100 * (1 - cut):.0f}% zigzag)"]
    header += [f"AC share, zigzag {a}-{b - 1}" for a, b in quarters]
    table = markdown_table(rows, header)
    text = (
        f"# Spectrum\n\n{samples.description} at {args.resolution} px, {args.block_size}x{args.block_size} DCT. "
        "The AC shares are the parts of each signal's AC energy (all coefficients but the DC term) at those zigzag "
        "indices; spectrum.json has one per index (`ac_energy_shares`).\n\n"
    )
    atomic_write_text(os.path.join(args.output_dir, "spectrum.md"), text + table + "\n\n![spectrum](spectrum.png)\n")
    print(table)
    return written


if __name__ == "__main__":
    run_script(main, parse_args)
