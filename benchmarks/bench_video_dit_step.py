#!/usr/bin/env python
"""Video DiT training-step time of train_dit_flow.py's loop against a bare forward + backward, and its tokens/s.

For each ``--models`` DiT and each ``--latents`` video shape ``CxT'xHxW`` (16x5x8x8 = CogVideoX-AE latents of
17x64x64 clips; 128x3x8x8 = LTX-AE latents of 17x256x256 clips), the paper's video DiT
(``diffusability_hf.models.video_dit.SelfConditionedVideoDiT``: every latent frame patchified on its own, so
``T' * (H / p) * (W / p)`` tokens per sample in full spatio-temporal attention, 3D RoPE, self-conditioning) is built
as train_dit_flow.py builds it for video latents (``factory.transformer_config`` then ``factory.build_transformer`` with
``--pos_embed`` and ``self_conditioning = --self_conditioning_prob > 0``), and at batch ``--batch_size``:

* (a) bare: ``model(x_t, t, labels).sample``, MSE to a fixed target, backward, AdamW step, on precomputed random
  ``(B, C, T', H, W)`` tensors (nothing else);
* (a+aux), when ``--self_conditioning_prob`` > 0: (a) plus the no-grad auxiliary forward whose last-block tokens
  condition the main pass (App. B), the design cost of self-conditioning, about +1/3 of a forward + backward;
* (b) the loop's step, rebuilt from train_dit_flow.py's ``main()`` around the objective the script trains, the
  library's ``diffusability_hf.flow.FlowMatchingLoss`` (the script's default settings): per-step generator and
  seeding, posterior sample of a (mean, std) batch and its per-channel normalisation by
  ``diffusability_hf.data.latents.normalization_tensors`` statistics (``(1, C, 1, 1, 1)``), the loss under
  ``accelerator.accumulate``, the scripts' own ``diffusability_hf.training.steps.optimizer_step`` (gradient clipping
  at 16, the non-finite guard, AdamW + warmup-cosine LR step), EMA update, loss ``.item()`` and ``accelerator.log``. The batch is a precomputed tensor: no data loading (for the
  script end to end, with ``LatentShards``, tqdm and accelerate's DataLoader, see bench_dit_step.py's (c), which
  measures them on image latents).

The variants share the model and the AdamW state and alternate, so that machine drift hits all alike; the table
gives medians of at least ``--repeats`` steps per variant, more for cheap models (until each variant has
``--min_seconds`` timed), after one warm-up step of (b) and one of each other variant (unless (b)'s warm-up step
took over ``--warmup_all_below`` s, 30 by default: the first step carries one-time costs, several seconds for DiT-S/2
on CPU, so bench_dit_step.py's 5 s would skip it at the defaults). Target: (b) at most +10% over (a), over (a+aux)
with self-conditioning (the default ``--self_conditioning_prob 0.9``, the script's and the paper's; 0 builds the DiT
without ``self_cond_proj``, as the script does). The last column is the loop's throughput, ``batch * tokens per
sample / (b)``. At the defaults (DiT-tiny/2 and DiT-S/2, both latent shapes, batch 4) a run takes about 3 minutes
on 2 CPU cores.

    python benchmarks/bench_video_dit_step.py
    python benchmarks/bench_video_dit_step.py --self_conditioning_prob 0 --pos_embed sincos
    # Table 2's models (DiT-B/2 on CogVideoX-AE latents, here of 17x256x256 clips; DiT-B/1 on LTX-AE ones), bf16 GPU
    python benchmarks/bench_video_dit_step.py --models DiT-B/2 --latents 16x5x32x32 --batch_size 32 \\
        --mixed_precision bf16
    python benchmarks/bench_video_dit_step.py --models DiT-B/1 --latents 128x3x8x8 --batch_size 32 \\
        --mixed_precision bf16

Smoke test (under a minute):

    OMP_NUM_THREADS=1 python benchmarks/bench_video_dit_step.py --models DiT-tiny/2 --repeats 2 --min_seconds 0

The class count is ``--num_classes`` (default 7); the video DiT has one shared label table, so it hardly matters.
No asserts on timings.
"""

import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F


def parse_latents(text):
    try:
        c, t, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"latent shape {text!r} is not CxTxHxW, e.g. 16x5x8x8") from None
    if h != w or min(c, t, h) <= 0:
        raise argparse.ArgumentTypeError(f"latent shape {text!r}: the video DiT's config wants square frames")
    return text.lower()


def shape_of(text):
    return tuple(int(v) for v in text.split("x"))


def patch_of(model_name):
    return int(model_name.rsplit("/", 1)[1])


