#!/usr/bin/env python
"""Step-time and memory overhead of the SE term (paper eq. 2) when fine-tuning video autoencoders on clips.

One training step on a clip batch of the objective train_ae_se.py trains with,
``diffusability_hf.losses.SEAutoencoderLoss``, on ``--video_batch_size`` clips: encode, posterior sample, decode,
MSE (LPIPS off: its trunk is a download), then ``alpha * scale_equivariance_loss`` with ``alpha = 0.25`` and
bilinear x2 or x4 spatial downsampling of every frame (no SE: ``se_weight=0``, the term is skipped), then the
scripts' own step ``diffusability_hf.training.steps.optimizer_step`` (backward, clipping at 50) with train_ae_se.py's
AdamW. The decoder's output layers
(``norm_out``, ``conv_out``) are frozen, the script's default for a pretrained video AE; random init, no download.

Every repetition runs each variant once, in turn (no SE, SE x2, SE x4, then the same three with
``vae.enable_gradient_checkpointing()``), so that machine drift hits every variant alike; the table gives median
step times. The paper draws the SE factor from {2, 4} once per step, so the SE overhead is the mean of the x2 and
x4 step times against no SE. Target: at most +15% (the paper counts +10.75% of the encode + decode FLOPs for its
FluxAE at 256^2; for videos the SE branch decodes every frame at 1/4 or 1/16 of the pixels). The FLOPs of each
variant (``torch.utils.flop_counter`` over the untimed warm-up steps: forward and backward) give the same ratio free
of machine noise and of per-operator overhead, which dominates the tiny models' step times.

Peak memory without and with gradient checkpointing: on CUDA ``torch.cuda.max_memory_allocated`` over one step
(weights, gradients, AdamW state and activations; after the timed steps). On CPU, a fresh process per configuration
builds the model, fills the AdamW state and runs one step; the cell gives its peak RSS (``VmHWM`` of
``/proc/self/status``, restarted just before the step) and, in brackets, the rise over the RSS before the step
(activations and gradients; the RSS before counts the interpreter, torch, diffusers, weights and AdamW state).
Not ``ru_maxrss``: a child's starts from its parent's peak (kept across fork and exec), so it would report the
benchmark process itself.

Models: ``tiny-<name>`` is ``diffusability_hf/assets/tiny_configs/<name>.json``; ``cogvideox-2b`` is the
THUDM/CogVideoX-2b VAE architecture (``AutoencoderKLCogVideoX`` defaults, 216M parameters). Defaults are sized for
2 CPU cores: 17 frames at 64^2 (batch 2) for the tiny model, 17 frames at 32^2 (batch 1) for
cogvideox-2b (at 64^2 one of its steps took ~75 s on 2 busy cores); about 6-9 minutes in all (``--repeats 2``
or ``--no_gc`` shorten it). CPU memory needs Linux (``/proc``). On a GPU, at training size:

    OMP_NUM_THREADS=2 python benchmarks/bench_video_se_overhead.py
    python benchmarks/bench_video_se_overhead.py --device cuda --resolution 256 --batch_size 1 --dtype bf16 \\
        --models cogvideox-2b tiny-cogvideox tiny-ltx tiny-wan

Prints figures only; it asserts nothing about them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from torch.utils.flop_counter import FlopCounterMode

from diffusability_hf import autoencoders as ae
from diffusability_hf.losses import ReconstructionDistance, SEAutoencoderLoss
from diffusability_hf.training.steps import ae_adamw, optimizer_step

TINY_DIR = os.path.join(os.path.dirname(ae.__file__), "assets", "tiny_configs")
TINY = sorted(f[: -len(".json")] for f in os.listdir(TINY_DIR) if f.endswith(".json"))
# THUDM/CogVideoX-2b's vae/config.json: the AutoencoderKLCogVideoX defaults, spelled out.
COGVIDEOX_2B_CONFIG = dict(
    _class_name="AutoencoderKLCogVideoX",
    in_channels=3,
    out_channels=3,
    down_block_types=["CogVideoXDownBlock3D"] * 4,
    up_block_types=["CogVideoXUpBlock3D"] * 4,
    block_out_channels=[128, 256, 256, 512],
    latent_channels=16,
    layers_per_block=3,
    act_fn="silu",
    norm_eps=1e-6,
    norm_num_groups=32,
    temporal_compression_ratio=4,
    sample_height=480,
    sample_width=720,
    scaling_factor=1.15258426,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
MODELS = ["cogvideox-2b"] + [f"tiny-{n}" for n in TINY]
# Per-model CPU defaults: (resolution, batch size); --resolution / --batch_size override them for every model.
DEFAULT_SIZE = {"cogvideox-2b": (32, 1)}
TINY_SIZE = (64, 2)

SE_WEIGHT = 0.25  # paper's alpha
MAX_GRAD_NORM = 50.0  # the script's default clipping
ACCELERATOR = Accelerator()  # unprepared objects: its backward and clipping are the scripts'
SCHEDULES = {}
VARIANTS = {"no SE": None, "SE x2": 2, "SE x4": 4}  # SE scale factor


def model_config(name):
    if name == "cogvideox-2b":
        return dict(COGVIDEOX_2B_CONFIG)
    return ae.read_config(os.path.join(TINY_DIR, name[len("tiny-") :] + ".json"))


def build(name, device):
    """Random-init model in training mode, decoder output layers frozen, and its AdamW optimizer."""
    config = model_config(name)
    torch.manual_seed(0)
    vae = ae.prepare_for_training(ae.model_class(config).from_config(config)).train()
    vae.requires_grad_(True)
    for module in ae.frozen_module_names(vae, 0, True):
        vae.get_submodule(module).requires_grad_(False)
    vae.to(device)  # fp32 weights, as the script keeps them
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = ae_adamw(params, 1e-6)  # train_ae_se.py's optimizer
    return vae, params, opt


def supports_gc(vae):
    return bool(getattr(vae, "_supports_gradient_checkpointing", False))


def set_gc(vae, on):
    if on:
        vae.enable_gradient_checkpointing()
    elif supports_gc(vae):
        vae.disable_gradient_checkpointing()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(vae, params, opt, x, scale_factor, gen, bf16):
    """One optimizer step of the SE objective on clips ``x`` (B, C, T, H, W); ``scale_factor`` None: no SE."""
    objective = SEAutoencoderLoss(
        vae, ReconstructionDistance(1.0, 0.0), se_weight=0.0 if scale_factor is None else SE_WEIGHT
    )
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, _ = objective(None, x, scale_factor or 2, generator=gen)  # (B,)
        loss = loss.mean()
    if opt not in SCHEDULES:  # the scripts' default: a constant learning rate
        SCHEDULES[opt] = get_scheduler("constant", opt)
    optimizer_step(loss, ACCELERATOR, objective, opt, SCHEDULES[opt], MAX_GRAD_NORM)  # the scripts' own step
    sync(x.device)


def fill_adam_state(params, opt):
    """Allocate AdamW's moments with a zero-gradient step, so that one measured step sees the steady-state memory."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def proc_status_mb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024  # kB


