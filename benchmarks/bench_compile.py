#!/usr/bin/env python
"""torch.compile against eager for the training steps of train_ae_se.py and train_dit_flow.py (what ``--compile`` buys).

Two steps, each run by an eager model and a compiled deep copy of it (same weights, same inputs, same per-step
generator), alternating step by step so that machine drift hits both alike:

* ``ae``: SE fine-tuning (paper eq. 2) as train_ae_se.py runs it: the library objective
  ``diffusability_hf.losses.SEAutoencoderLoss`` with the script's defaults (alpha 0.25, bilinear, posterior samples,
  no KL / CHF / soft penalty; d = MSE, LPIPS off since it needs a download), the script's frozen output layers, then
  the scripts' own step ``diffusability_hf.training.steps.optimizer_step`` (backward, clipping at 50) with the
  script's AdamW (``ae_adamw``). The SE factor alternates 2, 4, 2, ... (the script draws it per step), so the
  warm-up steps compile the decoder at every latent size it sees. Compiled: ``vae.encoder`` and ``vae.decoder`` in
  place (``nn.Module.compile``): ``SEAutoencoderLoss`` calls ``vae.encode`` / ``vae.decode``, which neither
  ``torch.compile(vae)`` nor ``vae.compile()`` compile (both compile ``forward`` only).
* ``dit``: flow matching (paper Sec. 4, App. B) as train_dit_flow.py runs it: ``diffusability_hf.flow.FlowMatchingLoss``
  on the DiT the script builds (``transformer_config`` + ``build_transformer``: the paper's ``SelfConditionedDiT``
  with RoPE), self-conditioning 0.9 (a no-grad auxiliary pass, then the conditioned main pass), then
  ``optimizer_step`` (backward, clipping at 16) and AdamW. Compiled: the transformer in place
  (``transformer.compile()``); the objective stays eager (its ``torch.Generator`` draws would break the graph).

Per step the table gives the first step's wall time of each variant, the compile time (the compiled variant's
warm-up steps minus as many eager steady-state steps), the steady-state medians of ``--steps`` steps after the
warm-up, the speedup (eager / compiled), the number of graphs dynamo compiled (and any new ones during the timed
steps: a recompile there would be a bug), and whether the compiled loss and gradient norm at step 1 equal the eager
ones to float noise (relative 1e-4 and 1e-3). The status column says when inductor cannot run here (it compiles
C++: it needs a working ``g++``) or the compile failed; the eager numbers are still given. EMA, LR schedule,
logging and data loading are left out: they are the same in both variants and do not touch the compiled module.

    python benchmarks/bench_compile.py                    # a few minutes on 2 CPU cores (most of it compiling)
    python benchmarks/bench_compile.py --benchmarks dit --model DiT-B/2 --batch_size 64
    python benchmarks/bench_compile.py --cold_cache       # compile time without inductor's on-disk caches
    python benchmarks/bench_compile.py --tiny             # smoke test: tiny models, 2 timed steps

Inductor caches compiled graphs on disk (``TORCHINDUCTOR_CACHE_DIR``, by default ``/tmp/torchinductor_$USER``): a
rerun compiles much faster than the first run; ``--cold_cache`` measures the first run. No asserts on timings.
"""

import argparse
import copy
import os
import platform
import sys
import tempfile
import time

import torch

SE_SCALE_FACTORS = (2, 4)  # train_ae_se.py's default --se_scale_factors
TINY = dict(ae="tiny", model="DiT-tiny/2", batch_size=2, resolution=16, latents="4x4x4", steps=2)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def median(values):
    return sorted(values)[len(values) // 2]


def parse_latents(text):
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"latent shape {text!r} is not CxHxW, e.g. 16x8x8") from None
    if h != w or min(c, h) <= 0:
        raise argparse.ArgumentTypeError(f"latent shape {text!r}: the DiT wants square latents")
    return (c, h, w)


def inductor_status():
    """``"ok"``, or why inductor cannot compile on this machine (it builds C++ kernels on CPU)."""
    try:
        fn = torch.compile(lambda x: torch.sin(x) + 1, backend="inductor", fullgraph=True)
        # a fixed input and a float32-sized tolerance: inductor's vectorised sin differs from ATen's by up to an ulp,
        # which a random input near sin(x) = -1 turned into a false "wrong result" (about 6% of calls, rtol only)
        x = torch.linspace(-3, 3, 8)
        if not torch.allclose(fn(x), torch.sin(x) + 1, rtol=1e-5, atol=1e-6):
            return "inductor unavailable: wrong result on a test function"
    except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"; reported, not raised
        return f"inductor unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        torch._dynamo.reset()
    return "ok"


