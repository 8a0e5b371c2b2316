#!/usr/bin/env python
"""Which downsampling should SE use? The embedded AE fine-tuned with each mode, side by side, at 128 px.

    python experiments/se_downsample_modes/run.py                 # the full run (its time is in docs/train_ae_se.md)
    python experiments/se_downsample_modes/run.py --smoke         # a few steps per run: checks the plumbing

The paper says "x2-4 bilinear downsampling" (Section 3.3); the authors' released code has a box average
(``'mean'``) and a bilinear resize with ``align_corners=True`` (``'bil'``), and its configs do not say which one
the paper's runs used. This experiment fine-tunes the toolkit's embedded AutoencoderKL with ``train_ae_se.py``
once per ``--se_downsample_mode`` (``bilinear``, ``bilinear_align_corners``, ``bilinear_antialias``, ``area``) and
once without SE (``--se_weight 0``, the paper's "+FT"), for each of ``--seeds``; everything else is equal (steps,
batch, learning rate, data order, seed). 128 px crops give 16x16 latents, so the x4 SE branch decodes 4x4
latents and the 8x8 DCT has four blocks per channel. Then, on crops of the held-out photographs:

* ``eval_ae.py``: PSNR and SSIM, and PSNR after zeroing the top share of the latents' zigzag DCT (Fig. 8);
* ``analyze_spectrum.py``: the latent high-frequency share (AC energy in the upper half of the zigzag order).

``results.md`` reports each setting's mean and standard deviation over seeds and its per-seed values; each seed's
runs see the same data order, so differences between modes are paired by seed. ``--results_dir`` copies the report
with its plot (the committed ``experiments/se_downsample_modes/results/`` is that copy).
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from functools import partial

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "train_scripts")
sys.path.insert(0, ROOT)

from diffusability_hf.autoencoders import EMBEDDED_AE  # noqa: E402
from diffusability_hf.bench.runner import cpu_cores, in_parallel  # noqa: E402
from diffusability_hf.bench.runner import run as run_script  # noqa: E402
from diffusability_hf.hub import markdown_table  # noqa: E402
from diffusability_hf.losses import DOWNSAMPLE_MODES  # noqa: E402

FULL = dict(resolution=128, steps=300, batch=8, eval_samples=128, seeds=(0, 1))
SMOKE = dict(resolution=64, steps=2, batch=2, eval_samples=8, seeds=(0, 1))
CUT_RATIOS = [0, 0.2, 0.4, 0.6, 0.8]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 steps per run at 64 px (about 2 minutes).")
    parser.add_argument("--output_dir", type=str, default="se_downsample_modes", help="Where everything goes.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Fine-tuning seeds (default 0 1).")
    parser.add_argument("--jobs", type=int, default=2, help="Script runs at once, the CPU threads split between them.")
    parser.add_argument("--results_dir", type=str, default=None, help="Also copy results.md/json and the plot here.")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1.")
    return args


def run(script, *args, log, threads):
    """One toolkit script in its own process (the bench's runner), offline, on ``threads`` CPU threads."""
    return run_script(os.path.join(SCRIPTS, script), *args, log=log, threads=threads, cwd=ROOT)


def settings_for(mode):
    """``(label, train_ae_se.py flags)``: "+FT" without SE, else SE with ``mode``."""
    if mode is None:
        return "ft", ["--se_weight", 0.0]
    return f"se-{mode}", ["--se_weight", 0.25, "--se_downsample_mode", mode]


def summarize(per_seed):
    """``{label: {seed: value}} -> {label: {"mean", "std", "per_seed"}}`` (std with ddof 1; NaN for one seed)."""
    out = {}
    for label, values in per_seed.items():
        v = np.array([values[s] for s in sorted(values)], dtype=np.float64)
        std = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        out[label] = {"mean": float(v.mean()), "std": std, "per_seed": {s: values[s] for s in sorted(values)}}
    return out


def main():
    args = parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.seeds:
        cfg["seeds"] = tuple(dict.fromkeys(args.seeds))
    out = os.path.abspath(args.output_dir)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    cores, times, t0 = cpu_cores(), {}, time.time()
    cfg.update(cores=cores, jobs=args.jobs, modes=list(DOWNSAMPLE_MODES))
    labels = [settings_for(m)[0] for m in (None, *DOWNSAMPLE_MODES)]
    folder = {(label, seed): os.path.join(out, f"ae-{label}-seed{seed}") for label in labels for seed in cfg["seeds"]}

    # 1. Fine-tune: one run per (setting, seed), identical but for the SE term
    def fine_tune(mode, seed, threads):
        label, flags = settings_for(mode)
        path = folder[label, seed]
        shutil.rmtree(path, ignore_errors=True)
        times[f"train_{label}_seed{seed}"] = run(
            "train_ae_se.py", "--output_dir", path, *flags, "--resolution", cfg["resolution"], "--max_train_steps",
            cfg["steps"], "--train_batch_size", cfg["batch"], "--validation_steps", cfg["steps"],
            "--checkpointing_steps", cfg["steps"], "--latent_stats_num_samples", 64, "--seed", seed,
            "--report_to", "none", log=os.path.join(logs, f"train_{label}_seed{seed}.log"), threads=threads,
        )  # fmt: skip

    tasks = [partial(fine_tune, mode, seed) for seed in cfg["seeds"] for mode in (None, *DOWNSAMPLE_MODES)]
    in_parallel(tasks, args.jobs, cores)

    # 2. Reconstruction with the DCT cut, and the latent spectrum, on held-out crops
    specs = [f"base={EMBEDDED_AE}"] + [f"{label}-seed{seed}={path}" for (label, seed), path in folder.items()]

    def eval_ae(threads):
        shutil.rmtree(os.path.join(out, "eval_ae"), ignore_errors=True)
        times["eval_ae"] = run(
            "eval_ae.py", "--models", *specs, "--metrics", "psnr", "ssim", "--num_samples", cfg["eval_samples"],
            "--resolution", cfg["resolution"], "--dct_cut_ratios", *CUT_RATIOS, "--output_dir",
            os.path.join(out, "eval_ae"), log=os.path.join(logs, "eval_ae.log"), threads=threads,
        )  # fmt: skip

    def spectrum(threads):
        shutil.rmtree(os.path.join(out, "spectrum"), ignore_errors=True)
        times["spectrum"] = run(
            "analyze_spectrum.py", "--models", *specs, "--num_samples", cfg["eval_samples"], "--resolution",
            cfg["resolution"], "--output_dir", os.path.join(out, "spectrum"), log=os.path.join(logs, "spectrum.log"),
            threads=threads,
        )  # fmt: skip

    in_parallel([eval_ae, spectrum], args.jobs, cores)
    times["total"] = time.time() - t0
    write_results(out, cfg, labels, times, args.smoke)
    if args.results_dir:
        os.makedirs(os.path.join(args.results_dir, "eval_ae"), exist_ok=True)
        for rel in ("results.md", "results.json", os.path.join("eval_ae", "dct_cut.png")):
            shutil.copyfile(os.path.join(out, rel), os.path.join(args.results_dir, rel))


def write_results(out, cfg, labels, times, smoke):
    with open(os.path.join(out, "eval_ae", "metrics.json")) as fh:
        rec = json.load(fh)
    with open(os.path.join(out, "spectrum", "spectrum.json")) as fh:
        spec = json.load(fh)
    seeds, curves = cfg["seeds"], rec["dct_cut"]["curves"]

    def per_seed(get):
        return {label: {s: get(f"{label}-seed{s}") for s in seeds} for label in labels}

    metrics = {
        "psnr": summarize(per_seed(lambda m: rec["models"][m]["psnr"]["mean"])),
        "ssim": summarize(per_seed(lambda m: rec["models"][m]["ssim"]["mean"])),
        "hf_share": summarize(per_seed(lambda m: spec["models"][m]["hf_share"])),
        **{
            f"dct_cut_psnr_{r}": summarize(per_seed(lambda m, r=r: curves[m][str(float(r))]["psnr"]["mean"]))
            for r in CUT_RATIOS[1:]
        },
    }
    base = {
        "psnr": rec["models"]["base"]["psnr"]["mean"],
        "ssim": rec["models"]["base"]["ssim"]["mean"],
        "hf_share": spec["models"]["base"]["hf_share"],
        **{f"dct_cut_psnr_{r}": curves["base"][str(float(r))]["psnr"]["mean"] for r in CUT_RATIOS[1:]},
    }
    rgb_share = spec["rgb"][str(spec["models"]["base"]["compression"])]["hf_share"]
    result = {"smoke": smoke, "settings": cfg, "metrics": metrics, "base": base, "rgb_hf_share_latent_size": rgb_share,
              "seconds": times}  # fmt: skip
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))

    def cell(key, label, digits):
        m = metrics[key][label]
        each = " / ".join(f"{v:.{digits}f}" for v in m["per_seed"].values())
        return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f} ({each})"

    keys = [("psnr", 2), ("ssim", 4), ("hf_share", 3)] + [(f"dct_cut_psnr_{r}", 2) for r in CUT_RATIOS[1:]]
    header = ["setting", "PSNR (dB)", "SSIM", "latent HF share"] + [f"PSNR, {100 * r:.0f}% cut" for r in
                                                                      CUT_RATIOS[1:]]  # fmt: skip
    rows = [["base (not fine-tuned)"] + [f"{base[k]:.{d}f}" for k, d in keys]]
    rows += [[("+FT (no SE)" if label == "ft" else f"+FT-SE, `{label[3:]}`")] + [cell(k, label, d) for k, d in keys]
             for label in labels]  # fmt: skip
    rows.append(["RGB at the latent size", "", "", f"{rgb_share:.3f}"] + [""] * (len(CUT_RATIOS) - 1))
    lines = [
        "# SE downsampling modes" + (" (smoke run: numbers are meaningless)" if smoke else ""),
        "",
        f"The embedded AutoencoderKL fine-tuned {cfg['steps']} steps (batch {cfg['batch']}, {cfg['resolution']} px "
        f"crops) per setting and seed ({', '.join(map(str, seeds))}); {rec['samples']}. Each cell: mean ± standard "
        "deviation over seeds (each seed's value). "
        f"{time.strftime('%H:%M:%S', time.gmtime(times['total']))} in total on {cfg['cores']} CPU cores.",
        "",
        "    python experiments/se_downsample_modes/run.py" + (" --smoke" if smoke else ""),
        "",
        markdown_table(rows, header),
        "",
        "![DCT cut](eval_ae/dct_cut.png)",
        "",
    ]
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
