#!/usr/bin/env python
"""A diffusability score in minutes: cheap proxies of how well a diffusion model will learn each autoencoder's latents.

    python train_scripts/diffusability_score.py --models ft=./ae-ft ft-se=./ae-ft-se --output_dir score

Per autoencoder, on the bench's default data (128 px crops of the colour photographs that ship with the installed
packages, as ``diffusability_bench.py`` writes them) or on image folders whose subfolders are the classes
(``--train_data_dir``, ``--reference_data_dir``, ``--heldout_data_dir``), the proxies of
:mod:`diffusability_hf.metrics.diffusability`, on latents normalised per channel as the bench's DiT sees them:

- the spectrum of the normalised posterior samples of the held-out crops: high-frequency share, spectral slope, and
  the distance of its profile to RGB's at the latents' size (paper Sec. 3.2, Fig. 2);
- the DCT cut (Fig. 8): PSNR against the share of the latents' zigzag coefficients removed, and its slope;
- noise robustness: PSNR of ``Dec(z + s sigma_z eps)`` for ``--noise_scales``;
- a linear probe: ridge-regression class accuracy of pooled latents (training crops -> reference crops);
- a flow probe: the bench's DiT (App. B, ``--dit_recipe``) trained ``--probe_steps`` steps on the training latents,
  its held-out flow-matching loss per noise level on the reference latents (mean: ``flow_loss_auc``) and the class
  gain of that loss.

Which proxy predicts generation: none is validated. In the pre-registered study
(``experiments/diffusability_score/outcome.md``) ``noise_psnr`` met the registered target over six toolkit-made
autoencoders (signed Spearman +0.94, 95% interval [-0.40, +0.96]); its pre-registered replication
(``experiments/diffusability_score/replication/outcome.md``) gave no verdict (2 of 8 generators usable) and, read
exploratorily, did not support it (+0.03). Treat every number here as a description of the latents, and
``noise_psnr`` as an unconfirmed candidate.

Writes ``scores.json`` (every proxy, its curves and its cost in seconds), ``scores.md`` (the table and the ranking
each proxy predicts) and ``scores.png``. An ``--output_dir`` that holds these results is refused unless
``--overwrite_output_dir``.
"""

import argparse
import logging
import os
import time

import torch

from diffusability_hf import autoencoders as ae
from diffusability_hf.cpu import use_all_cpu_cores
from diffusability_hf.data.images import (
    EMBEDDED_VALIDATION_IMAGES,
    EmbeddedPhotoCrops,
    LabelledImages,
    installed_photographs,
)
from diffusability_hf.errors import UsageError, run_script
from diffusability_hf.files import atomic_write_json, atomic_write_text, check_output_dir, report_written
from diffusability_hf.hub import markdown_table
from diffusability_hf.losses import downsample
from diffusability_hf.metrics.diffusability import (
    PROXIES,
    channel_statistics,
    dct_cut_curve,
    flow_probe,
    linear_probe_accuracy,
    noise_robustness,
    pooled,
    predicted_ranking,
    spectral_proxies,
    standardize,
)
from diffusability_hf.models.dit import RECIPES

logger = logging.getLogger(__name__)

