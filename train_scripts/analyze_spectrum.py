#!/usr/bin/env python
"""Frequency profiles of RGB and of the latents of several autoencoders on the same images (paper Fig. 2 and 4).

    accelerate launch train_scripts/analyze_spectrum.py \\
        --models flux=black-forest-labs/FLUX.1-dev:vae flux-se=./flux-se \\
        --dataset_name ILSVRC/imagenet-1k --num_samples 256 --resolution 256 --per_channel --output_dir spectrum

The profile is eq. 1: block-DCT amplitudes ``|D_uv / D_00|`` in zigzag order, averaged over blocks, channels and
samples (:func:`diffusability_hf.spectral.frequency_profile`); RGB is measured at the latents' spatial size
("RGB of the same spatial dimension", Fig. 2) and at full resolution. The scalar high-frequency share is the part of
the AC energy in the upper half of the zigzag order. Clips (``--video_data_dir`` etc. or ``--num_frames``) are
analysed frame by frame; ``--per_frame`` also plots one profile per latent frame.

Which latents: posterior means in the AE's raw space by default; ``--sample_posterior`` analyses posterior samples
``z = mean + std * eps`` instead (what a diffusion model is trained on, paper App. B), sample ``i`` of the evaluation
set drawing its ``eps`` from its own CPU generator seeded ``seed * 1_000_003 + i`` (``--seed``; the same numbers
whatever the batch size, process count or device). A deterministic encoder has no std: its samples are its means.
``--normalize_latents`` (or ``--normalize_latents config``) applies the AE's own normalisation
(:func:`diffusability_hf.autoencoders.normalize_latents`); ``--normalize_latents per_channel`` standardises each
latent channel by the mean and std of the analysed latents themselves, measured over the whole analysed set as
``extract_latents.py`` measures the statistics the DiT normalises with (``E[z] = E[mean]``, ``Var(z) = Var(mean) +
E[std^2]`` for samples, ``Var(mean)`` for means): what this toolkit's DiT sees. It encodes the set twice (statistics
first). Normalisation matters because channels are pooled: the high-frequency share is invariant to one global
scale but not to one scale per channel. Every model's entry also records ``posterior_variance_ratio``, per channel
``E[std^2] / (Var(mean) + E[std^2])`` over the analysed samples and positions (the share of the channel's latent
variance that is posterior noise; 0 for deterministic encoders), in the space analysed (a per-channel scale leaves
it unchanged).

``spectrum.png`` shows eq. 1 beside each zigzag index's share of the AC energy (``E_k / sum_{j >= 1} E_j``, no
division by the near-zero DC of zero-mean latents), where an SE autoencoder's lower high-frequency energy shows at a
glance; ``spectrum.json`` records the profiles, the mean energies and these shares, ``spectrum.md`` the shares by
quarter of the zigzag order. Also ``spectrum_channels.png`` / ``spectrum_frames.png`` with ``--per_channel`` /
``--per_frame``. An ``--output_dir`` that holds these results is refused unless ``--overwrite_output_dir``.
"""

import argparse
import math
import os

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from diffusability_hf import autoencoders as ae
from diffusability_hf.errors import run_script
from diffusability_hf.figures import plot_spectra, save_png
from diffusability_hf.files import atomic_write_json, atomic_write_text, report_written
from diffusability_hf.hub import markdown_table
from diffusability_hf.losses import downsample
from diffusability_hf.metrics.features import process_share, start_evaluation
from diffusability_hf.spectral import (
    ac_energy_shares,
    energy_profile,
    frequency_profile,
    plot_frequency_profiles,
    share_of_high_frequencies,
)

logger = get_logger(__name__)

