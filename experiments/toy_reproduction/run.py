#!/usr/bin/env python
"""The paper's protocol in miniature, offline, on the photographs that ship inside scikit-image.

    python experiments/toy_reproduction/run.py                # the full run (documented time in the README)
    python experiments/toy_reproduction/run.py --smoke        # a handful of steps per stage: checks the plumbing

Only the toolkit's own scripts are used, each as a user would run it:

1. Stage I: the embedded pretrained AutoencoderKL ("vanilla") is fine-tuned twice for the same number of steps
   with ``train_ae_se.py``, once without SE (``--se_weight 0``, the paper's "+FT") and once with it (``--se_weight
   0.25``, "+FT-SE"); everything else equal (seed, data order, steps).
2. Reconstruction (Table 4) and DCT-cut robustness (Fig. 8): ``eval_ae.py`` on held-out crops (PSNR, SSIM).
3. Spectrum (Fig. 4): ``analyze_spectrum.py``, latent profiles of the three AEs against RGB.
4. Stage II (Table 1): per AE, ``extract_latents.py`` then ``train_dit_flow.py`` (the same small DiT, class = the
   source photograph of a crop; diffusers' stock DiT, ``--stock_dit``, as in the committed results' run) for each of ``--seeds``; ``eval_dit.py`` samples each pipeline and computes the
   Frechet distance in the feature space of a small classifier trained here on real crops (a domain "Inception":
   Inception itself needs downloaded weights and was not trained on these photographs).
5. ``results.md`` (three tables, the plots) and ``results.json`` in ``--output_dir``; ``--results_dir`` also copies
   them with the plots they link to (the committed ``experiments/toy_reproduction/results/`` is such a copy).

Independent script runs go ``--jobs`` at a time (default 2) with the CPU threads split between them: on 2 cores
two one-thread runs of these small models finish sooner than one two-thread run after the other.

Generation numbers are reported as mean and standard deviation over seeds, with the seed-paired difference of each AE
to vanilla, its standard error and its 95% Student-t interval: the point is an honest answer, not a favourable one.
The interval covers the DiTs' seed-to-seed variation only; each stage I fine-tune is trained once.
"""

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from functools import partial

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "train_scripts")
sys.path.insert(0, ROOT)

from diffusability_hf.autoencoders import EMBEDDED_AE  # noqa: E402
from diffusability_hf.data import EMBEDDED_TRAIN_IMAGES, EmbeddedPhotoCrops  # noqa: E402
from diffusability_hf.hub import markdown_table  # noqa: E402

FULL = dict(
    ae_steps=300, eval_samples=256, spectrum_samples=256, latents=1024, dit="DiT-S/2", dit_steps=500, dit_batch=32,
    dit_lr=3e-4, fd_samples=256, sampling_steps=25, classifier_steps=600, seeds=(0, 1, 2),
)  # fmt: skip
SMOKE = dict(
    ae_steps=3, eval_samples=16, spectrum_samples=16, latents=64, dit="DiT-tiny/2", dit_steps=3, dit_batch=8,
    dit_lr=1e-3, fd_samples=16, sampling_steps=2, classifier_steps=5, seeds=(0, 1),
)  # fmt: skip
CUT_RATIOS = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
AES = ("vanilla", "ft", "ft-se")
LABELS = {"vanilla": "vanilla", "ft": "+FT", "ft-se": "+FT-SE"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smoke", action="store_true", help="A handful of steps per stage (about 1.5 minutes on 2 cores)."
    )
    parser.add_argument("--output_dir", type=str, default="toy_reproduction", help="Where everything goes.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Stage II seeds (default 0 1 2).")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="Independent script runs at once, the CPU threads split between them (default 2; --smoke: 3). Small "
        "models use 2 cores better as 2 one-thread runs than as one two-thread run.",
    )
    parser.add_argument(
        "--results_dir",
        type=str,
        default=None,
        help="Also copy the report (results.md, results.json and its plots) here, e.g. "
        "experiments/toy_reproduction/results.",
    )
    args = parser.parse_args()
    if args.seeds is not None and len(set(args.seeds)) < 2:
        parser.error("--seeds needs at least 2 different seeds to show a spread (the full run uses 0 1 2).")
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1.")
    return args