def reset_peak_rss():
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sizes(name, args):
    res, batch = DEFAULT_SIZE.get(name, TINY_SIZE)
    return args.resolution or res, args.batch_size or batch


def check_geometry(name, vae, res, frames):
    """None if the model takes clips of ``frames`` x ``res``^2 with SE x2 and x4, else why not."""
    try:
        ae.check_num_frames(vae, frames)
    except ValueError as err:
        return str(err)
    s = ae.spatial_compression(vae)
    if res % (4 * s):
        return f"--resolution {res} must be a multiple of {4 * s} ({s}x compression, then SE x4 on the latent)"
    smallest = ae.get_row(vae).min_latent_size
    if res // s // 4 < smallest:
        return f"--resolution {res}: SE x4 gives a {res // s // 4}-pixel latent, the decoder needs {smallest}"
    return None


def memory_child(args):
    """Child process (CPU): peak RSS of one (model, variant, checkpointing) configuration alone."""
    name, variant, gc = args.models[0], args._memory_child, bool(args._gc)
    device = torch.device("cpu")
    res, batch = sizes(name, args)
    vae, params, opt = build(name, device)
    set_gc(vae, gc)
    x = torch.rand(batch, 3, args.num_frames, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fill_adam_state(params, opt)
    before = proc_status_mb("VmRSS")
    reset = reset_peak_rss()  # else the peak may be one of the imports or of the model build
    train_step(vae, params, opt, x, VARIANTS[variant], torch.Generator().manual_seed(0), args.dtype == "bf16")
    print(f"PEAK {proc_status_mb('VmHWM'):.1f} BEFORE {before:.1f} RESET {int(reset)}")


def cpu_peaks(name, args, configs):
    """{(variant, gc): (peak MB, RSS before the step MB)}, one fresh process each."""
    res, batch = sizes(name, args)
    out = {}
    for variant, gc in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--models", name, "--resolution", str(res),
               "--batch_size", str(batch), "--num_frames", str(args.num_frames), "--dtype", args.dtype,
               "--device", "cpu", "--_memory_child", variant, "--_gc", str(int(gc))]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode:
            sys.stderr.write(run.stderr[-3000:])
            raise RuntimeError(f"memory child for {name} / {variant} / gc={gc} failed (exit {run.returncode})")
        fields = run.stdout.rsplit("PEAK", 1)[1].split()
        out[(variant, gc)] = (float(fields[0]), float(fields[2]))
        if fields[4] != "1":
            log(f"  {name}: /proc/self/clear_refs is not writable: the peak counts imports and model build too")
        log(f"  {name}: peak RSS {variant}{' + GC' if gc else ''}: {fields[0]} MB")
    return out