# What a finished run leaves in --output_dir (a second run into it needs --overwrite_output_dir)
RESULTS = ("spectrum.json", "spectrum.md", "spectrum.png", "spectrum_channels.png", "spectrum_frames.png")
NORMALIZATIONS = ("none", "config", "per_channel")
SEED_STRIDE = 1_000_003  # sample i of --seed s draws its posterior noise from a generator seeded s * SEED_STRIDE + i


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The --models flag and the data source flags of eval_ae.py
    # Copied from train_scripts/eval_ae.py
    parser.add_argument(
        "--models",
        type=str,
        nargs="+",
        default=None,
        help="Autoencoders as [LABEL=]PATH[:SUBFOLDER] (local folder or Hub id), e.g. "
        "'flux=black-forest-labs/FLUX.1-dev:vae flux-se=./flux-se'. Default: the toolkit's embedded AutoencoderKL.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of Hub models.")
    parser.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. 'fp16'.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where datasets and models are cached.")
    # Data
    parser.add_argument("--dataset_name", type=str, default=None, help="HF image dataset (e.g. ILSVRC/imagenet-1k).")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="HF dataset config.")
    parser.add_argument(
        "--split", type=str, default=None, help="Dataset split (default: validation; train for local folders)."
    )
    parser.add_argument("--data_dir", type=str, default=None, help="A local image folder (HF imagefolder layout).")
    parser.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image one).")
    parser.add_argument("--video_data_dir", type=str, default=None, help="A folder of videos or frame folders.")
    parser.add_argument("--video_dataset_name", type=str, default=None, help="HF dataset with a Video column.")
    # End copy
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
        "--normalize_latents",
        type=str,
        nargs="?",
        const="config",
        default="none",
        choices=NORMALIZATIONS,
        help="Normalise the latents before the DCT: 'config' (the flag alone) with the AE's own normalisation, as "
        "its diffusers pipelines do; 'per_channel' by each channel's mean and std over the analysed latents (as "
        "extract_latents.py measures them for this toolkit's DiT; encodes the set twice); 'none' (default): raw.",
    )
    parser.add_argument(
        "--sample_posterior",
        action="store_true",
        help="Analyse posterior samples z = mean + std * eps (what the diffusion model trains on) instead of the "
        "posterior means; deterministic encoders give their means.",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="--sample_posterior: sample i draws eps from a generator seeded seed * 1000003 + i (any batch size).",
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
    if args.seed < 0:
        parser.error("--seed must be non-negative.")
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


class ChannelMoments:
    """Per-channel float64 sums over samples, frames and positions of the posterior mean, its square and the
    posterior variance ``std ** 2`` (0 for deterministic encoders), that processes can add up."""

    def __init__(self):
        self.sums = {}

    def add(self, key, mean, var):
        dims = [0] + list(range(2, mean.ndim))
        part = torch.stack([mean.sum(dims), mean.square().sum(dims), var.sum(dims)]).double().cpu()  # (3, C)
        n = mean.numel() // mean.shape[1]
        old = self.sums.get(key)
        self.sums[key] = (part, n) if old is None else (old[0] + part, old[1] + n)

    @staticmethod
    def merge(parts):
        total = ChannelMoments()
        for part in parts:
            for key, (sums, n) in part.sums.items():
                old = total.sums.get(key)
                total.sums[key] = (sums, n) if old is None else (old[0] + sums, old[1] + n)
        return total

    def stats(self, key):
        """``(E[mean], Var(mean), E[std^2])`` per channel, float64 ``(C,)`` each (population moments)."""
        sums, n = self.sums[key]
        channel_mean, mean_sq, posterior_var = sums / n
        return channel_mean, (mean_sq - channel_mean.square()).clamp_min(0), posterior_var

    def standardization(self, key, samples):
        """Per-channel ``(mean, std)`` of the analysed latents, as extract_latents.py measures them: ``E[z] =
        E[mean]``, ``Var(z) = Var(mean) + E[std^2]`` for posterior samples, ``Var(mean)`` for means."""
        channel_mean, var_means, posterior_var = self.stats(key)
        var = var_means + posterior_var if samples else var_means
        return channel_mean, var.clamp_min(1e-12).sqrt()

    def variance_ratio(self, key):
        """``E[std^2] / (Var(mean) + E[std^2])`` per channel (0 for a channel without variance)."""
        _, var_means, posterior_var = self.stats(key)
        total = var_means + posterior_var
        return torch.where(total > 0, posterior_var / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)


def encoded_batches(vae, loader, indices, accelerator, counts):
    """``(pixels, mean, std, sample indices)`` per batch of readable samples (``std`` ``None`` for deterministic
    encoders; float32); ``counts["skipped"]`` counts the unreadable ones. ``indices``: the loader's samples' indices
    in the evaluation set, in loader order (it does not shuffle)."""
    start = 0
    for pixels, ok in tqdm(loader, disable=not accelerator.is_local_main_process, leave=False):
        batch = [i for i, good in zip(indices[start : start + len(ok)], ok.tolist()) if good]
        start += len(ok)
        counts["skipped"] += int((~ok).sum())
        pixels = pixels[ok].to(accelerator.device)
        if len(pixels) == 0:
            continue
        with accelerator.autocast():
            post = ae.encode(vae, pixels)
        yield pixels, post.mean.float(), None if post.std is None else post.std.float(), batch


def posterior_noise(shape, sample_indices, seed, device):
    """``eps`` of shape ``(len(sample_indices), *shape)``: sample ``i`` from a CPU generator seeded
    ``seed * SEED_STRIDE + i`` (the same numbers whatever the batch, process or device)."""
    noise = [
        torch.randn(shape, generator=torch.Generator().manual_seed(seed * SEED_STRIDE + i)) for i in sample_indices
    ]
    return torch.stack(noise).to(device)


def moment_space(vae, mean, std, args):
    """Posterior mean and variance (float64) in the space whose per-channel moments are recorded: the AE's
    normalised space with ``--normalize_latents config`` (its normalisation is affine per element, so the std
    scales by ``|normalize(1) - normalize(0)|``), else the raw one (a per-channel standardisation does not change
    the variance ratio)."""
    mean = mean.double()
    var = torch.zeros_like(mean) if std is None else std.double().square()
    if args.normalize_latents == "config":
        scale = ae.normalize_latents(vae, torch.ones_like(mean)) - ae.normalize_latents(vae, torch.zeros_like(mean))
        mean, var = ae.normalize_latents(vae, mean), var * scale.square()
    return mean, var


def analysed_latents(vae, mean, std, sample_indices, args, standardization=None):
    """The latents whose spectrum is measured: posterior samples (``--sample_posterior``, when the encoder has a
    std) or means, normalised as ``--normalize_latents`` says (``standardization``: per-channel ``(mean, std)``)."""
    z = mean
    if args.sample_posterior and std is not None:
        z = mean + std * posterior_noise(mean.shape[1:], sample_indices, args.seed, mean.device)
    if args.normalize_latents == "config":
        z = ae.normalize_latents(vae, z)
    elif args.normalize_latents == "per_channel":
        shape = (1, -1) + (1,) * (z.ndim - 2)
        m, s = (t.to(device=z.device, dtype=z.dtype).reshape(shape) for t in standardization)
        z = (z - m) / s
    return z.float()  # (N, C, [T,] h, w)


@torch.no_grad()
def measure_moments(vae, loader, indices, args, accelerator, label):
    """A first pass for ``--normalize_latents per_channel``: the per-channel moments over every process."""
    moments, counts = ChannelMoments(), {"skipped": 0}
    for _, mean, std, _ in encoded_batches(vae, loader, indices, accelerator, counts):
        moments.add(label, *moment_space(vae, mean, std, args))
    return ChannelMoments.merge(gather_object([moments]))


@torch.no_grad()
def analyse(vae, loader, indices, args, accelerator, sums, moments, label, rgb_done, standardization=None):
    """Adds the spectra of the analysed latents (and of RGB unless ``rgb_done``) to ``sums`` and their posterior
    moments to ``moments``; returns the number of unreadable samples."""
    f = ae.spatial_compression(vae)
    counts = {"skipped": 0}
    for pixels, mean, std, batch in encoded_batches(vae, loader, indices, accelerator, counts):
        moments.add(label, *moment_space(vae, mean, std, args))
        z = analysed_latents(vae, mean, std, batch, args, standardization)
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
    return counts["skipped"]


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
    # The output folder and every AE's config are checked before any weights or data load
    models, accelerator, samples = start_evaluation(args, RESULTS, check_models)
    indices, loader = process_share(samples, accelerator, args.batch_size, args.dataloader_num_workers)

    sums, moments, info, skipped, done = ProfileSums(), ChannelMoments(), {}, 0, set()
    for label, path, sub, config in models:
        logger.info(f"Encoding with {label} ({config['_class_name']})")
        vae = ae.load_pretrained(path, sub, args.revision, args.variant, args.cache_dir).to(accelerator.device)
        f = ae.spatial_compression(config)
        standardization = None
        if args.normalize_latents == "per_channel":
            logger.info(f"Measuring the per-channel statistics of {label}'s latents")
            first = measure_moments(vae, loader, indices, args, accelerator, label)
            standardization = first.standardization(label, args.sample_posterior)
        skipped = analyse(vae, loader, indices, args, accelerator, sums, moments, label, f in done, standardization)
        done.add(f)
        info[label] = {
            "model": path + (f":{sub}" if sub else ""),
            "class": config["_class_name"],
            "weights_fingerprint": ae.weights_fingerprint(vae),
            "compression": f,
            "standardization": standardization,
            "posterior_std": not ae.get_row(config).deterministic,  # deterministic encoders have none
        }
        del vae
    sums = ProfileSums.merge(gather_object([sums]))
    moments = ChannelMoments.merge(gather_object([moments]))
    skipped = sum(gather_object([skipped]))
    if accelerator.is_main_process:
        written = write_outputs(args, samples, sums, moments, info, sorted(done), skipped)
        for name in set(RESULTS) - set(written):  # --overwrite_output_dir: no stale plot of the earlier run stays
            if os.path.isfile(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
        report_written(args.output_dir, written)
    accelerator.wait_for_everyone()  # no process tears down the process group while another still works
    accelerator.end_training()


def latents_entry(args, meta, moments, label):
    """What spectrum.json records of a model's analysed latents: which ones, their normalisation and the posterior
    variance ratio per channel."""
    sampled = args.sample_posterior and meta["posterior_std"]
    entry = {"latents": "posterior samples" if sampled else "posterior means", "normalization": args.normalize_latents}
    if args.sample_posterior and not meta["posterior_std"]:
        entry["latents_note"] = "deterministic encoder: no posterior std, its posterior samples are its means"
    if meta["standardization"] is not None:
        channel_mean, channel_std = meta["standardization"]
        entry["normalization_mean"], entry["normalization_std"] = channel_mean.tolist(), channel_std.tolist()
    ratio = moments.variance_ratio(label)
    entry["posterior_variance_ratio"] = ratio.tolist()  # E[std^2] / (Var(mean) + E[std^2]) per channel
    entry["posterior_variance_ratio_mean"] = float(ratio.mean())
    return entry


def write_outputs(args, samples, sums, moments, info, compressions, skipped):
    """spectrum.json, spectrum.md and the plots, each written atomically; returns the names written."""
    cut = args.hf_cutoff
    result = {
        "samples": samples.description,
        "resolution": args.resolution,
        "num_frames": args.num_frames,
        "skipped": skipped,
        "block_size": args.block_size,
        "hf_cutoff": cut,
        "latents": "posterior samples" if args.sample_posterior else "posterior means",
        "normalization": args.normalize_latents,  # none, config (the AE's own) or per_channel (measured here)
        "seed": args.seed if args.sample_posterior else None,
        "rgb": {str(f): sums.result(("RGB", f), cut) for f in [1] + compressions},
        "models": {},
    }
    profiles, energies = {}, {}
    for f in compressions:  # RGB at each latent size ("RGB of the same spatial dimension", Fig. 2)
        profiles[f"RGB ({args.resolution // f} px)"] = result["rgb"][str(f)]["profile"]
        energies[f"RGB ({args.resolution // f} px)"] = result["rgb"][str(f)]["energy"]
    for label, meta in info.items():
        entry = {k: v for k, v in meta.items() if k != "standardization"}
        entry.update(latents_entry(args, meta, moments, label), **sums.result(label, cut))
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
    # The latents analysed, one row per model (its own table: the one above holds numbers after the class only)
    names = {"none": "none (raw)", "config": "the AE's own", "per_channel": "per channel (measured here)"}
    latent_rows = [
        [e["latents"], label, names[e["normalization"]], f"{e['posterior_variance_ratio_mean']:.4f}"]
        for label, e in result["models"].items()
    ]
    latent_header = ["latents", "model", "normalisation", "posterior variance ratio (mean over channels)"]
    latents_text = (
        "\n\nThe posterior variance ratio of a channel is `E[std^2] / (Var(mean) + E[std^2])` over the analysed "
        "samples and positions: the share of its latent variance that is posterior noise (spectrum.json has one per "
        "channel, `posterior_variance_ratio`).\n\n" + markdown_table(latent_rows, latent_header)
    )
    atomic_write_text(
        os.path.join(args.output_dir, "spectrum.md"),
        text + table + latents_text + "\n\n![spectrum](spectrum.png)\n",
    )
    print(table)
    return written


if __name__ == "__main__":
    run_script(main, parse_args)