def tokens_of(model_name, latents):
    """Tokens per sample: every latent frame patchified on its own, ``T' * (H / p) * (W / p)``."""
    _, t, h, w = shape_of(latents)
    p = patch_of(model_name)
    return t * (h // p) * (w // p)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values):
    return sorted(values)[len(values) // 2]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def model_config(model_name, latents, args):
    """The video DiT's config as train_dit_flow.py reads it for ``(C, T', h, w)`` latents (checks the geometry)."""
    from diffusability_hf.models.factory import transformer_config

    return transformer_config(list(shape_of(latents)), args.num_classes, model_name, None, f"latents {latents}")


def bench_in_process(accelerator, model_name, latents, args, device):
    """Median ms/step of (a), (a+aux) when self-conditioning, and (b) on one model and latent shape."""
    from accelerate.utils import set_seed

    from diffusability_hf.data.latents import normalization_tensors
    from diffusability_hf.flow import FlowMatchingLoss, warmup_cosine
    from diffusability_hf.models.factory import build_transformer
    from diffusability_hf.training.ema import EMA
    from diffusability_hf.training.steps import NonFiniteGuard, optimizer_step, step_generator

    c, t, s, _ = shape_of(latents)
    b, k = args.batch_size, args.num_classes
    sc = args.self_conditioning_prob
    set_seed(0)
    # As train_dit_flow.py builds it for video latents: SelfConditionedVideoDiT, --pos_embed, self-conditioning iff
    # --self_conditioning_prob > 0
    config = model_config(model_name, latents, args)
    transformer = build_transformer(config, pos_embed=args.pos_embed, self_conditioning=sc > 0)
    transformer = transformer.to(device).train()
    n_params = sum(p.numel() for p in transformer.parameters())
    params = list(transformer.parameters())
    ema = EMA(params, 6931.0, 0.05)  # the script's defaults
    guard = NonFiniteGuard(10)  # the script's --max_nonfinite_steps: a step remembers what it changes
    optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.99), weight_decay=0.01)
    n = accelerator.num_processes  # the prepared scheduler steps once per process, as in the script
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, 50 * n, 500 * n, 3e-4, 1e-5)
    )
    objective = FlowMatchingLoss(transformer, k, class_dropout_prob=0.1, self_conditioning_prob=sc)
    model, acc_optimizer, acc_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)
    bf16 = args.mixed_precision == "bf16"

    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(b, c, t, s, s, generator=g).to(device)
    target = torch.randn(b, c, t, s, s, generator=g).to(device)
    timestep = (torch.rand(b, generator=g) * 1000).to(device)
    labels = torch.randint(0, k, (b,), generator=g).to(device)
    batch = {
        "mean": torch.randn(b, c, t, s, s, generator=g).to(device),
        "std": (0.1 * torch.rand(b, c, t, s, s, generator=g)).to(device),
        "label": labels,
    }
    meta = {  # per-channel statistics of a metadata.json for video latents
        "latent_shape": [c, t, s, s],
        "latents_mean": torch.randn(c, generator=g).tolist(),
        "latents_std": (0.5 + torch.rand(c, generator=g)).tolist(),
    }
    lat_mean, lat_std = normalization_tensors(meta, accelerator.device)  # (1, C, 1, 1, 1)

    def bare(aux=False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            kwargs = {}
            if aux:  # the design cost of self-conditioning: a no-grad pass conditions the main one
                with torch.no_grad():
                    kwargs["self_cond"] = transformer(x_t, timestep, labels).last_hidden_state
            pred = transformer(x_t, timestep, labels, **kwargs).sample
        F.mse_loss(pred.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)

    counter = [0]

    # The loop step of benchmarks/bench_dit_step.py (as train_dit_flow.py's main() runs it), on 5D latents
    def loop():  # train_dit_flow.py main(), one optimizer step (no gradient accumulation, one process)
        global_step = counter[0]
        gen = step_generator(accelerator.device, 0, global_step, accelerator.process_index, 0)
        eps = torch.randn(batch["mean"].shape, generator=gen, device=accelerator.device)
        x0 = (batch["mean"] + batch["std"] * eps - lat_mean) / lat_std  # (B, C, T', h, w)
        # Copied from benchmarks/bench_dit_step.py
        with accelerator.accumulate(model):
            loss = model(x0, batch["label"], gen).mean()
            grad_norm = optimizer_step(
                loss, accelerator, model, acc_optimizer, acc_scheduler, 16.0, guard, params, ema
            )
        global_step = counter[0] = global_step + 1
        guard.step_done(global_step)
        ema.update(list(transformer.parameters()), global_step)
        last = {
            "train/loss": accelerator.reduce(loss.detach(), "mean").item(),
            "train/lr": acc_scheduler.get_last_lr()[0],
        }
        if grad_norm is not None:
            last["train/grad_norm"] = float(grad_norm)
        accelerator.log(last, step=global_step)
        sync(device)
        # End copy

    variants = {"a": bare, "b": loop}
    if sc > 0:
        variants = {"a": bare, "a+aux": lambda: bare(aux=True), "b": loop}
    # Warm-up and interleaved timing of benchmarks/bench_dit_step.py, with a longer warm-up bound.
    # Warm-up (allocator, kernels, AdamW state): one step of (b), which runs every kernel of the others, then one of
    # each other variant unless a step is expensive (the first step's one-time costs are a few seconds on CPU)
    # Copied from benchmarks/bench_dit_step.py
    t0 = time.perf_counter()
    loop()
    if time.perf_counter() - t0 < args.warmup_all_below:
        for v, fn in variants.items():
            if v != "b":
                fn()
    times = {v: [] for v in variants}
    rep = 0
    while rep < args.repeats or min(sum(t) for t in times.values()) < args.min_seconds:
        for v, fn in variants.items():  # interleaved so that drift hits every variant alike
            t0 = time.perf_counter()
            fn()
            times[v].append(time.perf_counter() - t0)
        rep += 1
    log(f"{model_name} {latents}: " + ", ".join(f"({v}) {1e3 * median(t):.0f} ms" for v, t in times.items()))
    accelerator.free_memory()
    return {v: 1e3 * median(t) for v, t in times.items()}, n_params, rep
    # End copy


def describe_env(device, args):
    import accelerate
    import diffusers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    threads = f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else ""
    omp = os.environ.get("OMP_NUM_THREADS")
    return (
        f"device={device} ({where}{threads}{f', OMP_NUM_THREADS={omp}' if omp else ''}), batch={args.batch_size}, "
        f"precision={args.mixed_precision}, pos_embed={args.pos_embed}, "
        f"self_conditioning_prob={args.self_conditioning_prob}, classes={args.num_classes}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, accelerate {accelerate.__version__}"
    )


def pct(x, base):
    return f"{100 * (x / base - 1):+.1f}%"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["DiT-tiny/2", "DiT-S/2"], help="DiT-{S,B,L,XL,tiny}/{1,2,4}.")
    parser.add_argument(
        "--latents",
        nargs="+",
        type=parse_latents,
        default=["16x5x8x8", "128x3x8x8"],
        help="C x T' x H x W video latents (16x5x8x8: CogVideoX-AE at 17x64x64; 128x3x8x8: LTX-AE at 17x256x256).",
    )
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_classes", type=int, default=7, help="Real classes (+1 null class).")
    parser.add_argument(
        "--self_conditioning_prob", type=float, default=0.9, help="As the script's flag (default and paper: 0.9)."
    )
    parser.add_argument("--pos_embed", default="rope", choices=["rope", "sincos"], help="As the script's flag.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed steps per variant, at least (after a warm-up).")
    parser.add_argument(
        "--min_seconds", type=float, default=8.0, help="Repeat until every variant has this much timed (cheap runs)."
    )
    parser.add_argument(
        "--warmup_all_below",
        type=float,
        default=30.0,
        help="Seconds: warm up every variant (not only (b)) when (b)'s warm-up step is quicker than this.",
    )
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.batch_size <= 0 or args.repeats <= 0:
        parser.error("--batch_size and --repeats must be positive.")
    if not 0 <= args.self_conditioning_prob <= 1:
        parser.error("--self_conditioning_prob must be in [0, 1].")
    for name in args.models:  # model names and patch sizes, before any timing
        for latents in args.latents:
            try:
                model_config(name, latents, args)
            except ValueError as err:
                parser.error(f"--models {name} --latents {latents}: {err}")
    from accelerate import Accelerator

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device.")
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
    print(describe_env(device, args))
    sc = args.self_conditioning_prob > 0
    results = []
    for name in args.models:
        for latents in args.latents:
            med, n_params, reps = bench_in_process(accelerator, name, latents, args, device)
            results.append({"model": name, "latents": latents, "med": med, "params": n_params, "reps": reps})

    header = ["model", "latents (CxTxHxW)", "tokens/sample", "params", "(a) bare ms"] + (["(a+aux) ms"] if sc else [])
    header += ["(b) loop ms", "(b) vs (a)"] + (["(b) vs (a+aux)"] if sc else []) + ["(b) tokens/s"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    notes = []
    for r in results:
        med, tokens = r["med"], tokens_of(r["model"], r["latents"])
        base = med["a+aux"] if sc else med["a"]
        row = [r["model"], r["latents"], str(tokens), f"{r['params'] / 1e6:.1f}M", f"{med['a']:.0f}"]
        row += [f"{med['a+aux']:.0f}"] if sc else []
        row += [f"{med['b']:.0f}", pct(med["b"], med["a"])] + ([pct(med["b"], base)] if sc else [])
        row += [f"{args.batch_size * tokens / (med['b'] / 1e3):,.0f}"]
        print("| " + " | ".join(row) + " |")
        against = "(a+aux)" if sc else "(a)"
        verdict = "within" if med["b"] <= 1.10 * base else "ABOVE"
        overhead = pct(med["b"], base)
        notes.append(
            f"{r['model']} {r['latents']}: loop step (b) {overhead} vs {against}, {verdict} the <= 10% target"
        )
    print()
    print(
        f"ms per optimizer step at batch {args.batch_size}: medians of {'/'.join(str(r['reps']) for r in results)} "
        "interleaved steps per variant (after a warm-up step); tokens/s = batch * tokens per sample / (b)."
    )
    if sc:
        print(
            f"- self_conditioning_prob={args.self_conditioning_prob}: the loop runs a no-grad auxiliary forward every "
            "step by design (App. B); (a+aux) includes it, so the loop's own overhead is the 'vs (a+aux)' column"
        )
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