def cuda_peaks(vae, params, opt, x, args, configs, device):
    out = {}
    for variant, gc in configs:
        set_gc(vae, gc)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        gen = torch.Generator(device).manual_seed(0)
        train_step(vae, params, opt, x, VARIANTS[variant], gen, args.dtype == "bf16")
        out[(variant, gc)] = (torch.cuda.max_memory_allocated(device) / 2**20, before)
    set_gc(vae, False)
    return out


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def bench(name, args, device):
    """Timings, FLOPs and peaks of one model; ``{"name", "skipped": why}`` when the clip geometry does not fit."""
    res, batch = sizes(name, args)
    vae, params, opt = build(name, device)
    why = check_geometry(name, vae, res, args.num_frames)
    if why:
        return {"name": name, "skipped": why}
    n_params, gc_supported = sum(p.numel() for p in vae.parameters()), supports_gc(vae)
    gc_ok = gc_supported and not args.no_gc
    x = torch.rand(batch, 3, args.num_frames, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = x.to(device)
    bf16 = args.dtype == "bf16"
    configs = [(v, False) for v in VARIANTS] + ([(v, True) for v in VARIANTS] if gc_ok else [])
    times = {c: [] for c in configs}
    step_index = 0

    def step(variant, gc):
        nonlocal step_index
        set_gc(vae, gc)
        gen = torch.Generator(device).manual_seed(step_index)
        step_index += 1
        t0 = time.perf_counter()
        train_step(vae, params, opt, x, VARIANTS[variant], gen, bf16)
        return time.perf_counter() - t0

    t_start = time.perf_counter()
    flops = {}
    for variant in VARIANTS:  # warm-up (allocator, kernel selection, AdamW state), untimed: count its FLOPs
        with FlopCounterMode(display=False) as counter:
            ms = step(variant, False) * 1e3
        flops[variant] = counter.get_total_flops()
        log(f"  {name}: warm-up {variant}: {ms:.0f} ms, {flops[variant] / 1e9:,.1f} GFLOP")
    for rep in range(args.repeats):
        for config in configs:  # interleaved
            times[config].append(step(*config))
        log(f"  {name}: repetition {rep + 1}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s)")
    med = {c: statistics.median(t) * 1e3 for c, t in times.items()}

    mem_configs = [("no SE", False), ("SE x2", False)] + ([("no SE", True), ("SE x2", True)] if gc_ok else [])
    peaks = {}
    if not args.no_memory:
        if device.type == "cuda":
            peaks = cuda_peaks(vae, params, opt, x, args, mem_configs, device)
        else:
            del vae, params, opt  # the children need the memory more than we do
            peaks = cpu_peaks(name, args, mem_configs)
    return {"name": name, "params": n_params, "shape": (batch, 3, args.num_frames, res, res), "med": med,
            "flops": flops, "peaks": peaks, "gc": gc_ok, "gc_supported": gc_supported}  # fmt: skip


def overhead(med, gc):
    se = (med[("SE x2", gc)] + med[("SE x4", gc)]) / 2
    return se, 100 * (se / med[("no SE", gc)] - 1)


def fmt_peak(peaks, variant, gc):
    p = peaks.get((variant, gc))
    if p is None:
        return "-"
    return f"{p[0]:,.0f}" if p[1] is None else f"{p[0]:,.0f} (+{p[0] - p[1]:,.0f})"


def report(results, args, device):
    mem_kind = (
        "torch.cuda.max_memory_allocated over one step (rise over the memory allocated before the step)"
        if device.type == "cuda"
        else "peak RSS of a fresh process over one step (rise over the RSS before the step)"
    )
    header = [
        "model",
        "params",
        "input (B, C, T, H, W)",
        "no SE ms/step",
        "SE x2 ms/step",
        "SE x4 ms/step",
        "SE overhead",
        "SE FLOPs overhead",
        "peak MB no SE / SE x2",
        "peak MB with GC no SE / SE x2",
        "with GC ms/step no SE / SE x2 / SE x4",
        "SE overhead with GC",
    ]
    rows, notes = [], []
    for r in results:
        if "skipped" in r:
            notes.append(f"{r['name']}: skipped: {r['skipped']}")
            continue
        med, peaks = r["med"], r["peaks"]
        se, over = overhead(med, False)
        flops = r["flops"]
        flop_over = 100 * ((flops["SE x2"] + flops["SE x4"]) / 2 / flops["no SE"] - 1)
        verdict = "within" if over <= 15 else "ABOVE"
        notes.append(
            f"{r['name']}: SE overhead {over:+.1f}% step time (mean of x2 and x4 {se:.0f} ms vs "
            f"{med[('no SE', False)]:.0f} ms), {verdict} the <= 15% target; {flop_over:+.1f}% FLOPs "
            f"({flops['no SE'] / 1e9:,.1f} GFLOP per step without SE)"
        )
        if r["gc"]:
            gc_ms = " / ".join(f"{med[(v, True)]:.0f}" for v in VARIANTS)
            gc_over = f"{overhead(med, True)[1]:+.1f}%"
            gc_cost = 100 * (med[("no SE", True)] / med[("no SE", False)] - 1)
            notes.append(f"{r['name']}: gradient checkpointing costs {gc_cost:+.1f}% step time without SE")
        else:
            gc_ms = gc_over = "n/a"
            why = (
                "no gradient checkpointing in diffusers"
                if not r["gc_supported"]
                else "checkpointing skipped (--no_gc)"
            )
            notes.append(f"{r['name']}: {why}")
        before = sorted({round(p[1]) for p in peaks.values() if p[1] is not None})
        if before:
            span = f"{before[0]:,}" + (f"-{before[-1]:,}" if len(before) > 1 else "")
            cuda = device.type == "cuda"
            what = "memory allocated" if cuda else "process RSS"
            parts = "weights, AdamW state, input" + ("" if cuda else ", interpreter, libraries")
            notes.append(f"{r['name']}: {what} before the measured step ({parts}): {span} MB")
        rows.append(
            [
                r["name"],
                f"{r['params'] / 1e6:.1f}M",
                "x".join(map(str, r["shape"])),
                f"{med[('no SE', False)]:.0f}",
                f"{med[('SE x2', False)]:.0f}",
                f"{med[('SE x4', False)]:.0f}",
                f"{over:+.1f}%",
                f"{flop_over:+.1f}%",
                f"{fmt_peak(peaks, 'no SE', False)} / {fmt_peak(peaks, 'SE x2', False)}",
                f"{fmt_peak(peaks, 'no SE', True)} / {fmt_peak(peaks, 'SE x2', True)}" if r["gc"] else "n/a",
                gc_ms,
                gc_over,
            ]
        )
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(
        f"Median of {args.repeats} interleaved steps per variant (after one warm-up step each); SE overhead = mean "
        f"of the SE x2 and SE x4 step times vs no SE (the factor is drawn from {{2, 4}} per step); FLOPs: "
        f"torch.utils.flop_counter over the warm-up steps (forward + backward, no checkpointing); peak memory: "
        f"{mem_kind}{'' if not args.no_memory else ' (skipped: --no_memory)'}."
    )
    for note in notes:
        print(f"- {note}")


def describe_env(device, args):
    import diffusers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    threads = f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else ""
    omp = os.environ.get("OMP_NUM_THREADS")
    return (
        f"device={device} ({where}{threads}{f', OMP_NUM_THREADS={omp}' if omp else ''}), dtype={args.dtype}"
        f"{' (autocast, fp32 weights)' if args.dtype == 'bf16' else ''}, frames={args.num_frames}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-cogvideox", "cogvideox-2b"], choices=MODELS)
    parser.add_argument(
        "--resolution", type=int, default=None, help="Square frame side for every model (default: 64 tiny, 32 2b)."
    )
    parser.add_argument("--num_frames", type=int, default=17)
    parser.add_argument("--batch_size", type=int, default=None, help="Clips per step (default: 2 tiny, 1 2b).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repetitions (each runs every variant once).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast, fp32 weights.")
    parser.add_argument("--no_gc", action="store_true", help="Skip the gradient-checkpointing variants.")
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory measurements.")
    parser.add_argument("--_memory_child", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--_gc", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory_child is not None:
        memory_child(args)
        return
    device = torch.device(args.device)
    omp = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={omp} " if omp else "") + shlex.join(
        ["python", os.path.relpath(__file__)] + sys.argv[1:]
    )
    print(f"$ {command}")
    print(describe_env(device, args))
    results = []
    t0 = time.perf_counter()
    for name in args.models:
        log(f"{name} ...")
        try:
            results.append(bench(name, args, device))
        except (RuntimeError, ValueError, NotImplementedError) as err:  # e.g. bf16 autocast ops missing on CPU
            log(f"{name} failed: {type(err).__name__}: {err}")
            results.append({"name": name, "skipped": f"failed: {type(err).__name__}: {str(err)[:200]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report(results, args, device)
    print(f"\nTotal wall time {time.perf_counter() - t0:.0f} s.")


if __name__ == "__main__":
    main()
