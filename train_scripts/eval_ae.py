#!/usr/bin/env python
"""Compare autoencoders on reconstruction: PSNR, SSIM, LPIPS and rFID (rFVD for clips), as the paper's Table 4,
and, with ``--dct_cut_ratios``, the DCT-cut robustness of Fig. 8 and 11 (zero the top x% of the latents' zigzag
block-DCT coefficients, decode, score).

    accelerate launch train_scripts/eval_ae.py \\
        --models flux=black-forest-labs/FLUX.1-dev:vae flux-se=./flux-se \\
        --dataset_name ILSVRC/imagenet-1k --split validation --num_samples 512 --resolution 256 \\
        --dct_cut_ratios 0 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 --output_dir eval_flux

Every AE sees the same samples (centre crops; clips from their first frame). The posterior mean is decoded (the
paper's protocol; ``--sample_posterior`` draws instead) and clamped to ``[-1, 1]``. Writes ``metrics.json`` and
``metrics.md`` (one row per AE, mean and 95% interval; the JSON names each AE's weights fingerprint),
``reconstructions.png`` (a row of originals, then one row per AE), and for the DCT cut ``dct_cut.png`` and
``dct_cut_grid.png`` (one column per cut ratio; the pixels cut, then each AE's latents cut). An ``--output_dir`` that
holds these results is refused unless ``--overwrite_output_dir``. rFID compares the features of the reconstructions with those of the originals; on 512
samples it is far from the 50K-sample figure, so compare AEs with each other, not with published rFIDs.

Offline: ``--inception_weights``, ``--i3d_model``, ``--dinov2_model`` and ``--lpips_trunk_path`` take local files,
and ``--feature_extractor PATH`` takes any small local model. Under ``accelerate launch`` the samples are split
between processes and the results gathered.
"""

import argparse
import os
import time

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from diffusability_hf import autoencoders as ae
from diffusability_hf.errors import run_script
from diffusability_hf.figures import labelled_image_grid, save_png
from diffusability_hf.files import atomic_write_json, atomic_write_text, report_written
from diffusability_hf.hub import markdown_table
from diffusability_hf.losses import LPIPS_MIN_SIZE, load_lpips
from diffusability_hf.metrics import FeatureStatistics, frechet_distance, mean_and_ci, psnr, ssim, to_uint8
from diffusability_hf.metrics.features import load_feature_extractors, process_share, start_evaluation
from diffusability_hf.spectral import chop_high_frequencies

logger = get_logger(__name__)

# What a finished run leaves in --output_dir (a second run into it needs --overwrite_output_dir)
RESULTS = ("metrics.json", "metrics.md", "reconstructions.png", "dct_cut.png", "dct_cut_grid.png")

