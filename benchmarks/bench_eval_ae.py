#!/usr/bin/env python
"""Throughput of ``train_scripts/eval_ae.py``: batched evaluation against a batch-1 loop, side by side.

Runs the script itself (``python train_scripts/eval_ae.py``) on ``--num_samples`` held-out crops of the embedded
photographs with the embedded ``AutoencoderKL``, once per ``--batch_sizes`` entry and repetition, alternating the
batch sizes within each repetition so that machine drift hits all of them alike. The figure is the script's own
``samples_per_second`` in ``metrics.json``: the per-batch work (encode, decode, PSNR, SSIM, LPIPS and, with
``--inception_weights``, the Inception features of the reconstructions), without loading or the originals'
features. LPIPS runs on a randomly initialised AlexNet trunk (same FLOPs as the pretrained one; the numbers are not
perceptual, only the time matters here). Wall time per run (process start to end) is reported too. No asserts.

    python benchmarks/bench_eval_ae.py
    python benchmarks/bench_eval_ae.py --resolution 128 --num_samples 128 --batch_sizes 1 8 32

Smoke test (about a minute):

    OMP_NUM_THREADS=1 python benchmarks/bench_eval_ae.py --num_samples 16 --repeats 1
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_eval(batch_size, args, workdir, trunk):
    out = os.path.join(workdir, f"bs{batch_size}-{time.monotonic_ns()}")
    cmd = [
        sys.executable, os.path.join(ROOT, "train_scripts", "eval_ae.py"), "--num_samples", str(args.num_samples),
        "--resolution", str(args.resolution), "--batch_size", str(batch_size), "--lpips_trunk_path", trunk,
        "--output_dir", out, "--metrics", "psnr", "ssim", "lpips",
    ]  # fmt: skip
    if args.inception_weights:
        cmd += ["fd", "--inception_weights", args.inception_weights]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    with open(os.path.join(out, "metrics.json")) as fh:
        (model,) = json.load(fh)["models"].values()
    return model["samples_per_second"], wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_samples", type=int, default=128, help="Crops evaluated per run.")
    parser.add_argument("--resolution", type=int, default=64, help="Crop side.")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16], help="Batch sizes to compare.")
    parser.add_argument("--repeats", type=int, default=3, help="Repetitions (medians are reported).")
    parser.add_argument("--inception_weights", type=str, default=None, help="Also time rFID with these weights.")
    args = parser.parse_args()

    import torchvision

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.num_samples} crops at "
        f"{args.resolution} px, embedded AutoencoderKL, metrics PSNR SSIM LPIPS{' rFID' if args.inception_weights else ''}"
    )
    rates = {b: [] for b in args.batch_sizes}
    walls = {b: [] for b in args.batch_sizes}
    with tempfile.TemporaryDirectory() as workdir:
        trunk = os.path.join(workdir, "alexnet.pth")
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), trunk)
        for r in range(args.repeats):
            for b in args.batch_sizes:
                rate, wall = run_eval(b, args, workdir, trunk)
                rates[b].append(rate)
                walls[b].append(wall)
                print(f"  repeat {r + 1}: batch {b:>3}: {rate:8.1f} samples/s, {wall:6.1f} s wall")
    base = statistics.median(rates[args.batch_sizes[0]])
    print(
        f"\n| batch size | samples/s (median of {args.repeats}) | vs batch {args.batch_sizes[0]} | wall s (median) |"
    )
    print("|---|---|---|---|")
    for b in args.batch_sizes:
        med = statistics.median(rates[b])
        print(f"| {b} | {med:.1f} | {med / base:.2f}x | {statistics.median(walls[b]):.1f} |")


if __name__ == "__main__":
    main()