RESULTS = ("scores.json", "scores.md", "scores.png")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        type=str,
        nargs="+",
        required=True,
        help="Autoencoders as [LABEL=]PATH[:SUBFOLDER] (local folder or Hub id), e.g. 'ft=./ae-ft ft-se=./ae-ft-se'.",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of Hub models.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where Hub models are cached.")
    # Data (default: the bench's crops of the installed photographs)
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Image folder whose subfolders are the classes: the flow and linear probes train on it. Default: the "
        "bench's training crops (--train_crops of the installed photographs, seed 0).",
    )
    parser.add_argument(
        "--reference_data_dir",
        type=str,
        default=None,
        help="Image folder with the same classes, never trained on: the probes are scored on it. Default: the "
        "bench's reference crops (--reference_crops, seed 1). Needed with --train_data_dir.",
    )
    parser.add_argument(
        "--heldout_data_dir",
        type=str,
        default=None,
        help="Images for the spectrum, DCT cut and noise robustness. Default: the bench's held-out crops "
        "(--heldout_crops of the held-out photographs, seed 2); with --train_data_dir: --reference_data_dir.",
    )
    parser.add_argument("--resolution", type=int, default=128, help="Crop side in pixels (the bench's 128).")
    parser.add_argument("--train_crops", type=int, default=2048, help="Bench data: training crops (the bench's).")
    parser.add_argument("--reference_crops", type=int, default=256, help="Bench data: reference crops.")
    parser.add_argument("--heldout_crops", type=int, default=128, help="Bench data: held-out crops.")
    parser.add_argument(
        "--max_train_samples", type=int, default=None, help="Use at most this many training images (all by default)."
    )
    # Proxies
    parser.add_argument("--block_size", type=int, default=8, help="DCT block size B of the spectrum and DCT cut.")
    parser.add_argument("--hf_cutoff", type=float, default=0.5, help="Zigzag share where 'high frequencies' start.")
    parser.add_argument(
        "--cut_ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75], help="DCT-cut ratios (Fig. 8)."
    )
    parser.add_argument(
        "--noise_scales", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0], help="Noise robustness: s values."
    )
    parser.add_argument(
        "--decode_samples",
        type=int,
        default=64,
        help="DCT cut and noise robustness: the first this many held-out images (each is decoded once per ratio "
        "and per scale).",
    )
    parser.add_argument("--probe_pool", type=int, default=8, help="Linear probe: latents pooled to this side.")
    parser.add_argument("--probe_steps", type=int, default=250, help="Flow probe: DiT training steps.")
    parser.add_argument("--probe_batch_size", type=int, default=32, help="Flow probe: batch (the bench's 32).")
    parser.add_argument("--probe_learning_rate", type=float, default=3e-4, help="Flow probe: peak rate (App. B).")
    parser.add_argument(
        "--dit_recipe", type=str, default="rope+sincos_std1", choices=sorted(RECIPES), help="Flow probe: DiT recipe."
    )
    parser.add_argument("--dit_width", type=int, default=128, help="Flow probe: DiT width (the bench's 128).")
    parser.add_argument("--dit_depth", type=int, default=4, help="Flow probe: DiT blocks (the bench's 4).")
    parser.add_argument("--dit_heads", type=int, default=2, help="Flow probe: attention heads (the bench's 2).")
    parser.add_argument("--dit_patch", type=int, default=2, help="Flow probe: patch size (the bench's 2).")
    parser.add_argument("--noise_levels", type=int, default=10, help="Flow probe: held-out noise levels.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per encoder or decoder call.")
    parser.add_argument("--seed", type=int, default=0, help="Posterior noise, probe init and draws.")
    parser.add_argument("--output_dir", type=str, default="diffusability_score", help="Where the results go.")
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="Replace the results of an earlier run in --output_dir."
    )
    args = parser.parse_args(input_args)

    for flag in ("resolution", "train_crops", "reference_crops", "heldout_crops", "decode_samples", "block_size",
                 "probe_pool", "probe_batch_size", "dit_width", "dit_depth", "dit_heads", "dit_patch", "noise_levels",
                 "batch_size"):  # fmt: skip
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive.")
    if args.probe_steps < 0 or args.seed < 0:
        parser.error("--probe_steps and --seed must be non-negative.")
    if args.max_train_samples is not None and args.max_train_samples < 2:
        parser.error("--max_train_samples must be at least 2.")
    if not 0 < args.hf_cutoff < 1:
        parser.error("--hf_cutoff must be in (0, 1).")
    if any(not 0 <= r < 1 for r in args.cut_ratios) or len(set(args.cut_ratios)) < 2:
        parser.error("--cut_ratios needs at least two distinct ratios in [0, 1).")
    if any(not s > 0 for s in args.noise_scales):
        parser.error("--noise_scales must be positive.")
    if args.dit_width % args.dit_heads:
        parser.error(f"--dit_width {args.dit_width} must be a multiple of --dit_heads {args.dit_heads}.")
    if (args.train_data_dir is None) != (args.reference_data_dir is None):
        parser.error("Give --train_data_dir and --reference_data_dir together (the probes train on one, score on the "
                     "other), or neither for the bench's data.")  # fmt: skip
    for flag in ("train_data_dir", "reference_data_dir", "heldout_data_dir"):
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(path):
            parser.error(f"--{flag} {path} is not a folder.")
    labels = [ae.parse_model_spec(s)[0] for s in args.models]
    if len(set(labels)) != len(labels):
        parser.error(f"Two --models share a label ({labels}): name them as LABEL=PATH.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Data: pixels in [-1, 1] and class labels, read once for every autoencoder


def bench_crops(names, num, resolution, seed):
    """The bench's crops (``diffusability_bench.write_crops``): ``num`` random-scale crops of the photographs
    ``names``, rounded to 8 bits as the bench's PNGs are; labels index ``names``."""
    crops = EmbeddedPhotoCrops(resolution, names, num_samples=num, seed=seed, random_flip=False)
    pixels, labels = zip(*(crops.crop(i) for i in range(num)))
    pixels = ((torch.stack(pixels) + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    return pixels, torch.tensor(labels)


def folder_images(path, resolution, limit=None, class_names=None):
    """Centre crops and labels of an image folder whose subfolders are the classes; ``class_names`` maps the labels
    onto another folder's classes (the training folder's). Unreadable images are skipped with a warning."""
    data = LabelledImages(resolution, train_data_dir=path)
    pixels, labels, skipped = [], [], 0
    for i in range(len(data) if limit is None else min(limit, len(data))):
        x, label, _, ok = data[i]
        if not ok:
            skipped += 1
            continue
        if class_names is not None:
            name = data.names[label]
            if name not in class_names:
                raise UsageError(f"{path} has class '{name}', which the training folder lacks: give both folders the "
                                 "same class subfolders.")  # fmt: skip
            label = class_names.index(name)
        pixels.append(x)
        labels.append(label)
    if skipped:
        logger.warning(f"Skipped {skipped} unreadable images in {path}")
    if len(pixels) < 2:
        raise UsageError(f"{path} has {len(pixels)} readable images: the score needs at least 2.")
    return torch.stack(pixels), torch.tensor(labels), data.names


def load_data(args):
    """``{"train", "reference", "heldout"}`` -> (pixels, labels), the class names and a one-line description."""
    if args.train_data_dir is None:
        names = installed_photographs()
        held_names = [n for n in names if n in EMBEDDED_VALIDATION_IMAGES]
        train_names = [n for n in names if n not in held_names]
        train = bench_crops(train_names, args.max_train_samples or args.train_crops, args.resolution, 0)
        data = {
            "train": train,
            "reference": bench_crops(train_names, args.reference_crops, args.resolution, 1),
            "heldout": bench_crops(held_names, args.heldout_crops, args.resolution, 2),
        }
        note = (f"the bench's crops at {args.resolution} px: {len(train[0])} training and {args.reference_crops} "
                f"reference crops of {', '.join(train_names)}; {args.heldout_crops} held-out crops of "
                f"{', '.join(held_names)}")  # fmt: skip
        return data, train_names, note
    tp, tl, class_names = folder_images(args.train_data_dir, args.resolution, args.max_train_samples)
    rp, rl, _ = folder_images(args.reference_data_dir, args.resolution, class_names=class_names)
    held = args.heldout_data_dir or args.reference_data_dir
    hp, hl, _ = folder_images(held, args.resolution) if held != args.reference_data_dir else (rp, rl, None)
    note = f"{args.train_data_dir} ({len(tp)} images), {args.reference_data_dir} ({len(rp)}), held-out {held}"
    return {"train": (tp, tl), "reference": (rp, rl), "heldout": (hp, hl)}, class_names, note


# ----------------------------------------------------------------------------------------------------------------
# One autoencoder


@torch.no_grad()
def encode_all(vae, pixels, batch_size, device):
    """Posterior means and stds ``(N, C, h, w)`` (CPU, float32) of ``pixels``; a deterministic encoder's std is 0."""
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        post = ae.encode(vae, pixels[start : start + batch_size].to(device))
        means.append(post.mean.float().cpu())
        stds.append(torch.zeros_like(means[-1]) if post.std is None else post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def decoder(vae, mean, std, batch_size, device, generator):
    """``decode(z_normalised)`` in batches: undo the per-channel standardisation, decode with the AE."""

    @torch.no_grad()
    def decode(z):
        raw = z * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
        return torch.cat([
            ae.decode(vae, raw[s : s + batch_size].to(device), generator).float().cpu()
            for s in range(0, len(raw), batch_size)
        ])  # fmt: skip

    return decode


def score_autoencoder(args, label, path, sub, data, num_classes, device):
    """Every proxy of one autoencoder and its cost in seconds."""
    from diffusability_hf.models.selfcond_dit import SelfConditionedDiT

    seconds, start = {}, time.perf_counter()
    vae = ae.prepare_for_training(ae.load_pretrained(path, sub, args.revision, None, args.cache_dir)).to(device)
    vae.eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(args.seed)
    encoded = {k: encode_all(vae, pixels, args.batch_size, device) for k, (pixels, _) in data.items()}
    # normalised posterior samples, with the training samples' per-channel statistics (what the DiT sees)
    samples = {k: m + s * torch.randn(m.shape, generator=gen) for k, (m, s) in encoded.items()}
    mean, std = channel_statistics(samples["train"])
    norm = {k: standardize(z, mean, std) for k, z in samples.items()}
    norm_std = {k: s / std.view(1, -1, 1, 1) for k, (_, s) in encoded.items()}
    seconds["encode"] = time.perf_counter() - start
    f = ae.spatial_compression(vae)
    result = {"model": path + (f":{sub}" if sub else ""), "class": type(vae).__name__,
              "weights_fingerprint": ae.weights_fingerprint(vae), "latent_shape": list(norm["train"].shape[1:]),
              "latents_mean": mean.tolist(), "latents_std": std.tolist()}  # fmt: skip

    t = time.perf_counter()
    held_pixels = data["heldout"][0]
    rgb = downsample(held_pixels.float(), f, "area")
    result.update(spectral_proxies(norm["heldout"], rgb, args.block_size, args.hf_cutoff))
    seconds["spectrum"] = time.perf_counter() - t

    decode = decoder(vae, mean, std, args.batch_size, device, torch.Generator().manual_seed(args.seed))
    held_pixels = held_pixels[: args.decode_samples]
    held_means = standardize(encoded["heldout"][0][: args.decode_samples], mean, std)
    t = time.perf_counter()
    cut = dct_cut_curve(decode, held_means, held_pixels, sorted(set(args.cut_ratios)), args.block_size)
    result.update(dct_cut_slope=cut["dct_cut_slope"], dct_cut_psnr=cut["psnr"])
    seconds["dct_cut"] = time.perf_counter() - t

    t = time.perf_counter()
    noise = noise_robustness(decode, held_means, held_pixels, args.noise_scales, torch.Generator().manual_seed(1))
    result.update(noise_psnr=noise["noise_psnr"], noise_psnr_curve=noise["psnr"])
    seconds["noise"] = time.perf_counter() - t

    t = time.perf_counter()
    train_means = standardize(encoded["train"][0], mean, std)
    ref_means = standardize(encoded["reference"][0], mean, std)
    result["linear_probe"] = linear_probe_accuracy(
        pooled(train_means, args.probe_pool),
        data["train"][1],
        pooled(ref_means, args.probe_pool),
        data["reference"][1],
    )
    seconds["linear_probe"] = time.perf_counter() - t
    del vae

    if args.probe_steps:
        t = time.perf_counter()
        channels, size = norm["train"].shape[1], norm["train"].shape[-1]
        if size % args.dit_patch:
            raise UsageError(f"{label}'s latents are {size} wide, not a multiple of --dit_patch {args.dit_patch}.")
        torch.manual_seed(args.seed)  # the probe's initial weights
        recipe = RECIPES[args.dit_recipe]
        dit = SelfConditionedDiT(
            num_attention_heads=args.dit_heads, attention_head_dim=args.dit_width // args.dit_heads,
            in_channels=channels, num_layers=args.dit_depth, sample_size=size, patch_size=args.dit_patch,
            num_embeds_ada_norm=num_classes, self_conditioning=True, **recipe,
        ).to(device)  # fmt: skip
        probe = flow_probe(
            dit, train_means, data["train"][1], norm["reference"],
            data["reference"][1], num_classes, args.probe_steps, args.probe_batch_size, args.probe_learning_rate,
            noise_levels=args.noise_levels, seed=args.seed, train_noise_std=norm_std["train"],
        )  # fmt: skip
        result.update(flow_loss_auc=probe["flow_loss_auc"], flow_class_gain=probe["flow_class_gain"], flow_probe={
            k: probe[k] for k in ("sigma", "loss", "loss_null_class", "class_gain", "train_loss_last_tenth", "steps")
        })  # fmt: skip
        seconds["flow_probe"] = time.perf_counter() - t
    result["seconds"] = {**seconds, "total": time.perf_counter() - start}
    return result


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def write_outputs(args, scores, note, seconds):
    proxies = [p for p in PROXIES if all(p in s for s in scores.values())]
    rankings = {p: predicted_ranking(scores, p) for p in proxies}
    report = {
        "data": note, "proxies": {p: {"description": PROXIES[p][0], "higher_predicts_better": PROXIES[p][1] > 0}
                                  for p in proxies},
        "models": scores, "rankings": rankings, "seconds": seconds, "settings": vars(args),
    }  # fmt: skip
    atomic_write_json(os.path.join(args.output_dir, "scores.json"), report)
    arrows = {p: "↑" if PROXIES[p][1] > 0 else "↓" for p in proxies}
    rows = [
        [label] + [f"{s[p]:.4g}" for p in proxies] + [f"{s['seconds']['total']:.0f}"] for label, s in scores.items()
    ]
    lines = [
        "# Diffusability score", "", f"Data: {note}.", "",
        "Proxies of how well a diffusion model learns each autoencoder's latents (arrows: the direction that the paper's "
        "account predicts to be better). Which of them tracks generator FD is measured in "
        "`experiments/diffusability_score`; these numbers describe the latents, they are not a verdict.", "",
        markdown_table(rows, ["autoencoder"] + [f"{p} {arrows[p]}" for p in proxies] + ["seconds"]), "",
        "## Predicted ranking (most diffusable first)", "",
        markdown_table([[p, " > ".join(r)] for p, r in rankings.items()], ["proxy", "ranking"]), "",
        "## Proxies", "", *[f"- `{p}`: {PROXIES[p][0]}." for p in proxies], "",
    ]  # fmt: skip
    atomic_write_text(os.path.join(args.output_dir, "scores.md"), "\n".join(lines))
    plot(os.path.join(args.output_dir, "scores.png"), scores)


def plot(path, scores):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusability_hf.figures import save_png

    panels = [("dct_cut_psnr", "DCT cut ratio", "PSNR (dB)", "DCT cut (Fig. 8)"),
              ("noise_psnr_curve", "noise scale s", "PSNR (dB)", "Dec(z + s sigma eps)")]  # fmt: skip
    has_probe = all("flow_probe" in s for s in scores.values())
    fig, axes = plt.subplots(1, len(panels) + has_probe, figsize=(4.5 * (len(panels) + has_probe), 3.5))
    for ax, (key, xlabel, ylabel, title) in zip(axes, panels):
        for label, s in scores.items():
            curve = s[key]
            ax.plot([float(k) for k in curve], list(curve.values()), marker="o", label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if has_probe:
        for label, s in scores.items():
            axes[-1].plot(s["flow_probe"]["sigma"], s["flow_probe"]["loss"], marker="o", label=label)
        axes[-1].set(xlabel="sigma", ylabel="held-out loss", title="flow probe")
    axes[0].legend(fontsize=7)
    save_png(fig, path)


def main(args):
    use_all_cpu_cores()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    check_output_dir(args.output_dir, RESULTS, args.overwrite_output_dir)
    models = ae.check_model_specs(args.models, args.resolution, None, args.revision, args.cache_dir,
                                  args.block_size, "--block_size")  # fmt: skip
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    data, class_names, note = load_data(args)
    data_seconds = time.perf_counter() - start
    logger.info(f"Data: {note} ({data_seconds:.0f} s)")
    scores = {}
    for label, path, sub, _ in models:
        scores[label] = score_autoencoder(args, label, path, sub, data, len(class_names), device)
        logger.info(f"{label}: " + ", ".join(f"{p} {scores[label][p]:.4g}" for p in PROXIES if p in scores[label])
                    + f" ({scores[label]['seconds']['total']:.0f} s)")  # fmt: skip
    os.makedirs(args.output_dir, exist_ok=True)
    write_outputs(args, scores, note, {"data": data_seconds, "total": time.perf_counter() - start})
    report_written(args.output_dir, RESULTS, log=logger.info)


if __name__ == "__main__":
    run_script(main, parse_args)