METRICS = ("psnr", "ssim", "lpips", "fd")
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--video_column", type=str, default=None, help="Video column (default: the first Video one).")
    parser.add_argument(
        "--num_frames", type=int, default=None, help="Frames per clip (default 17 for video data; must fit every AE)."
    )
    parser.add_argument("--frame_stride", type=int, default=1, help="Take every n-th frame.")
    parser.add_argument(
        "--num_samples",
        type=int,
        default=None,
        help="Images or clips to evaluate (default 512, the paper's; 64 embedded).",
    )
    parser.add_argument("--resolution", type=int, default=None, help="Centre-crop side (default 256; embedded: 64).")
    parser.add_argument("--batch_size", type=int, default=16, help="Images (or clips) per encode/decode call.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    # Metrics
    parser.add_argument(
        "--metrics",
        type=str,
        nargs="+",
        default=list(METRICS),
        choices=METRICS,
        help="What to compute: psnr, ssim, lpips and fd (Frechet distances of --feature_extractor: rFID, rFVD, ...).",
    )
    # The feature extractor flags of eval_dit.py, with this script's help text for --feature_extractor
    parser.add_argument(
        "--feature_extractor",
        type=str,
        nargs="+",
        default=None,
        help="Feature models for the Frechet distances: 'inception' (rFID), 'dinov2' (rFDD), 'i3d' (rFVD, clips) or a "
        "local path (a transformers folder or a TorchScript file). Default: inception, plus i3d for clips.",
    )
    # Copied from train_scripts/eval_dit.py
    parser.add_argument("--inception_weights", type=str, default=None, help="Local torch-fidelity Inception weights.")
    parser.add_argument(
        "--dinov2_model", type=str, default="facebook/dinov2-large", help="DINOv2 for FDD: Hub id or local folder."
    )
    parser.add_argument("--i3d_model", type=str, default=None, help="Local StyleGAN-V i3d_torchscript.pt for FVD.")
    # End copy
    parser.add_argument(
        "--lpips_net", type=str, default="alex", choices=["alex", "vgg", "squeeze"], help="LPIPS trunk."
    )
    parser.add_argument(
        "--lpips_trunk_path", type=str, default=None, help="Local torchvision weights of the LPIPS trunk."
    )
    parser.add_argument(
        "--sample_posterior", action="store_true", help="Decode a posterior sample instead of the mean."
    )
    parser.add_argument(
        "--decode_timestep",
        type=float,
        default=0.05,
        help="Timestep-conditioned LTX decoders: temb (diffusers' 0.05).",
    )
    parser.add_argument(
        "--decode_noise_scale", type=float, default=0.025, help="Timestep-conditioned LTX decoders: noise mix (0.025)."
    )
    # DCT cut (Fig. 8 / 11)
    parser.add_argument(
        "--dct_cut_ratios",
        type=float,
        nargs="*",
        default=None,
        help="Shares of latent zigzag DCT coefficients to zero before decoding (Fig. 8: 0 0.1 ... 0.9). Off if absent.",
    )
    parser.add_argument("--dct_block_size", type=int, default=8, help="Block size of the latent DCT cut.")
    parser.add_argument(
        "--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="Autocast for the AEs."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of posterior samples and decoder noise.")
    parser.add_argument("--output_dir", type=str, default="eval_ae", help="Where the tables and plots go.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace the results of an earlier run in --output_dir (without it such a folder is refused).",
    )
    args = parser.parse_args(input_args)

    args.video = args.video_data_dir is not None or args.video_dataset_name is not None
    args.embedded = not args.video and args.dataset_name is None and args.data_dir is None
    if args.dataset_name is not None and args.data_dir is not None:
        parser.error("Give either --dataset_name or --data_dir, not both.")
    if args.video_data_dir is not None and args.video_dataset_name is not None:
        parser.error("Give either --video_data_dir or --video_dataset_name, not both.")
    if args.video and (args.dataset_name or args.data_dir):
        parser.error("Evaluate images and clips in separate runs: give an image source or a video source.")
    if args.models is None:
        args.models = [f"embedded={ae.EMBEDDED_AE}"]
    if args.video and args.num_frames is None:
        args.num_frames = 17
    if args.resolution is None:
        args.resolution = 64 if args.embedded else 256
    if args.num_samples is None:
        args.num_samples = 64 if args.embedded and args.num_frames is None else (16 if args.embedded else 512)
    if args.feature_extractor is None:
        args.feature_extractor = ["inception"] + (["i3d"] if args.num_frames else [])
    for flag in ("resolution", "batch_size", "num_samples", "frame_stride", "dct_block_size"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive.")
    if args.num_frames is not None and args.num_frames <= 0:
        parser.error("--num_frames must be positive.")
    if args.num_samples < 2 and "fd" in args.metrics:
        parser.error("Frechet distances need at least 2 samples: raise --num_samples or drop 'fd' from --metrics.")
    if "lpips" in args.metrics and args.resolution < LPIPS_MIN_SIZE:
        parser.error(f"LPIPS needs a --resolution of at least {LPIPS_MIN_SIZE}, or drop 'lpips' from --metrics.")
    if "ssim" in args.metrics and args.resolution < 11:
        parser.error("SSIM's 11x11 window needs a --resolution of at least 11.")
    for r in args.dct_cut_ratios or []:
        if not 0.0 <= r < 1.0:
            parser.error(f"--dct_cut_ratios must be in [0, 1), got {r}.")
    labels = [ae.parse_model_spec(s)[0] for s in args.models]
    if len(set(labels)) != len(labels):
        parser.error(f"Two --models share a label ({labels}): name them as LABEL=PATH.")
    return args


def check_models(args):
    """Read every AE's config (no weights) and check that the samples fit it. Returns ``[(label, path, sub, config)]``."""
    if "fd" in args.metrics and "i3d" in args.feature_extractor and not args.num_frames:
        raise ValueError("--feature_extractor i3d (rFVD) needs clips: give a video source or --num_frames.")
    return ae.check_model_specs(
        args.models, args.resolution, args.num_frames, args.revision, args.cache_dir,
        args.dct_block_size if args.dct_cut_ratios else None, "--dct_block_size",
    )  # fmt: skip


def per_sample_lpips(lpips_model, recon, pixels):
    """``(N,)`` LPIPS; clips are scored frame by frame and averaged."""
    if pixels.ndim == 5:
        n, t = pixels.shape[0], pixels.shape[2]
        frames = lpips_model(recon.transpose(1, 2).flatten(0, 1), pixels.transpose(1, 2).flatten(0, 1))
        return frames.view(n, t).mean(1).double()
    return lpips_model(recon, pixels).flatten().double()


def scores(recon, pixels, args, lpips_model):
    """Per-sample metrics of one batch: ``{name: (N,) float64}``."""
    out = {}
    if "psnr" in args.metrics:
        out["psnr"] = psnr(recon, pixels).cpu()
    if "ssim" in args.metrics:
        out["ssim"] = ssim(recon, pixels).cpu()
    if lpips_model is not None:
        out["lpips"] = per_sample_lpips(lpips_model, recon.float(), pixels.float()).cpu()
    return out


@torch.no_grad()
def evaluate_model(vae, loader, args, accelerator, lpips_model, extractors, real_stats):
    """Reconstruct every sample once (and once per DCT-cut ratio). Returns per-sample scores, feature statistics of
    the reconstructions, cut-ratio scores, the first readable samples with their reconstructions (8, and 1 per cut
    ratio), timings and skips."""
    per_sample = {}
    fake_stats = {name: FeatureStatistics() for name in extractors}
    cut = {r: {} for r in args.dct_cut_ratios or []}
    first = {}
    seconds, count, skipped = 0.0, 0, 0
    fill_real = not any(s.n for s in real_stats.values())
    channels_last = ae.get_row(vae).layout == "image"
    for step, (pixels, ok) in enumerate(tqdm(loader, disable=not accelerator.is_local_main_process, leave=False)):
        skipped += int((~ok).sum())
        pixels = pixels[ok].to(accelerator.device)
        if len(pixels) == 0:
            continue
        if channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        start = time.perf_counter()
        gen = torch.Generator(accelerator.device).manual_seed(
            args.seed * 1_000_003 + step * accelerator.num_processes + accelerator.process_index
        )
        with accelerator.autocast():
            post = ae.encode(vae, pixels)
            z = post.sample(gen) if args.sample_posterior else post.mode()
            recon = ae.decode(vae, z, gen, args.decode_timestep, args.decode_noise_scale).float().clamp(-1, 1)
        for name, values in scores(recon, pixels, args, lpips_model).items():
            per_sample.setdefault(name, []).append(values)
        for name, extractor in extractors.items():
            fake_stats[name].update(extractor(to_uint8(recon)))
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start  # the originals' features (once, below) are not this AE's cost
        if fill_real:
            for name, extractor in extractors.items():
                real_stats[name].update(extractor(to_uint8(pixels)))
        count += len(pixels)
        need = 8 - len(first.get("original", ()))
        if need > 0:  # the first 8 readable samples of this process and their reconstructions, for the grid
            first["original"] = torch.cat(
                [first.get("original", pixels[:0].float().cpu()), pixels[:need].float().cpu()]
            )
            first[None] = torch.cat([first.get(None, recon[:0].cpu()), recon[:need].cpu()])
        # DCT cut (paper eq. 4 on the latents, Fig. 8): zero the top share of zigzag coefficients, decode, score
        for ratio in cut:
            with accelerator.autocast():
                zc = chop_high_frequencies(z.float(), args.dct_block_size, ratio).to(z.dtype)
                rc = ae.decode(vae, zc, gen, args.decode_timestep, args.decode_noise_scale).float().clamp(-1, 1)
            for name, values in scores(rc, pixels, args, lpips_model).items():
                cut[ratio].setdefault(name, []).append(values)
            if ratio not in first:  # the first readable sample, for the DCT-cut grid
                first[ratio] = rc[:1].cpu()
    per_sample = {k: torch.cat(v).tolist() for k, v in per_sample.items()}
    cut = {r: {k: torch.cat(v).tolist() for k, v in d.items()} for r, d in cut.items()}
    return per_sample, fake_stats, cut, first, seconds, count, skipped


def gather_lists(accelerator, values: dict) -> dict:
    """``{name: list}`` of every process, concatenated in process order."""
    parts = gather_object([values])
    return {k: [v for p in parts for v in p.get(k, [])] for k in values}


def summarise(values):
    mean, ci = mean_and_ci(values)
    return {"mean": mean, "ci95": ci}


def rgb_cut_scores(pixels, args, lpips_model):
    """The same DCT cut applied to the pixels themselves (block size as for the latents): the RGB reference line."""
    out = {}
    for ratio in args.dct_cut_ratios:
        chopped = chop_high_frequencies(pixels.float(), args.dct_block_size, ratio).clamp(-1, 1)
        out[ratio] = {k: v.tolist() for k, v in scores(chopped, pixels, args, lpips_model).items()}
    return out


def plot_dct_cut(path, curves, metrics):
    """PSNR / SSIM / LPIPS against the cut ratio, one line per AE (Fig. 8)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(metrics), 3.4), dpi=120)
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, by_ratio in curves.items():
            ratios = sorted(by_ratio, key=float)
            style = "--" if label == "RGB" else "-o"
            ax.plot(
                [100 * float(r) for r in ratios], [by_ratio[r][metric]["mean"] for r in ratios], style, label=label
            )
        ax.set_xlabel("latent DCT coefficients zeroed (%)")
        ax.set_ylabel(metric.upper() + (" (higher is better)" if HIGHER_IS_BETTER[metric] else " (lower is better)"))
        ax.grid(True, alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    save_png(fig, path)


def main(args):
    # The output folder and every AE's config are checked before any weights load
    models, accelerator, samples = start_evaluation(args, RESULTS, check_models)
    if len(samples) == 0:
        raise ValueError("The data source holds no samples.")

    # Metric networks (a missing weights file fails here, before any autoencoder runs)
    lpips_model = None
    if "lpips" in args.metrics:
        lpips_model = load_lpips(args.lpips_net, args.lpips_trunk_path).to(accelerator.device)
    extractors = {}
    if "fd" in args.metrics:
        loaded = load_feature_extractors(
            args.feature_extractor, args.inception_weights, args.dinov2_model, args.i3d_model, args.cache_dir,
            accelerator.device, clips=bool(args.num_frames), advice="evaluate video data with it",
        )  # fmt: skip
        extractors = {"r" + metric: ext for metric, ext in loaded.items()}  # rFID, rFDD, rFVD, ...
    real_stats = {name: FeatureStatistics() for name in extractors}

    # This process's share of the samples (every process sees the same models)
    _, loader = process_share(samples, accelerator, args.batch_size, args.dataloader_num_workers)
    os.makedirs(args.output_dir, exist_ok=True)
    results, curves, firsts = {}, {}, {}
    for label, path, sub, config in models:
        logger.info(f"Evaluating {label} ({config['_class_name']}, {path}{':' + sub if sub else ''})")
        vae = ae.load_pretrained(path, sub, args.revision, args.variant, args.cache_dir).to(accelerator.device)
        if ae.get_row(config).layout == "image":
            vae = vae.to(memory_format=torch.channels_last)
        per_sample, fake, cut, first, seconds, count, skipped = evaluate_model(
            vae, loader, args, accelerator, lpips_model, extractors, real_stats
        )
        fingerprint = ae.weights_fingerprint(vae)
        del vae
        per_sample = gather_lists(accelerator, per_sample)
        timing = gather_object([(seconds, count, skipped)])
        result = {"model": path + (f":{sub}" if sub else ""), "class": config["_class_name"]}
        result["weights_fingerprint"] = fingerprint
        result.update({k: summarise(v) for k, v in per_sample.items()})
        result["num_samples"] = sum(c for _, c, _ in timing)
        if result["num_samples"] == 0:
            raise ValueError(f"None of the {len(samples)} samples could be read: check the data source.")
        result["skipped"] = sum(s for _, _, s in timing)
        for name in extractors:
            real, fake_all = (
                FeatureStatistics.merge(gather_object([real_stats[name]])),
                FeatureStatistics.merge(gather_object([fake[name]])),
            )
            result[name] = frechet_distance(real.mu, real.sigma, fake_all.mu, fake_all.sigma)
        # Samples/s of the whole per-batch work (encode, decode, metrics), per process, summed over processes
        result["samples_per_second"] = sum(c / s for s, c, _ in timing if s > 0)
        if args.dct_cut_ratios:
            cut = {r: gather_lists(accelerator, d) for r, d in cut.items()}
            curves[label] = {str(r): {k: summarise(v) for k, v in d.items()} for r, d in cut.items()}
        results[label] = result
        firsts[label] = first

    if accelerator.is_main_process:
        written = write_outputs(args, samples, results, curves, firsts, lpips_model, list(extractors))
        for name in set(RESULTS) - set(written):  # --overwrite_output_dir: no stale plot of the earlier run stays
            if os.path.isfile(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
        report_written(args.output_dir, written)
    accelerator.wait_for_everyone()  # no process tears down the process group while another still works
    accelerator.end_training()


def write_outputs(args, samples, results, curves, firsts, lpips_model, fds):
    """metrics.json, metrics.md and the figures, each written atomically; returns the names written."""
    metrics = [m for m in ("psnr", "ssim", "lpips") if m in args.metrics]
    written = ["metrics.json", "metrics.md"]
    # Reconstructions: this process's first readable samples, then one row per AE (clips: first frames)
    originals = next(iter(firsts.values())).get("original")  # the same samples for every AE (None: none readable)
    if originals is not None:
        grid = labelled_image_grid(
            [originals] + [f[None] for f in firsts.values()], ["original"] + list(firsts), padding=1
        )
        save_png(grid, os.path.join(args.output_dir, "reconstructions.png"))
        written.append("reconstructions.png")
    if args.dct_cut_ratios:
        # The RGB reference of the DCT cut: the first readable samples (up to 64), read once more
        readable = [pixels for pixels, ok in (samples[i] for i in range(min(len(samples), 64))) if ok]
        rgb = {}
        if readable:
            lpips_cpu = lpips_model.cpu() if lpips_model is not None else None
            rgb = rgb_cut_scores(torch.stack(readable), args, lpips_cpu)
            rgb = {str(r): {k: summarise(v) for k, v in d.items()} for r, d in rgb.items()}
        if metrics:
            plot_dct_cut(os.path.join(args.output_dir, "dct_cut.png"), curves, metrics)
            written.append("dct_cut.png")
    if args.dct_cut_ratios and originals is not None:
        # One column per cut ratio: the first sample with its pixels cut, then decoded from each AE's cut latents
        ratios = sorted(args.dct_cut_ratios)
        rgb_rows = torch.stack([chop_high_frequencies(originals[:1].float(), args.dct_block_size, r) for r in ratios])
        rows = [rgb_rows[:, 0].clamp(-1, 1)] + [torch.stack([f[r][0] for r in ratios]) for f in firsts.values()]
        grid = labelled_image_grid(
            rows,
            ["pixels cut"] + [f"{label} latents cut" for label in firsts],
            col_labels=[f"{100 * r:g}% cut" for r in ratios],
            padding=1,
        )
        save_png(grid, os.path.join(args.output_dir, "dct_cut_grid.png"))
        written.append("dct_cut_grid.png")

    header = ["model", "class"] + [m.upper() for m in metrics] + fds + ["samples/s"]
    rows = []
    for label, r in results.items():
        cells = [label, r["class"]]
        for m in metrics:
            cells.append(
                f"{r[m]['mean']:.4f} ± {r[m]['ci95']:.4f}"
                if m != "psnr"
                else f"{r[m]['mean']:.2f} ± {r[m]['ci95']:.2f}"
            )
        cells += [f"{r[k]:.3f}" for k in fds] + [f"{r['samples_per_second']:.1f}"]
        rows.append(cells)
    table = markdown_table(rows, header)
    what = (
        samples.description + f" at {args.resolution} px" + (f", {args.num_frames} frames" if args.num_frames else "")
    )
    lines = [
        "# Autoencoder reconstruction",
        "",
        f"{what}; posterior {'samples' if args.sample_posterior else 'means'} decoded; mean ± 95% interval over samples.",
    ]
    if fds:
        lines += ["Frechet distances compare the reconstructions' features with the originals'."]
    lines += ["", table]
    if args.dct_cut_ratios:
        cut_header = ["cut (%)"] + [f"{label} PSNR" for label in curves]
        cut_rows = (
            [
                [f"{100 * r:.0f}"] + [f"{curves[label][str(r)]['psnr']['mean']:.2f}" for label in curves]
                for r in sorted(args.dct_cut_ratios)
            ]
            if "psnr" in metrics
            else []
        )
        lines += [
            "",
            f"## DCT cut (block {args.dct_block_size}, zigzag order)",
            "",
            markdown_table(cut_rows, cut_header) if cut_rows else "",
            "",
            "![DCT cut](dct_cut.png)",
        ]
    atomic_write_text(os.path.join(args.output_dir, "metrics.md"), "\n".join(lines) + "\n")
    out = {
        "samples": what,
        "resolution": args.resolution,
        "num_frames": args.num_frames,
        "posterior": "sample" if args.sample_posterior else "mean",
        "lpips_net": args.lpips_net if lpips_model is not None else None,
        "models": results,
    }
    if args.dct_cut_ratios:
        out["dct_cut"] = {
            "block_size": args.dct_block_size,
            "order": "zigzag",
            "curves": curves,
            "rgb_reference": rgb,  # the same cut applied to the pixels (the readable ones of the first 64 samples)
        }
    atomic_write_json(os.path.join(args.output_dir, "metrics.json"), out)
    print(table)
    return written


if __name__ == "__main__":
    run_script(main, parse_args)