def graph_count():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


# Autoencoder step (train_ae_se.py)


def build_ae(name):
    from diffusers import AutoencoderKL

    from diffusability_hf.autoencoders import EMBEDDED_AE

    if name == "embedded":
        return AutoencoderKL.from_pretrained(EMBEDDED_AE)
    torch.manual_seed(0)  # 2 blocks: 2x compression, 4 latent channels
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        mid_block_add_attention=False,
    )  # fmt: skip


def ae_setup(args):
    """(per-variant state factory, step function, parameter count) of the SE fine-tuning step."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from diffusability_hf import autoencoders as ae
    from diffusability_hf.losses import ReconstructionDistance, SEAutoencoderLoss
    from diffusability_hf.training.steps import ae_adamw, optimizer_step, step_generator

    accelerator = Accelerator()  # unprepared objects: its backward and clipping are the scripts'

    vae = ae.prepare_for_training(build_ae(args.ae))
    ae.check_se_geometry(dict(vae.config, _class_name=type(vae).__name__), args.resolution, SE_SCALE_FACTORS, 8)
    ae.freeze_for_fine_tuning(vae, 0, True, False)  # the script's defaults: output layers frozen (App. B)
    vae.train()
    distance = ReconstructionDistance(mse_weight=1.0, lpips_weight=0.0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, generator=g) * 2 - 1  # (B, 3, H, W)

    def make(compiled):
        v = copy.deepcopy(vae)
        if compiled:  # what SEAutoencoderLoss runs: vae.encode -> encoder, vae.decode -> decoder
            v.encoder.compile(backend=args.backend, mode=args.mode, dynamic=args.dynamic)
            v.decoder.compile(backend=args.backend, mode=args.mode, dynamic=args.dynamic)
        opt = ae_adamw([p for p in v.parameters() if p.requires_grad], 1e-5)  # the script's optimizer
        return SEAutoencoderLoss(v, distance, se_weight=0.25), opt, get_scheduler("constant", opt)

    def step(state, i):
        model, opt, schedule = state
        scale = SE_SCALE_FACTORS[i % len(SE_SCALE_FACTORS)]
        gen = step_generator(x.device, 0, i, 0, 0)
        loss, _ = model(x, None, scale, 1, 0.0, gen)  # (images, videos, scale, temporal, chf ratio, generator)
        loss = loss.mean()
        grad_norm = optimizer_step(loss, accelerator, model, opt, schedule, 50.0)  # the scripts' step
        return loss.item(), float(grad_norm)

    n = sum(p.numel() for p in vae.parameters())
    return make, step, n, len(SE_SCALE_FACTORS), f"{args.ae} AE, {args.resolution}px"


# DiT step (train_dit_flow.py)


def dit_setup(args):
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from diffusability_hf.flow import FlowMatchingLoss
    from diffusability_hf.models.factory import build_transformer, transformer_config
    from diffusability_hf.training.steps import optimizer_step, step_generator

    accelerator = Accelerator()  # unprepared objects: its backward and clipping are the scripts'

    c, s, _ = args.latents
    k = args.num_classes
    torch.manual_seed(0)
    # The script's defaults: the paper's DiT (RoPE) with self-conditioning
    transformer = build_transformer(
        transformer_config((c, s, s), k, args.model),
        pos_embed="rope",
        self_conditioning=args.self_conditioning_prob > 0,
    ).train()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(args.batch_size, c, s, s, generator=g)  # (B, C, h, w) normalised posterior samples
    labels = torch.randint(0, k, (args.batch_size,), generator=g)

    def make(compiled):
        t = copy.deepcopy(transformer)
        if compiled:  # in place: same class, state_dict keys and parameters (EMA, checkpoints, save_pretrained)
            t.compile(backend=args.backend, mode=args.mode, dynamic=args.dynamic)
        opt = torch.optim.AdamW(t.parameters(), lr=3e-4, betas=(0.9, 0.99), weight_decay=0.01)
        objective = FlowMatchingLoss(t, k, class_dropout_prob=0.1, self_conditioning_prob=args.self_conditioning_prob)
        return objective, opt, get_scheduler("constant", opt)

    def step(state, i):
        objective, opt, schedule = state
        gen = step_generator(x0.device, 0, i, 0, 0)
        loss = objective(x0, labels, gen).mean()
        grad_norm = optimizer_step(loss, accelerator, objective, opt, schedule, 16.0)  # the scripts' step
        return loss.item(), float(grad_norm)

    n = sum(p.numel() for p in transformer.parameters())
    tokens = (s // int(args.model.rsplit("/", 1)[1])) ** 2
    return make, step, n, 1, f"{args.model}, {c}x{s}x{s} ({tokens} tokens)"


# Measurement


def timed(step, state, i):
    t0 = time.perf_counter()
    out = step(state, i)
    return time.perf_counter() - t0, out


def bench(name, setup, args, status):
    """One table row: eager vs compiled on the same weights and inputs, interleaved."""
    make, step, n_params, warmup, what = setup(args)
    eager = make(False)
    row = {"step": name, "model": what, "params": n_params, "status": status}
    torch._dynamo.reset()
    start = graph_count()  # dynamo's counters survive reset()
    compiled = None
    if status == "ok":
        try:
            compiled = make(True)
        except Exception as e:  # noqa: BLE001 - reported in the status column
            row["status"], status = f"compile failed: {type(e).__name__}: {str(e)[:120]}", "failed"
    t_e, t_c, out_e, out_c = [], [], [], []
    # Warm-up: the first steps (one per shape the compiled modules see); step 1 compares the losses
    for i in range(warmup):
        t, out = timed(step, eager, i)
        t_e.append(t)
        out_e.append(out)
        if compiled is not None:
            try:
                t, out = timed(step, compiled, i)
                t_c.append(t)
                out_c.append(out)
            except Exception as e:  # noqa: BLE001 - inductor fails inside the first call (C++ build, lowering)
                row["status"], compiled = f"compile failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}", None
        log(f"{name} warm-up step {i + 1}: eager {t_e[-1]:.2f} s" + (f", compiled {t_c[-1]:.2f} s" if t_c else ""))
    graphs = graph_count()
    times_e, times_c = [], []
    for i in range(warmup, warmup + args.steps):  # interleaved so that drift hits both alike
        times_e.append(timed(step, eager, i)[0])
        if compiled is not None:
            times_c.append(timed(step, compiled, i)[0])
    row.update(eager_first=t_e[0], eager_ms=1e3 * median(times_e), loss_e=out_e[0][0], gn_e=out_e[0][1])
    if compiled is not None:
        eager_s = median(times_e)
        row.update(
            compiled_first=t_c[0], compile_s=sum(t - eager_s for t in t_c), compiled_ms=1e3 * median(times_c),
            loss_c=out_c[0][0], gn_c=out_c[0][1], graphs=graphs - start, new_graphs=graph_count() - graphs,
        )  # fmt: skip
        row["loss_rel"] = abs(row["loss_c"] - row["loss_e"]) / max(abs(row["loss_e"]), 1e-12)
        row["gn_rel"] = abs(row["gn_c"] - row["gn_e"]) / max(abs(row["gn_e"]), 1e-12)
        row["match"] = row["loss_rel"] <= 1e-4 and row["gn_rel"] <= 1e-3
    log(f"{name}: eager {row['eager_ms']:.0f} ms" + (f", compiled {row['compiled_ms']:.0f} ms" if compiled else ""))
    return row


def describe_env(args):
    import accelerate
    import diffusers

    omp = os.environ.get("OMP_NUM_THREADS")
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default")
    load = ", load %.2f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (
        f"device=cpu ({platform.processor() or 'cpu'}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
        f"{f', OMP_NUM_THREADS={omp}' if omp else ''}{load}), batch={args.batch_size}, backend={args.backend}, "
        f"mode={args.mode or 'default'}, dynamic={args.dynamic}, inductor cache="
        f"{'cold (fresh folder)' if args.cold_cache else cache}; torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, accelerate {accelerate.__version__}"
    )


def fmt(row, key, spec, scale=1.0):
    return format(row[key] * scale, spec) if key in row else "n/a"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks", nargs="+", default=["ae", "dit"], choices=["ae", "dit"], help="Which steps.")
    parser.add_argument("--ae", default="embedded", choices=["embedded", "tiny"], help="Autoencoder of the ae step.")
    parser.add_argument("--model", default="DiT-S/2", help="DiT of the dit step: DiT-{S,B,L,XL,tiny}/{1,2,4}.")
    parser.add_argument("--batch_size", type=int, default=8, help="Images (ae) and latents (dit) per step.")
    parser.add_argument("--resolution", type=int, default=128, help="Training crop side of the ae step (px).")
    parser.add_argument(
        "--latents", type=parse_latents, default=parse_latents("16x8x8"), help="CxHxW latents of the dit step "
        "(default: the embedded AE at 64 px, the script's embedded demo)."
    )  # fmt: skip
    parser.add_argument("--num_classes", type=int, default=7, help="Real classes of the DiT (+1 null class).")
    parser.add_argument("--self_conditioning_prob", type=float, default=0.9, help="As the DiT script's flag.")
    parser.add_argument("--steps", type=int, default=10, help="Timed steps per variant after the warm-up.")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...).")
    parser.add_argument("--mode", default=None, help="torch.compile mode (e.g. max-autotune-no-cudagraphs).")
    parser.add_argument(
        "--dynamic", default="auto", choices=["auto", "true", "false"],
        help="torch.compile(dynamic=...): auto (None, torch's default: static, dynamic after a shape changes).",
    )  # fmt: skip
    parser.add_argument("--cold_cache", action="store_true", help="Compile with an empty inductor cache folder.")
    parser.add_argument("--tiny", action="store_true", help=f"Smoke test: the defaults become {TINY}.")
    if "--tiny" in sys.argv[1:]:
        parser.set_defaults(**TINY)  # explicit flags still win
    args = parser.parse_args()
    args.dynamic = {"auto": None, "true": True, "false": False}[args.dynamic]
    if args.batch_size <= 0 or args.steps <= 0:
        parser.error("--batch_size and --steps must be positive.")
    from diffusability_hf.models.dit import dit_config

    try:  # model name and patch size against the latents, before anything is built
        dit_config(args.model, args.latents[0], args.latents[1], args.num_classes)
    except ValueError as e:
        parser.error(str(e))
    tmp = tempfile.TemporaryDirectory(prefix="bench_compile_") if args.cold_cache else None
    if tmp is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp.name
    print(describe_env(args))
    status = inductor_status() if args.backend == "inductor" else "ok"
    if status != "ok":
        log(f"{status}: timing eager only")
    setups = {"ae": ae_setup, "dit": dit_setup}
    rows = [bench(name, setups[name], args, status) for name in args.benchmarks]

    header = ["step", "model", "params", "status", "eager 1st s", "compiled 1st s", "compile s", "eager ms",
              "compiled ms", "speedup", "graphs (+timed)", "loss eager", "loss compiled", "loss rel diff",
              "grad-norm rel diff", "match"]  # fmt: skip
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for r in rows:
        done = "compiled_ms" in r
        cells = [
            r["step"], r["model"], f"{r['params'] / 1e6:.2f}M", r["status"].replace("|", "/"),
            fmt(r, "eager_first", ".2f"), fmt(r, "compiled_first", ".1f"), fmt(r, "compile_s", ".1f"),
            fmt(r, "eager_ms", ".0f"), fmt(r, "compiled_ms", ".0f"),
            f"{r['eager_ms'] / r['compiled_ms']:.2f}x" if done else "n/a",
            f"{r['graphs']} (+{r['new_graphs']})" if done else "n/a",
            f"{r['loss_e']:.6f}", fmt(r, "loss_c", ".6f"), fmt(r, "loss_rel", ".1e"), fmt(r, "gn_rel", ".1e"),
            ("yes" if r["match"] else "NO") if done else "n/a",
        ]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        f"Seconds and ms per optimizer step at batch {args.batch_size} (forward + backward + clipping + AdamW); "
        f"medians of {args.steps} interleaved steps per variant after the warm-up (ae: {len(SE_SCALE_FACTORS)} steps, "
        "SE x2 and x4; dit: 1). compile s = the compiled warm-up steps minus as many eager steady-state steps. "
        "speedup = eager ms / compiled ms. match: step-1 loss within 1e-4 and gradient norm within 1e-3 (relative)."
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
