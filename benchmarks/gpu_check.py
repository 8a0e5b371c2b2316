#!/usr/bin/env python
"""One-GPU check of the toolkit's training paths: step time, throughput and peak memory in one markdown table.

Sized to run in at most 5 minutes on one NVIDIA H200 (``--budget_s``), downloading nothing. One row per measurement:

* (a) ``AE FLUX ...``: one SE fine-tuning step of a FLUX-sized ``diffusers.AutoencoderKL`` (random init, FLUX.1's
  VAE config) with the objective ``train_ae_se.py`` trains, ``diffusability_hf.losses.SEAutoencoderLoss`` (encode,
  posterior sample, decode, ``d`` = MSE + LPIPS with a **random-init** AlexNet trunk (the pretrained one is a
  download; the linear heads ship with ``lpips``), SE branch), backward, clipping at 50, AdamW (0.9, 0.99), EMA
  update; decoder output layers and one up-block frozen (Table 5's FluxAE). Three rows, ``se_weight`` 0 ("no SE"),
  SE x2 and SE x4, timed interleaved on the same weights. The SE rows give the step-time overhead next to the
  FLOPs overhead counted on the ``meta`` device for the full FLUX AE at 256^2, batch 1 (forward, as the paper counts
  it: +17% for x2, +4.5% for x4, +10.75% for the factor drawn from {2, 4}; paper App. B).
* (b) ``Video AE CogVideoX ...``: the same objective on clips (SE x2, per frame) of ``AutoencoderKLCogVideoX`` with
  its default config (CogVideoX-2b's VAE, random init), clips only (no joint image batch), clipping at 1 (Table 5).
  17 frames at 256^2; on OOM it retries at 128^2 and says so.
* (c) ``DiT-B/2`` and ``DiT-XL/2``: one flow-matching step of the DiT ``train_dit_flow.py`` builds by default
  (``models.factory.transformer_config`` + ``build_transformer``: App. B's DiT, RoPE, self-conditioning 0.9) on FLUX-AE
  latents of 256 px images (16 x 32 x 32), 1000 classes, ``flow.FlowMatchingLoss``, clipping at 16, AdamW, EMA.
* (d) ``FSDP train_ae_se.py`` / ``FSDP train_dit_flow.py``: each script run for 3 steps (a checkpoint at step 2,
  the final save) through ``accelerate launch --config_file accelerate_configs/fsdp.yaml --num_processes 1`` on
  embedded data (the embedded AE and photographs; for the DiT, a folder of generated images encoded on the fly) as a
  subprocess with a timeout: ok / failed, wall time, the last error line, and the peak memory the script logs.

Mixed precision as the scripts run it: fp32 weights under bf16 autocast (``--dtype``). Step times are medians of
``--steps`` timed steps after ``--warmup`` warm-up steps (fewer when a row's time share runs out; the row says how
many); throughput is the batch over that median; peak memory is ``torch.cuda.max_memory_allocated`` reset before
each row (weights, gradients, AdamW state and activations). Every row is isolated: an error, an OOM or its time
share running out is its status, and the other rows still run. Rows are printed as they finish.

With no CUDA device, or ``--tiny``, every row runs at tiny sizes in float32 on the CPU in seconds (peak memory is then
the process's peak RSS, reset per row; the SE FLOPs are the tiny AE's unless ``--full_size_flops``), and the FSDP rows
are skipped (accelerate's FSDP needs an accelerator device) unless ``--fsdp run``; tests/test_gpu_check.py runs it
that way. Prints figures only: nothing is asserted
about them.

    bash benchmarks/gpu_check.sh                 # on the GPU machine
    bash benchmarks/gpu_check.sh --tiny          # anywhere, seconds
"""

import time

T0 = time.monotonic()  # the budget counts the imports too

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FSDP_CONFIG = os.path.join(ROOT, "accelerate_configs", "fsdp.yaml")
TINY_DIR = os.path.join(ROOT, "diffusability_hf", "assets", "tiny_configs")