def run(script, *args, log, threads):
    """One toolkit script in a fresh process, offline, on ``threads`` CPU threads; its output goes to ``log``."""
    cmd = [sys.executable, os.path.join(SCRIPTS, script), *map(str, args)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg")
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))  # also from a plain checkout
    start = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode:
        with open(log) as fh:
            tail = fh.read()[-4000:]
        raise RuntimeError(f"{script} failed ({proc.returncode}); its log is {log}:\n{tail}")
    return time.time() - start


class DomainClassifier(nn.Module):
    """A small CNN over 64 px crops: 4 conv stages, global pooling, 128-d features (the FD feature space), a
    linear head for the source photograph."""

    def __init__(self, num_classes: int, width: int = 32, dim: int = 128):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, dim]
        layers = []
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class FeatureNet(nn.Module):
    """What ``eval_dit.py --feature_extractor`` calls: float ``[0, 1]`` images -> the classifier's features."""

    def __init__(self, classifier: DomainClassifier):
        super().__init__()
        self.features = classifier.features

    def forward(self, x):
        return self.features(x * 2 - 1)


def train_classifier(out, steps, resolution=64, batch=64):
    """Train on real crops of the training photographs (seed 7: not the crops of the DiT's data or the reference),
    report held-out accuracy (seed 8), export the feature network as TorchScript."""
    torch.manual_seed(0)
    train = EmbeddedPhotoCrops(resolution, num_samples=max(steps * batch, 64), seed=7, random_flip=True)
    test = EmbeddedPhotoCrops(resolution, num_samples=512, seed=8, random_flip=False)
    model = DomainClassifier(len(EMBEDDED_TRAIN_IMAGES))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    for step in range(steps):
        idx = range(step * batch, (step + 1) * batch)
        x, y = zip(*(train.crop(i % len(train)) for i in idx))
        loss = nn.functional.cross_entropy(model(torch.stack(x)), torch.tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x, y = zip(*(test.crop(i) for i in range(len(test))))
        acc = (model(torch.stack(x)).argmax(1) == torch.tensor(y)).float().mean().item()
    path = os.path.join(out, "domain_features.pt")
    torch.jit.script(FeatureNet(model)).save(path)
    return path, acc


def cpu_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def in_parallel(tasks, jobs, cores):
    """Run the callables (each takes its CPU thread count) with at most ``jobs`` at once, the ``cores`` split
    between them; when there are more tasks than jobs, the last one to start gets every core (it will mostly run
    alone). Re-raises a failure."""
    from concurrent.futures import ThreadPoolExecutor

    lock, started = threading.Lock(), itertools.count(1)
    share = max(1, cores // max(1, min(jobs, len(tasks))))

    def start(task):
        with lock:
            last = next(started) == len(tasks) > jobs
        return task(cores if last else share)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(start, t) for t in tasks]
        try:
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(cancel_futures=True)  # no queued run starts after a failure
            raise


def mean_std(values):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")


def compare_to_baseline(fd, baseline="vanilla"):
    """Per AE: mean and std (ddof 1) of its per-seed values, and the seed-paired difference to ``baseline`` with
    its standard error and a 95% Student-t interval (n - 1 degrees of freedom: with 3 seeds the interval is
    +-4.30 standard errors, not +-2). ``fd``: ``{ae: {seed: value}}`` over the same seeds."""
    from scipy import stats

    seeds = sorted(fd[baseline])
    base = np.array([fd[baseline][seed] for seed in seeds], dtype=np.float64)
    n = len(seeds)
    t = float(stats.t.ppf(0.975, n - 1)) if n > 1 else float("nan")
    summary = {}
    for name, values in fd.items():
        if sorted(values) != seeds:
            raise ValueError(f"{name} has seeds {sorted(values)}, {baseline} has {seeds}: they must be paired.")
        v = np.array([values[seed] for seed in seeds], dtype=np.float64)
        m, s = mean_std(v)
        row = {"fd_per_seed": dict(values), "mean": m, "std": s}
        if name != baseline:
            d_mean, d_std = mean_std(v - base)
            se = d_std / math.sqrt(n) if n > 1 else float("nan")
            low, high = d_mean - t * se, d_mean + t * se
            row.update(diff_vs_vanilla=d_mean, diff_std=d_std, diff_standard_error=se, diff_ci95=[low, high],
                       ci95_excludes_zero=bool(np.isfinite(se) and (low > 0 or high < 0)))  # fmt: skip
        summary[name] = row
    return summary


def main():
    args = parse_args()
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.seeds:
        cfg["seeds"] = tuple(dict.fromkeys(args.seeds))
    out = os.path.abspath(args.output_dir)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    cores = cpu_cores()
    jobs = args.jobs or (3 if args.smoke else 2)
    cfg.update(cores=cores, jobs=jobs)
    times, t0 = {}, time.time()
    models = {"vanilla": EMBEDDED_AE, "ft": os.path.join(out, "ae-ft"), "ft-se": os.path.join(out, "ae-ft-se")}
    specs = [f"{name}={models[name]}" for name in AES]

    # 1. Stage I: +FT and +FT-SE, identical but for the SE weight
    def fine_tune(name, weight, threads):
        shutil.rmtree(models[name], ignore_errors=True)
        times[f"stage1_{name}"] = run(
            "train_ae_se.py", "--output_dir", models[name], "--se_weight", weight, "--max_train_steps",
            cfg["ae_steps"], "--seed", 0, "--report_to", "none", log=os.path.join(logs, f"train_{name}.log"),
            threads=threads,
        )  # fmt: skip

    in_parallel([partial(fine_tune, "ft", 0.0), partial(fine_tune, "ft-se", 0.25)], jobs, cores)

    # 2-3. Reconstruction with the DCT cut, and spectra
    def eval_ae(threads):
        shutil.rmtree(os.path.join(out, "eval_ae"), ignore_errors=True)  # a rerun replaces the earlier results
        times["eval_ae"] = run(
            "eval_ae.py", "--models", *specs, "--metrics", "psnr", "ssim", "--num_samples", cfg["eval_samples"],
            "--dct_cut_ratios", *CUT_RATIOS, "--output_dir", os.path.join(out, "eval_ae"),
            log=os.path.join(logs, "eval_ae.log"), threads=threads,
        )  # fmt: skip

    def spectrum(threads):
        shutil.rmtree(os.path.join(out, "spectrum"), ignore_errors=True)
        times["spectrum"] = run(
            "analyze_spectrum.py", "--models", *specs, "--num_samples", cfg["spectrum_samples"], "--output_dir",
            os.path.join(out, "spectrum"), log=os.path.join(logs, "spectrum.log"), threads=threads,
        )  # fmt: skip

    in_parallel([eval_ae, spectrum], jobs, cores)

    # 4. Stage II: the domain feature network, latents per AE, then a DiT and its Frechet distance per AE and seed
    start = time.time()
    features, accuracy = train_classifier(out, cfg["classifier_steps"])
    times["classifier"] = time.time() - start
    latents = {name: os.path.join(out, f"latents-{name}") for name in AES}

    def extract(name, threads):
        shutil.rmtree(latents[name], ignore_errors=True)
        times[f"extract_{name}"] = run(
            "extract_latents.py", "--pretrained_model_name_or_path", models[name], "--max_samples", cfg["latents"],
            "--output_dir", latents[name], log=os.path.join(logs, f"extract_{name}.log"), threads=threads,
        )  # fmt: skip

    in_parallel([partial(extract, name) for name in AES], jobs, cores)
    fd = {name: {} for name in AES}

    def generate(name, seed, threads):
        dit = os.path.join(out, f"dit-{name}-seed{seed}")
        shutil.rmtree(dit, ignore_errors=True)
        times[f"dit_{name}_{seed}"] = run(
            "train_dit_flow.py", "--latents_dir", latents[name], "--pretrained_vae_model_name_or_path", models[name],
            "--model", cfg["dit"], "--stock_dit", "--max_train_steps", cfg["dit_steps"], "--train_batch_size",
            cfg["dit_batch"],
            "--learning_rate", cfg["dit_lr"], "--lr_warmup_steps", max(1, cfg["dit_steps"] // 10),
            "--validation_steps", cfg["dit_steps"], "--checkpointing_steps", cfg["dit_steps"],
            "--num_inference_steps", cfg["sampling_steps"], "--seed", seed, "--report_to", "none", "--output_dir",
            dit, log=os.path.join(logs, f"dit_{name}_{seed}.log"), threads=threads,
        )  # fmt: skip
        evaluation = os.path.join(out, f"eval-dit-{name}-seed{seed}")
        shutil.rmtree(evaluation, ignore_errors=True)
        times[f"eval_dit_{name}_{seed}"] = run(
            "eval_dit.py", "--pipeline", dit, "--num_samples", cfg["fd_samples"], "--num_inference_steps",
            cfg["sampling_steps"], "--class_sampling", "balanced", "--seed", seed, "--feature_extractor", features,
            "--stats_cache_dir", os.path.join(out, "reference_stats"), "--output_dir", evaluation,
            log=os.path.join(logs, f"eval_dit_{name}_{seed}.log"), threads=threads,
        )  # fmt: skip
        with open(os.path.join(evaluation, "metrics.json")) as fh:
            fd[name][seed] = next(iter(json.load(fh)["metrics"].values()))["value"]

    # seeds outermost: runs that share the machine at the same time are spread over the three AEs
    in_parallel([partial(generate, name, seed) for seed in cfg["seeds"] for name in AES], jobs, cores)
    compare_samples(out, cfg["seeds"][0])
    times["total"] = time.time() - t0
    write_results(out, cfg, fd, accuracy, times, args.smoke)
    if args.results_dir:
        publish(out, args.results_dir)


def compare_samples(out, seed, columns=14):
    """``samples.png``: real training crops and the first ``columns`` samples of each AE's DiT (seed ``seed``).
    Sample ``i`` has class ``i % 7`` in every row (balanced sampling) and the same starting noise for every AE."""
    import matplotlib.pyplot as plt
    from PIL import Image

    real = EmbeddedPhotoCrops(64, num_samples=columns, seed=0, random_flip=False)
    rows = {"real crops": [np.asarray((real.crop(i)[0].permute(1, 2, 0) + 1) / 2) for i in range(columns)]}
    for name in AES:
        folder = os.path.join(out, f"eval-dit-{name}-seed{seed}", "samples")
        rows[f"{LABELS[name]} DiT"] = [np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))) for i in
                                       range(columns)]  # fmt: skip
    fig, axes = plt.subplots(len(rows), columns, figsize=(columns, len(rows) + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c, image in enumerate(images):
            axes[r, c].imshow(image)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(EMBEDDED_TRAIN_IMAGES[c % len(EMBEDDED_TRAIN_IMAGES)], fontsize=6)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(os.path.join(out, "samples.png"), dpi=80)
    plt.close(fig)


REPORT = ("results.md", "results.json", "samples.png", "spectrum/spectrum.png", "eval_ae/dct_cut.png",
          "eval_ae/dct_cut_grid.png")  # fmt: skip


def publish(out, results_dir):
    """Copy the report and the plots it links to (paths relative to it, so the links keep working)."""
    for rel in REPORT:
        os.makedirs(os.path.dirname(os.path.join(results_dir, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(out, rel), os.path.join(results_dir, rel))


def portable(value, out):
    """``value`` ready for ``results.json``: the output folder's and the repository's absolute paths made relative
    to them, NaN and infinities as ``None`` (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: portable(v, out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, out) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str) and os.path.isabs(value):
        for base in (out, ROOT):
            if value == base or value.startswith(base + os.sep):
                return os.path.relpath(value, base)
    return value


def write_results(out, cfg, fd, accuracy, times, smoke):
    with open(os.path.join(out, "eval_ae", "metrics.json")) as fh:
        rec = json.load(fh)
    with open(os.path.join(out, "spectrum", "spectrum.json")) as fh:
        spec = json.load(fh)
    table4 = [
        [LABELS[n], f"{rec['models'][n]['psnr']['mean']:.2f} ± {rec['models'][n]['psnr']['ci95']:.2f}",
         f"{rec['models'][n]['ssim']['mean']:.4f} ± {rec['models'][n]['ssim']['ci95']:.4f}",
         f"{spec['models'][n]['hf_share']:.3f}"]
        for n in AES
    ]  # fmt: skip
    rgb_share = spec["rgb"][str(spec["models"]["vanilla"]["compression"])]["hf_share"]  # RGB at the latent size
    table4.append(["RGB at the latent size", "", "", f"{rgb_share:.3f}"])
    curves = rec["dct_cut"]["curves"]
    cut_rows = [
        [f"{100 * r:.0f}"] + [f"{curves[n][str(float(r))]['psnr']['mean']:.2f}" for n in AES] for r in CUT_RATIOS
    ]
    summary = compare_to_baseline(fd)
    table1 = []
    for name in AES:
        row = summary[name]
        diff = "" if name == "vanilla" else (
            f"{row['diff_vs_vanilla']:+.3f} ± {row['diff_standard_error']:.3f}; 95% CI "
            f"[{row['diff_ci95'][0]:+.3f}, {row['diff_ci95'][1]:+.3f}]" + (" excludes 0" if row["ci95_excludes_zero"]
                                                                          else ""))  # fmt: skip
        table1.append([
            LABELS[name], f"{row['mean']:.3f} ± {row['std']:.3f}",
            " / ".join(f"{row['fd_per_seed'][seed]:.3f}" for seed in cfg["seeds"]), diff,
        ])  # fmt: skip
    result = {
        "smoke": smoke,
        "settings": cfg,
        "domain_classifier_accuracy": accuracy,
        "reconstruction": {n: rec["models"][n] for n in AES},
        "spectrum": {"rgb_hf_share_latent_size": rgb_share, **{n: spec["models"][n]["hf_share"] for n in AES}},
        "dct_cut_psnr": {n: {r: curves[n][r]["psnr"]["mean"] for r in curves[n]} for n in AES},
        "generation": summary,
        "seconds": times,
    }
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(portable(result, out), fh, indent=2, default=str)
    lines = [
        "# Toy reproduction" + (" (smoke run: numbers are meaningless)" if smoke else ""),
        "",
        f"Stage I: {cfg['ae_steps']} fine-tuning steps per AE; Stage II: {cfg['dit']} for {cfg['dit_steps']} steps "
        f"on {cfg['latents']} latents per AE and seed, {cfg['fd_samples']} samples; "
        f"{time.strftime('%H:%M:%S', time.gmtime(times['total']))} in total on {cfg['cores']} CPU cores "
        f"({cfg['jobs']} script runs at a time).",
        "",
        "    python experiments/toy_reproduction/run.py" + (" --smoke" if smoke else ""),
        "",
        "## Reconstruction and spectrum (Table 4, Fig. 4)",
        "",
        markdown_table(table4, ["AE", "PSNR (dB)", "SSIM", "latent high-frequency share"]),
        "",
        "![spectrum](spectrum/spectrum.png)",
        "",
        "## DCT cut (Fig. 8): PSNR when the top share of latent zigzag coefficients is zeroed",
        "",
        markdown_table(cut_rows, ["cut (%)"] + [LABELS[n] for n in AES]),
        "",
        "![DCT cut](eval_ae/dct_cut.png)",
        "",
        f"## Generation (Table 1): Frechet distance in a domain classifier's features "
        f"(held-out accuracy {100 * accuracy:.1f}%), lower is better, over seeds {list(cfg['seeds'])}",
        "",
        markdown_table(table1, ["AE", "FD mean ± std", "per seed", "vs vanilla (paired mean ± SE; 95% CI)"]),
        "",
        "The difference to vanilla is paired by seed (same DiT seed, data order and sampling noise), given as mean ± "
        "standard error and a 95% Student-t interval over the seeds. It covers the DiTs' seed-to-seed variation "
        "only: each fine-tuned autoencoder was trained once.",
        "",
        f"![samples](samples.png) Real training crops and the first samples of each AE's DiT (seed "
        f"{cfg['seeds'][0]}): same class and starting noise in each column.",
        "",
    ]
    with open(os.path.join(out, "results.md"), "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
