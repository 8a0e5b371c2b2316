#!/usr/bin/env python
"""Step-time and memory overhead of the SE term (paper eq. 2) in one training step of train_ae_se.py.

Times the objective that train_ae_se.py trains with, ``diffusability_hf.losses.SEAutoencoderLoss`` (encode + decode
+ SE branch in one forward), then the scripts' own step ``diffusability_hf.training.steps.optimizer_step``
(backward, clipping at 50) with train_ae_se.py's AdamW, with ``se_weight=0.25`` and with ``se_weight=0`` side
by side (alternating, same process, same weights), for the
embedded autoencoder and a FLUX-sized ``AutoencoderKL`` (random init, FLUX.1's config). The paper counts +10.75% of
the FLOPs of an encode + decode for FluxAE at 256^2; our target is at most +15% step time.

    python benchmarks/bench_se_overhead.py --models embedded flux --resolution 256 --batch_size 1

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU, the peak RSS (``VmHWM``) of a fresh process that
runs two steps of one variant (model, optimizer state and activations included).
"""

import argparse
import subprocess
import sys
import time

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler

from diffusability_hf.autoencoders import EMBEDDED_AE
from diffusability_hf.losses import ReconstructionDistance, SEAutoencoderLoss
from diffusability_hf.training.steps import ae_adamw, optimizer_step, peak_memory_gb

FLUX_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def build(name):
    from diffusers import AutoencoderKL

    if name == "embedded":
        return AutoencoderKL.from_pretrained(EMBEDDED_AE)
    torch.manual_seed(0)
    return AutoencoderKL(**FLUX_VAE_CONFIG)


def peak_mb(device):
    """Peak memory in MiB: CUDA allocated, or the process's peak RSS (VmHWM: a child's ru_maxrss would start from
    its parent's peak)."""
    return peak_memory_gb(device) * 1024


def train_step(module, x, opt, schedule, scale_factor, device, bf16):
    """The objective, then the scripts' own optimizer step (backward, clipping at the script's 50, AdamW)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _ = module(x, None, scale_factor)  # (images, videos, scale factor) -> per-sample (B,)
    optimizer_step(loss.mean(), ACCELERATOR, module, opt, schedule, MAX_GRAD_NORM)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


VARIANTS = {"no SE": (0.0, 2), "SE x2": (0.25, 2), "SE x4": (0.25, 4)}  # (alpha, scale factor)
MAX_GRAD_NORM = 50.0  # the script's default clipping
ACCELERATOR = Accelerator()  # unprepared objects: its backward and clipping are the scripts'


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["embedded", "flux"], choices=["embedded", "flux"])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="Timed steps per variant (after one warm-up each).")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak_only", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    distance = ReconstructionDistance(mse_weight=1.0, lpips_weight=0.0)
    if args.peak_only is None:
        print(
            f"device={device} resolution={args.resolution} batch={args.batch_size} "
            f"precision={args.mixed_precision}; LPIPS off (needs a download), so d = MSE"
        )
    for name in args.models:
        vae = build(name).to(device)
        opt = ae_adamw(list(vae.parameters()), 1e-6)  # train_ae_se.py's optimizer
        schedule = get_scheduler("constant", opt)
        x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=device) * 2 - 1
        # The script's objective with its defaults (bilinear SE, posterior samples, no KL / CHF / soft penalty)
        modules = {
            variant: SEAutoencoderLoss(vae, distance, se_weight=alpha) for variant, (alpha, _) in VARIANTS.items()
        }

        def step(variant, modules=modules, x=x, opt=opt, schedule=schedule):
            bf16 = args.mixed_precision == "bf16"
            train_step(modules[variant], x, opt, schedule, VARIANTS[variant][1], device, bf16)

        if args.peak_only is not None:  # child process: peak RSS of one variant alone
            step(args.peak_only)
            step(args.peak_only)
            print(f"PEAK {peak_mb(device):.1f}")
            return
        peaks = {}
        for variant in ("no SE", "SE x2"):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                step(variant)
                peaks[variant] = peak_mb(device)
            else:  # a fresh process per variant: peak RSS only grows
                cmd = [sys.executable, __file__, "--models", name, "--resolution", str(args.resolution),
                       "--batch_size", str(args.batch_size), "--mixed_precision", args.mixed_precision,
                       "--device", "cpu", "--peak_only", variant]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                peaks[variant] = float(out.rsplit("PEAK", 1)[1])
        times = {v: [] for v in VARIANTS}
        for variant in VARIANTS:  # warm-up
            step(variant)
        for _ in range(args.steps):
            for variant in VARIANTS:  # interleaved so that drift hits every variant alike
                t0 = time.perf_counter()
                step(variant)
                times[variant].append(time.perf_counter() - t0)
        med = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
        over = {v: 100 * (med[v] / med["no SE"] - 1) for v in ("SE x2", "SE x4")}
        n = sum(p.numel() for p in vae.parameters()) / 1e6
        print(
            f"{name} ({n:.1f}M params), median of {args.steps}: no SE {med['no SE'] * 1e3:.1f} ms, "
            f"SE x2 {med['SE x2'] * 1e3:.1f} ms ({over['SE x2']:+.1f}%), SE x4 {med['SE x4'] * 1e3:.1f} ms "
            f"({over['SE x4']:+.1f}%); per-step overhead with the factor drawn from {{2, 4}}: "
            f"{(over['SE x2'] + over['SE x4']) / 2:+.1f}% (paper: +10.75% FLOPs, target <= 15%); "
            f"peak memory {peaks['no SE']:.0f} MB without SE, {peaks['SE x2']:.0f} MB with SE x2"
        )


if __name__ == "__main__":
    main()