# FLUX.1's VAE (black-forest-labs/FLUX.1-dev, subfolder vae): 83.8M parameters, 8x, 16 latent channels.
FLUX_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    mid_block_add_attention=True,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
# The same architecture, shrunk for the CPU fallback (4 blocks, mid attention, 16 latent channels).
TINY_FLUX_VAE_CONFIG = dict(FLUX_VAE_CONFIG, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
TINY_AE_RESOLUTION = 32  # 4x4 latents: the x4 SE branch decodes 1x1

PAPER_SE_FLOPS = {2: 17.0, 4: 4.5, "mean": 10.75}  # % of the FluxAE encode + decode forward FLOPs at 256^2 (App. B)
SE_ALPHA = 0.25
HEADER = ["row", "shape x batch", "dtype", "step ms (median)", "throughput", "peak mem GB", "status", "notes"]


# ------------------------------------------------------------------------------------------------------ plumbing


@dataclass
class Row:
    """One line of the table; ``status`` None until measured (a group that fails fills it with its error)."""

    name: str
    shape: str
    dtype: str
    step_ms: Optional[float] = None
    steps: Optional[int] = None
    throughput: Optional[float] = None
    unit: str = "img/s"
    peak_gb: Optional[float] = None
    status: Optional[str] = None
    notes: List[str] = field(default_factory=list)

    def cells(self) -> List[str]:
        step = "n/a" if self.step_ms is None else f"{self.step_ms:.1f} (n={self.steps})"
        thr = "n/a" if self.throughput is None else f"{self.throughput:.3g} {self.unit}"
        peak = "n/a" if self.peak_gb is None else f"{self.peak_gb:.2f}"
        cells = [self.name, self.shape, self.dtype, step, thr, peak, self.status or "not run", "; ".join(self.notes)]
        return [c.replace("|", "/").replace("\n", " ") for c in cells]


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def hard_timeout(seconds: float):
    """Raise :class:`RowTimeout` in the main thread after ``seconds`` (SIGALRM; checked between CUDA calls)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise RowTimeout(f"timeout after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """CUDA: reset the allocator's peak; CPU: reset the process's peak RSS (VmHWM) through /proc/self/clear_refs."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_gb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB -> GiB
    except (OSError, StopIteration):
        return None


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_status(err: BaseException) -> str:
    if isinstance(err, RowTimeout):
        return str(err)
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "OOM"
    line = (str(err).strip().splitlines() or [""])[0]
    return f"error: {type(err).__name__}: {line[:200]}"


@dataclass
class Context:
    device: torch.device
    tiny: bool
    amp: bool  # bf16 autocast over fp32 weights
    warmup: int
    steps: int
    ae_batch: int
    video_batch: int
    video_frames: int
    video_sizes: List[int]
    dit_batch: int
    fsdp: str
    fsdp_timeout_s: float
    full_size_flops: bool
    keep: bool
    verbose: bool
    deadline: float = math.inf  # soft: stop timing more steps after this (time.monotonic())

    @property
    def dtype_name(self) -> str:
        return "bf16 autocast, fp32 weights" if self.amp else "fp32"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


def time_steps(ctx: Context, steps: Dict[str, Callable[[], torch.Tensor]], rows: Dict[str, Row]) -> None:
    """Warm up each variant (its peak memory measured from a reset), then time the variants interleaved (so that drift
    hits them alike) until ``ctx.steps`` each or the soft deadline; fills step time, step count, peak and status."""
    for key, step in steps.items():
        reset_peak(ctx.device)
        for _ in range(ctx.warmup):
            loss = step()
        sync(ctx.device)
        rows[key].peak_gb = peak_gb(ctx.device)
        if not torch.isfinite(loss).all():
            rows[key].status = "non-finite loss"
    times = {key: [] for key in steps}
    for i in range(ctx.steps):
        if i > 0 and time.monotonic() > ctx.deadline:
            break
        for key, step in steps.items():
            t0 = time.perf_counter()
            step()
            sync(ctx.device)
            times[key].append(time.perf_counter() - t0)
    for key, values in times.items():
        row = rows[key]
        row.step_ms, row.steps = 1e3 * statistics.median(values), len(values)
        row.status = row.status or "ok"


def fmt_pct(x: float) -> str:
    return f"{x:+.1f}%"


# ------------------------------------------------------------------------------------------------------ (a) SE AE


def se_flops(config: dict = FLUX_VAE_CONFIG, resolution: int = 256) -> Dict[object, float]:
    """Forward FLOPs (%) the SE branch adds to encode + decode of an ``AutoencoderKL`` (default: the full FLUX AE at
    256^2), batch 1, counted on the meta device (no memory, no compute), as the paper counts them (App. B: 447
    GFLOPs, 136 encoder / 311 decoder)."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from diffusability_hf.losses import ReconstructionDistance, SEAutoencoderLoss

    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    x = torch.empty(1, 3, resolution, resolution, device="meta")
    flops = {}
    for key, (alpha, factor) in {"none": (0.0, 2), 2: (SE_ALPHA, 2), 4: (SE_ALPHA, 4)}.items():
        objective = SEAutoencoderLoss(vae, ReconstructionDistance(1.0, 0.0), se_weight=alpha)
        with FlopCounterMode(display=False) as counter:
            objective(x, None, factor)
        flops[key] = counter.get_total_flops()
    out = {k: 100 * (flops[k] / flops["none"] - 1) for k in (2, 4)}
    out["mean"] = (out[2] + out[4]) / 2
    out["gmac"] = flops["none"] / 2e9  # multiply-accumulates, the paper's (fvcore's) "FLOPs"
    return out


def lpips_distance(device):
    """d = MSE + LPIPS with a random-init AlexNet trunk (offline), or MSE only when ``lpips`` is not installed."""
    from diffusability_hf.losses import ReconstructionDistance, load_lpips

    try:
        model = load_lpips("alex", pretrained_trunk=False)
        return ReconstructionDistance(1.0, 1.0, lpips_model=model).to(device), "d = MSE + LPIPS (random-init alex)"
    except ImportError as err:
        return ReconstructionDistance(1.0, 0.0), f"d = MSE only ({err})"


def group_ae(ctx: Context, rows: Dict[str, Row]) -> None:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL
    from diffusers.optimization import get_scheduler

    from diffusability_hf import autoencoders as ae
    from diffusability_hf.losses import SEAutoencoderLoss
    from diffusability_hf.training.ema import EMA
    from diffusability_hf.training.presets import SE_PRESETS
    from diffusability_hf.training.steps import ae_adamw, optimizer_step

    preset = SE_PRESETS["flux"]
    res, b = (TINY_AE_RESOLUTION, ctx.ae_batch) if ctx.tiny else (256, ctx.ae_batch)
    torch.manual_seed(0)
    with ctx.device:  # initialised where it trains (seconds saved for the big models)
        vae = ae.prepare_for_training(AutoencoderKL(**(TINY_FLUX_VAE_CONFIG if ctx.tiny else FLUX_VAE_CONFIG)))
    ae.freeze_for_fine_tuning(vae, preset["num_frozen_up_blocks"], True, False)
    vae.to(ctx.device, dtype=torch.float32).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = ae_adamw(params, preset["learning_rate"])  # train_ae_se.py's optimizer
    schedule, accelerator = get_scheduler("constant", opt), Accelerator()
    ema = EMA(params, 5000.0, 0.05)
    distance, d_note = lpips_distance(ctx.device)
    x = torch.rand(b, 3, res, res, generator=torch.Generator().manual_seed(0)).to(ctx.device) * 2 - 1
    variants = {"no SE": (0.0, 2), "SE x2": (SE_ALPHA, 2), "SE x4": (SE_ALPHA, 4)}
    objectives = {k: SEAutoencoderLoss(vae, distance, se_weight=a) for k, (a, _) in variants.items()}
    counter = [0]

    def make_step(key):
        def step():
            counter[0] += 1
            gen = torch.Generator(ctx.device).manual_seed(counter[0])
            with ctx.autocast():
                loss, _ = objectives[key](x, None, variants[key][1], generator=gen)  # (B,)
                loss = loss.mean()
            optimizer_step(loss, accelerator, objectives[key], opt, schedule, preset["max_grad_norm"])  # the scripts'
            ema.update(params, counter[0])
            return loss.detach()

        return step

    keys = {f"AE FLUX {k}": k for k in variants}
    time_steps(ctx, {name: make_step(k) for name, k in keys.items()}, rows)
    for name in keys:
        rows[name].throughput = b / (rows[name].step_ms / 1e3)
    n_params = sum(p.numel() for p in vae.parameters()) / 1e6
    rows["AE FLUX no SE"].notes += [f"{n_params:.1f}M params ({len(params)} trainable tensors)", d_note]
    full = not ctx.tiny or ctx.full_size_flops
    where = "FLUX AE 256^2" if full else f"this tiny AE {res}^2"
    try:
        flops = se_flops(*((FLUX_VAE_CONFIG, 256) if full else (TINY_FLUX_VAE_CONFIG, res)))
    except Exception as err:  # the FLOPs are a note: their failure does not fail the timed rows
        flops = None
        rows["AE FLUX SE x2"].notes.append(f"FLOP count failed: {error_status(err)}")
    base = rows["AE FLUX no SE"].step_ms
    over = {f: 100 * (rows[f"AE FLUX SE x{f}"].step_ms / base - 1) for f in (2, 4)}
    for f in (2, 4):
        note = f"step time {fmt_pct(over[f])} vs no SE"
        if flops is not None:
            note += f"; fwd FLOPs {fmt_pct(flops[f])} ({where}, meta count; paper {PAPER_SE_FLOPS[f]:+.1f}%)"
        rows[f"AE FLUX SE x{f}"].notes.append(note)
    mean = (over[2] + over[4]) / 2
    note = f"factor drawn from {{2, 4}}: step time {fmt_pct(mean)}"
    if flops is not None:
        note += f", fwd FLOPs {fmt_pct(flops['mean'])} vs the paper's +10.75% bound ({flops['gmac']:.4g} GMAC no SE)"
    rows["AE FLUX SE x4"].notes.append(note)
    if ctx.tiny:
        rows["AE FLUX no SE"].notes.append("tiny: FLUX architecture at (8, 8, 16, 16) channels")


# -------------------------------------------------------------------------------------------------- (b) video AE


def cogvideox_config(tiny: bool) -> dict:
    from diffusability_hf import autoencoders as ae

    if tiny:
        return ae.read_config(os.path.join(TINY_DIR, "cogvideox.json"))
    return {"_class_name": "AutoencoderKLCogVideoX"}  # the class defaults: THUDM/CogVideoX-2b's VAE


def group_video(ctx: Context, rows: Dict[str, Row]) -> None:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from diffusability_hf import autoencoders as ae
    from diffusability_hf.losses import ReconstructionDistance, SEAutoencoderLoss
    from diffusability_hf.training.ema import EMA
    from diffusability_hf.training.presets import SE_PRESETS
    from diffusability_hf.training.steps import ae_adamw, optimizer_step

    (name,) = rows
    row = rows[name]
    preset = SE_PRESETS["cogvideox"]
    config = cogvideox_config(ctx.tiny)
    torch.manual_seed(0)
    with ctx.device:
        vae = ae.prepare_for_training(ae.model_class(config).from_config(config))
    ae.freeze_for_fine_tuning(vae, 0, True, False)
    vae.to(ctx.device, dtype=torch.float32).train()
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = ae_adamw(params, preset["learning_rate"])  # train_ae_se.py's optimizer
    schedule, accelerator = get_scheduler("constant", opt), Accelerator()
    ema = EMA(params, 5000.0, 0.05)
    # LPIPS per frame costs little next to the 3D convolutions; MSE keeps this row about the autoencoder
    objective = SEAutoencoderLoss(vae, ReconstructionDistance(1.0, 0.0), se_weight=SE_ALPHA)
    counter, failed = [0], []
    for res in ctx.video_sizes:
        b, t = ctx.video_batch, ctx.video_frames
        x = torch.rand(b, 3, t, res, res, generator=torch.Generator().manual_seed(0)).to(ctx.device) * 2 - 1

        def step(x=x):
            counter[0] += 1
            gen = torch.Generator(ctx.device).manual_seed(counter[0])
            with ctx.autocast():
                loss, _ = objective(None, x, 2, generator=gen)  # clips only: (B,)
                loss = loss.mean()
            optimizer_step(loss, accelerator, objective, opt, schedule, preset["max_grad_norm"])  # the scripts' step
            ema.update(params, counter[0])
            return loss.detach()

        try:
            time_steps(ctx, {name: step}, rows)
        except Exception as err:
            if error_status(err) != "OOM" or res == ctx.video_sizes[-1]:
                raise
            failed.append(res)
            row.status = row.peak_gb = None
            del x, step, err
            opt.zero_grad(set_to_none=True)
            free_memory(ctx.device)
            continue
        row.shape = f"{b}x3x{t}x{res}x{res}"
        row.throughput = b / (row.step_ms / 1e3)
        break
    n_params = sum(p.numel() for p in vae.parameters()) / 1e6
    row.notes.append(f"{n_params:.1f}M params; SE x2 per frame, d = MSE, clips only")
    if failed:
        row.notes.append("OOM at " + ", ".join(f"{r}^2" for r in failed) + f"; measured at {res}^2")
    if ctx.tiny:
        row.notes.append("tiny: assets/tiny_configs/cogvideox.json")


# ---------------------------------------------------------------------------------------------------------- (c) DiT


def group_dit(ctx: Context, rows: Dict[str, Row], model_name: str) -> None:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from torch.utils.flop_counter import FlopCounterMode

    from diffusability_hf.flow import FlowMatchingLoss
    from diffusability_hf.models.factory import build_transformer, transformer_config
    from diffusability_hf.training.ema import EMA
    from diffusability_hf.training.steps import optimizer_step

    (name,) = rows
    row = rows[name]
    channels, size, classes = (16, 8, 10) if ctx.tiny else (16, 32, 1000)
    used = "DiT-tiny/2" if ctx.tiny else model_name
    config = transformer_config((channels, size, size), classes, used)
    torch.manual_seed(0)
    with ctx.device:
        transformer = build_transformer(config).to(ctx.device).train()  # train_dit_flow.py's default: App. B's DiT
    objective = FlowMatchingLoss(transformer, classes, class_dropout_prob=0.1, self_conditioning_prob=0.9)
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.99), weight_decay=0.01)
    schedule, accelerator = get_scheduler("constant", opt), Accelerator()
    ema = EMA(params, 6931.0, 0.05)
    b = ctx.dit_batch
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, channels, size, size, generator=g).to(ctx.device)
    labels = torch.randint(0, classes, (b,), generator=g).to(ctx.device)
    counter = [0]

    def step():
        counter[0] += 1
        gen = torch.Generator(ctx.device).manual_seed(counter[0])
        with ctx.autocast():
            loss = objective(x0, labels, gen).mean()
        optimizer_step(loss, accelerator, objective, opt, schedule, 16.0)  # the scripts' step
        ema.update(params, counter[0])
        return loss.detach()

    time_steps(ctx, {name: step}, rows)
    row.throughput = b / (row.step_ms / 1e3)
    # Model FLOPs of one step: the no-grad self-conditioning pass + forward + backward (= 4 forwards), from one
    # forward of one latent counted on the meta device
    with torch.device("meta"):
        meta_model = build_transformer(config)
    with FlopCounterMode(display=False) as counter_mode, torch.no_grad():
        meta_model(torch.empty(1, channels, size, size, device="meta"), torch.zeros(1, device="meta"),
                   torch.zeros(1, dtype=torch.long, device="meta"))  # fmt: skip
    step_flops = 4 * counter_mode.get_total_flops() * b
    tflops = step_flops / (row.step_ms / 1e3) / 1e12
    n_params = sum(p.numel() for p in params) / 1e6
    row.notes.append(
        f"{type(transformer).__name__} {used}, {n_params:.1f}M params, {(size // 2) ** 2} tokens, self-cond 0.9; "
        f"~{tflops:.3g} TFLOP/s model FLOPs (4 forwards per step)"
    )


# --------------------------------------------------------------------------------------------------------- (d) FSDP


def last_error_line(text: str) -> str:
    """The line that says what went wrong: the last ``error: ...`` line (the scripts' one-line refusals), else the
    last line naming an Error/Exception, else the last non-empty line; tqdm's carriage returns are dropped."""
    lines = [ln.rsplit("\r", 1)[-1].strip() for ln in text.replace("\r\n", "\n").split("\n")]
    lines = [ln for ln in lines if ln]
    for pattern in (r"^error: ", r"(Error|Exception)\b"):
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return hits[-1][:240]
    return lines[-1][:240] if lines else ""


def run_subprocess(cmd: List[str], timeout_s: float, env: Optional[dict] = None, cwd: str = ROOT) -> dict:
    """Run ``cmd`` in its own process group (all of it is killed on timeout); returns rc, wall, output, timed_out."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout_s))
        timed_out = False
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        timed_out = True
    except BaseException:  # interrupted (SIGTERM from gpu_check.sh's hard timeout, Ctrl-C): leave no launcher behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    return {"rc": proc.returncode, "wall": time.monotonic() - t0, "output": out or "", "timed_out": timed_out}


def describe_run(result: dict, row: Row, written: Optional[str]) -> None:
    """Status, wall time, last error line and the logged peak memory of a script run, into ``row``."""
    out = result["output"]
    peaks = re.findall(r"Peak memory: ([0-9.]+) GiB", out)
    if peaks:
        row.peak_gb = float(peaks[-1])
    if result["timed_out"]:
        row.status = f"timeout ({result['wall']:.0f} s)"
    elif result["rc"] != 0:
        row.status = f"failed (exit {result['rc']})"
    elif written is not None and not os.path.exists(written):
        row.status = f"failed: exit 0 but no {os.path.basename(written)}"
    else:
        row.status = "ok"
    row.notes.append(f"wall {result['wall']:.1f} s")
    if row.status != "ok":
        row.notes.append(f"last error line: {last_error_line(out) or '(no output)'}")


def script_env() -> dict:
    return dict(
        os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DIFFUSERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1", WANDB_MODE="disabled", MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip


def fsdp_launch(script: str, args: List[str]) -> List[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", FSDP_CONFIG,
            "--num_processes", "1", os.path.join(ROOT, "train_scripts", script), *args]  # fmt: skip


def write_class_folder(folder: str, classes: int = 2, per_class: int = 8, size: int = 64) -> str:
    """A tiny image folder (one subfolder per class) of smooth random colour images, for on-the-fly encoding."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(os.path.join(folder, f"class_{c}"), exist_ok=True)
        for i in range(per_class):
            coarse = rng.random((4, 4, 3)) * 255
            img = Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.BILINEAR)
            img.save(os.path.join(folder, f"class_{c}", f"{i}.png"))
    return folder


def fsdp_commands(ctx: Context, work: str) -> Dict[str, tuple]:
    """name -> (command, the file a successful run writes, shape)."""
    steps = [
        "--max_train_steps",
        "3",
        "--checkpointing_steps",
        "2",
        "--validation_steps",
        "1000",
        "--report_to",
        "none",
    ]
    ae_out, dit_out = os.path.join(work, "ae"), os.path.join(work, "dit")
    ae_args = ["--output_dir", ae_out, "--resolution", "64", "--train_batch_size", "4", "--lpips_weight", "0",
               "--num_validation_images", "2", "--latent_stats_num_samples", "8", *steps]  # fmt: skip
    images = os.path.join(work, "images")
    dit_args = ["--output_dir", dit_out, "--train_data_dir", images, "--resolution", "64", "--stats_batches", "1",
                "--model", "DiT-tiny/2" if ctx.tiny else "DiT-S/2", "--train_batch_size", "4",
                "--num_inference_steps", "2", "--lr_warmup_steps", "1", *steps]  # fmt: skip
    return {
        "FSDP train_ae_se.py": (fsdp_launch("train_ae_se.py", ae_args), os.path.join(ae_out, "config.json"),
                                "3 steps x 4 img 64^2 (embedded AE)"),
        "FSDP train_dit_flow.py": (fsdp_launch("train_dit_flow.py", dit_args), os.path.join(dit_out, "model_index.json"),
                                   "3 steps x 4 img 64^2, on the fly"),
    }  # fmt: skip


def group_fsdp(ctx: Context, rows: Dict[str, Row], name: str, work: str, timeout_s: float) -> None:
    row = rows[name]
    if ctx.fsdp == "skip" or (ctx.fsdp == "auto" and ctx.device.type != "cuda"):
        why = (
            "--fsdp skip"
            if ctx.fsdp == "skip"
            else "no CUDA device (accelerate's FSDP needs one; --fsdp run forces it)"
        )
        row.status = f"skipped: {why}"
        return
    if name.endswith("train_dit_flow.py") and not os.path.isdir(os.path.join(work, "images")):
        write_class_folder(os.path.join(work, "images"))
    cmd, written, _ = fsdp_commands(ctx, work)[name]
    result = run_subprocess(cmd, timeout_s, env=script_env())
    describe_run(result, row, written)
    if ctx.verbose:
        print(result["output"][-4000:], file=sys.stderr)


# -------------------------------------------------------------------------------------------------------- the run


@dataclass
class Group:
    key: str
    rows: List[Row]
    fn: Callable[[Context, Dict[str, Row]], None]
    timeout_s: float
    min_s: float = 10.0  # reserved for this group while earlier ones run


def plan(ctx: Context, work: str) -> List[Group]:
    d = ctx.dtype_name
    res = TINY_AE_RESOLUTION if ctx.tiny else 256
    ae_shape = f"{ctx.ae_batch}x3x{res}x{res}"
    v_res = ctx.video_sizes[0]
    video_shape = f"{ctx.video_batch}x3x{ctx.video_frames}x{v_res}x{v_res}"
    lat = "16x8x8" if ctx.tiny else "16x32x32"
    fsdp = fsdp_commands(ctx, work)
    scale = 1.0
    groups = [
        Group("ae", [Row(f"AE FLUX {k}", ae_shape, d) for k in ("no SE", "SE x2", "SE x4")], group_ae, 70 * scale),
        Group("video", [Row("Video AE CogVideoX SE x2", video_shape, d, unit="clip/s")], group_video, 90 * scale),
    ]
    for model in ("DiT-B/2", "DiT-XL/2"):
        groups.append(
            Group(
                "dit",
                [Row(f"{model} flow matching", f"{ctx.dit_batch}x{lat}", d)],
                lambda c, r, m=model: group_dit(c, r, m),
                45 * scale,
            )  # fmt: skip
        )
    for name, (_, _, shape) in fsdp.items():
        groups.append(
            Group(
                "fsdp",
                [Row(name, shape, "bf16 (fsdp.yaml)")],
                lambda c, r, n=name: group_fsdp(c, r, n, work, c.fsdp_timeout_s),
                ctx.fsdp_timeout_s + 5,
                20.0,
            )  # fmt: skip
        )
    return groups


def print_row(row: Row) -> None:
    print("| " + " | ".join(row.cells()) + " |", flush=True)


def run_groups(ctx: Context, groups: List[Group], budget_s: float, start: float = T0) -> List[Row]:
    """Run every group isolated (its failure is its rows' status), each under a hard timeout that leaves the later
    groups their minimum share of ``budget_s``; rows are printed as they finish."""
    done = []
    for i, group in enumerate(groups):
        remaining = budget_s - (time.monotonic() - start)
        reserve = sum(g.min_s for g in groups[i + 1 :])
        timeout = min(group.timeout_s, remaining - reserve)
        rows = {r.name: r for r in group.rows}
        if timeout < 1.0:
            for r in group.rows:
                r.status = f"skipped: time budget ({budget_s:.0f} s) spent"
        else:
            if group.key == "fsdp":  # a subprocess: its own timeout, no alarm
                ctx.fsdp_timeout_s = min(ctx.fsdp_timeout_s, timeout)
            ctx.deadline = time.monotonic() + 0.6 * timeout  # stop timing more steps after 60% of the share
            t0 = time.monotonic()
            try:
                with hard_timeout(0 if group.key == "fsdp" else timeout):
                    group.fn(ctx, rows)
            except Exception as err:  # noqa: BLE001 (a row's failure is its status)
                status = error_status(err)
                if ctx.verbose:
                    traceback.print_exc()
                for r in group.rows:
                    if r.status is None or r.status == "ok":  # a group that failed half-way: its rows all fail
                        r.status = status if r.status is None else f"ok, then {status}"
                del err
            finally:
                free_memory(ctx.device)
            if group.key != "fsdp":
                for r in group.rows:
                    r.notes.append(f"group {time.monotonic() - t0:.1f} s")
        for r in group.rows:
            print_row(r)
            done.append(r)
    return done


def describe_env(ctx: Context) -> str:
    import accelerate
    import diffusers

    if ctx.device.type == "cuda":
        where = f"{torch.cuda.get_device_name(ctx.device)}, CUDA {torch.version.cuda}"
    else:
        where = f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    mode = "tiny CPU fallback" if ctx.tiny else "full size"
    return (
        f"gpu_check ({mode}): device={ctx.device} ({where}); torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, accelerate {accelerate.__version__}; warm-up {ctx.warmup}, timed steps <= {ctx.steps}"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="Tiny sizes in float32 on the CPU (the default without CUDA)."
    )
    parser.add_argument("--device", default=None, help="Default: cuda when available (and not --tiny), else cpu.")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="Default: bf16 on CUDA, fp32 on CPU.")
    parser.add_argument("--budget_s", type=float, default=None, help="Total time budget (default 285; tiny 150).")
    parser.add_argument("--warmup", type=int, default=None, help="Warm-up steps per row (default 2; tiny 1).")
    parser.add_argument("--steps", type=int, default=None, help="Timed steps per row, at most (default 5; tiny 2).")
    parser.add_argument("--ae_batch_size", type=int, default=None, help="FLUX AE images per step (default 8; tiny 2).")
    parser.add_argument("--video_batch_size", type=int, default=1, help="CogVideoX clips per step (%(default)s).")
    parser.add_argument("--video_frames", type=int, default=None, help="Frames per clip (default 17; tiny 9).")
    parser.add_argument(
        "--video_resolutions",
        type=int,
        nargs="+",
        default=None,
        help="Tried in turn on OOM (default 256 128; tiny 32).",
    )
    parser.add_argument("--dit_batch_size", type=int, default=None, help="DiT latents per step (default 64; tiny 4).")
    parser.add_argument(
        "--rows", nargs="+", default=["ae", "video", "dit", "fsdp"], choices=["ae", "video", "dit", "fsdp"],
        help="Which rows to run (all by default).",
    )  # fmt: skip
    parser.add_argument(
        "--fsdp", default="auto", choices=["auto", "run", "skip"],
        help="FSDP script rows: 'auto' runs them on CUDA and skips them on the CPU; 'run' always.",
    )  # fmt: skip
    parser.add_argument("--fsdp_timeout_s", type=float, default=None, help="Per script run (default 80; tiny 120).")
    parser.add_argument(
        "--full_size_flops", action="store_true",
        help="With --tiny, count the SE FLOPs of the full FLUX AE at 256^2 (meta device: no memory; a few seconds "
        "on an idle CPU) instead of the tiny AE's.",
    )  # fmt: skip
    parser.add_argument("--json", default=None, help="Also write the rows to this JSON file.")
    parser.add_argument("--keep_work_dir", action="store_true", help="Keep the FSDP runs' outputs (printed path).")
    parser.add_argument("--verbose", action="store_true", help="Tracebacks and the FSDP runs' output on stderr.")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if cuda and not args.tiny else "cpu"))
    tiny = args.tiny or device.type != "cuda"
    pick = lambda value, full, small: value if value is not None else (small if tiny else full)  # noqa: E731
    ctx = Context(
        device=device,
        tiny=tiny,
        amp=pick(args.dtype, "bf16", "fp32") == "bf16",
        warmup=max(1, pick(args.warmup, 2, 1)),
        steps=max(1, pick(args.steps, 5, 2)),
        ae_batch=pick(args.ae_batch_size, 8, 2),
        video_batch=args.video_batch_size,
        video_frames=pick(args.video_frames, 17, 9),
        video_sizes=pick(args.video_resolutions, [256, 128], [32]),
        dit_batch=pick(args.dit_batch_size, 64, 4),
        fsdp=args.fsdp,
        fsdp_timeout_s=pick(args.fsdp_timeout_s, 80.0, 120.0),
        full_size_flops=args.full_size_flops,
        keep=args.keep_work_dir,
        verbose=args.verbose,
    )
    return args, ctx, pick(args.budget_s, 285.0, 150.0)


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args, ctx, budget_s = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)  # run the cleanups (work folder, FSDP launchers) on a hard timeout
    print(describe_env(ctx), flush=True)
    work = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        groups = [g for g in plan(ctx, work) if g.key in args.rows]
        print()
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "|".join("---" for _ in HEADER) + "|", flush=True)
        rows = run_groups(ctx, groups, budget_s)
    finally:
        if ctx.keep:
            print(f"FSDP outputs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"Total {time.monotonic() - T0:.0f} s (budget {budget_s:.0f} s). Step = forward + backward + clipping + AdamW + "
        f"EMA, median of the n timed steps after {ctx.warmup} warm-up; throughput = batch / median; peak memory "
        + (
            "torch.cuda.max_memory_allocated, reset per row."
            if ctx.device.type == "cuda"
            else "peak RSS, reset per row."
        )
    )
    if ctx.tiny:
        print("Tiny CPU figures check that every path runs; their times say nothing about the method or a GPU.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": describe_env(ctx), "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
