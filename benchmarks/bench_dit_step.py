#!/usr/bin/env python
"""DiT training-step time of train_dit_flow.py's loop against a bare forward + backward of the same model.

For each ``--models`` DiT (built with ``diffusability_hf.models.dit`` as the script builds it: the stock
``DiTTransformer2DModel``, the script's ``--stock_dit``, or, when ``--self_conditioning_prob`` > 0, the toolkit's
``SelfConditionedDiT`` with sin-cos positions) and each ``--latents`` shape (16x8x8 = the embedded autoencoder at
64 px; 4x32x32 = SD-VAE latents of ImageNet-256), at batch ``--batch_size``:

* (a) bare: ``model(x_t, t, labels).sample``, MSE to a fixed target, backward, AdamW step, on precomputed random
  tensors (nothing else);
* (b) the loop's step, rebuilt from train_dit_flow.py's ``main()`` around the objective the script trains, the
  library's ``diffusability_hf.flow.FlowMatchingLoss`` (the script's default settings): per-step generator and
  seeding, posterior sample and per-channel normalisation of a (mean, std) batch, the loss under
  ``accelerator.accumulate``, then the scripts' own optimizer step, ``diffusability_hf.training.steps.optimizer_step``
  (backward of a finite loss, gradient clipping at 16, the non-finite guard's copy of what the step changes, AdamW
  + warmup-cosine LR step), the guard's count, EMA update, loss ``.item()`` and ``accelerator.log``. The batch is a
  precomputed tensor: no data loading;
* (c) the script end to end: ``python train_scripts/train_dit_flow.py`` on latents that extract_latents.py wrote
  (``--script_latents``; 16xSxS from the embedded AE at 8S px, other shapes from a tiny random 4-block
  ``AutoencoderKL`` with that many latent channels), for ``--script_steps n1 n2`` steps in two fresh processes;
  ``(t2 - t1) / (n2 - n1)`` cancels the fixed costs (imports, model build, the final pipeline save and sample
  grid). Sampling and checkpoints are pushed past the run (``--validation_steps`` / ``--checkpointing_steps``
  1e9, ``--report_to none``, ``--num_inference_steps 1``). This adds the ``LatentShards`` data loading, tqdm and
  accelerate's DataLoader to (b).

(a) and (b) share the model and the AdamW state and alternate, so that machine drift hits both alike; the table
gives medians of at least ``--repeats`` steps per variant, more for cheap models (until each variant has
``--min_seconds`` timed), after one warm-up step of (b) (and one of each other variant when that step took under
``--warmup_all_below`` s). Target: (b) and (c) at most +10% over (a). With ``--self_conditioning_prob 0.9`` (the
paper's) the loop adds, by design, a no-grad auxiliary forward whose last-block tokens condition the main pass
(App. B), about +1/3 of a forward + backward; a third variant, (a+aux) = (a) plus that auxiliary forward and the
conditioned main pass, separates the design cost from the loop's own overhead, and the 10% target applies against
(a+aux). At the defaults a run takes about 3 minutes on 2 CPU cores (4-5 with self-conditioning), most of it the
4x32x32 DiT-S/2 steps (~15 s each).

    python benchmarks/bench_dit_step.py
    python benchmarks/bench_dit_step.py --self_conditioning_prob 0.9
    python benchmarks/bench_dit_step.py --models DiT-S/2 DiT-B/2 --script_latents 16x8x8 4x32x32  # long

Smoke test (about a minute):

    OMP_NUM_THREADS=1 python benchmarks/bench_dit_step.py --models DiT-tiny/2 --repeats 2 --min_seconds 0 \\
        --script_steps 2 6 --script_num_latents 64

The class count is ``--num_classes`` (default 7, the embedded photographs; (c) always has 7); diffusers' DiT keeps a
label table per block, so 1000 classes add AdamW and EMA work to (a) and (b) alike. No asserts on timings.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, "train_scripts", "train_dit_flow.py")
EXTRACT_SCRIPT = os.path.join(ROOT, "train_scripts", "extract_latents.py")
BIG = str(10**9)  # --validation_steps / --checkpointing_steps past the run


def parse_latents(text):
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"latent shape {text!r} is not CxHxW, e.g. 16x8x8") from None
    if h != w or min(c, h) <= 0:
        raise argparse.ArgumentTypeError(f"latent shape {text!r}: the DiT wants square latents")
    return text.lower()


def shape_of(text):
    return tuple(int(v) for v in text.split("x"))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values):
    return sorted(values)[len(values) // 2]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def bench_in_process(accelerator, model_name, latents, args, device):
    """Median ms/step of (a), (a+aux) when self-conditioning, and (b) on one model and latent shape."""
    from diffusability_hf.flow import FlowMatchingLoss, warmup_cosine
    from diffusability_hf.models.factory import build_dit, build_selfcond_dit
    from diffusability_hf.training.ema import EMA
    from diffusability_hf.training.steps import NonFiniteGuard, optimizer_step, step_generator

    c, s, _ = shape_of(latents)
    b, k = args.batch_size, args.num_classes
    sc = args.self_conditioning_prob
    torch.manual_seed(0)
    # As train_dit_flow.py builds them: --stock_dit, or the paper's DiT with --pos_embed sincos
    transformer = build_selfcond_dit(model_name, c, s, k, "sincos", True) if sc > 0 else build_dit(model_name, c, s, k)
    transformer = transformer.to(device).train()
    n_params = sum(p.numel() for p in transformer.parameters())
    params = list(transformer.parameters())
    ema = EMA(params, 6931.0, 0.05)  # the script's defaults
    guard = NonFiniteGuard(args.max_nonfinite_steps)  # > 0: each step first copies what it changes (the script's)
    optimizer = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.99), weight_decay=0.01)
    n = accelerator.num_processes  # the prepared scheduler steps once per process, as in the script
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, 50 * n, 500 * n, 3e-4, 1e-5)
    )
    objective = FlowMatchingLoss(transformer, k, class_dropout_prob=0.1, self_conditioning_prob=sc)
    model, acc_optimizer, acc_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)
    bf16 = args.mixed_precision == "bf16"

    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(b, c, s, s, generator=g).to(device)
    target = torch.randn(b, c, s, s, generator=g).to(device)
    timestep = (torch.rand(b, generator=g) * 1000).to(device)
    labels = torch.randint(0, k, (b,), generator=g).to(device)
    batch = {
        "mean": torch.randn(b, c, s, s, generator=g).to(device),
        "std": (0.1 * torch.rand(b, c, s, s, generator=g)).to(device),
        "label": labels,
    }
    lat_mean = torch.randn(c, generator=g).view(1, -1, 1, 1).to(device)
    lat_std = (0.5 + torch.rand(c, generator=g)).view(1, -1, 1, 1).to(device)

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

    def loop():  # train_dit_flow.py main(), one optimizer step (no gradient accumulation, one process)
        global_step = counter[0]
        gen = step_generator(accelerator.device, 0, global_step, accelerator.process_index, 0)
        eps = torch.randn(batch["mean"].shape, generator=gen, device=accelerator.device)
        x0 = (batch["mean"] + batch["std"] * eps - lat_mean) / lat_std
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

    variants = {"a": bare, "b": loop}
    if args.self_conditioning_prob > 0:
        variants = {"a": bare, "a+aux": lambda: bare(aux=True), "b": loop}
    # Warm-up (allocator, kernels, AdamW state): one step of (b), which runs every kernel of the others, then one of
    # each other variant unless a step is expensive (the 4x32x32 DiT-S/2 step takes ~15 s on 2 CPU cores)
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


def tiny_ae(channels, folder):
    """A 4-block (8x) random AutoencoderKL with ``channels`` latent channels, for latents of another shape."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=channels, norm_num_groups=8,
        mid_block_add_attention=False,
    )  # fmt: skip
    vae.save_pretrained(folder)
    return folder


def run(cmd, device):
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device.type == "cpu" else {}))  # the script's device
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return elapsed


def extract(latents, args, tmp, device):
    """extract_latents.py output for ``latents`` (CxSxS) from embedded crops at 8S px; returns (dir, AE or None)."""
    c, s, _ = shape_of(latents)
    vae = None if c == 16 else tiny_ae(c, os.path.join(tmp, f"ae_{c}"))  # the embedded AE has 16 channels, 8x
    out = os.path.join(tmp, f"latents_{latents}")
    cmd = [sys.executable, EXTRACT_SCRIPT, "--resolution", str(8 * s), "--max_samples", str(args.script_num_latents),
           "--output_dir", out]  # fmt: skip
    if vae is not None:
        cmd += ["--pretrained_model_name_or_path", vae]
    log(f"extracting {args.script_num_latents} {latents} latents ({run(cmd, device):.0f} s)")
    return out, vae


def script_ms_per_step(model_name, latents_dir, vae, args, tmp, device):
    """(c): median over ``--script_repeats`` pairs of ``(t2 - t1) / (n2 - n1)`` in ms, and the run times."""
    n1, n2 = args.script_steps
    per_step, walls = [], []
    for rep in range(args.script_repeats):
        t = []
        for n in (n1, n2):
            out = os.path.join(tmp, f"dit_{rep}_{n}")
            cmd = [
                sys.executable,
                TRAIN_SCRIPT,
                "--latents_dir",
                latents_dir,
                "--model",
                model_name,
                "--train_batch_size",
                str(args.batch_size),
                "--max_train_steps",
                str(n),
                "--validation_steps",
                BIG,
                "--checkpointing_steps",
                BIG,
                "--report_to",
                "none",
                "--num_inference_steps",
                "1",
                "--mixed_precision",
                args.mixed_precision,
                "--output_dir",
                out,
            ]
            cmd += (["--stock_dit"] if args.self_conditioning_prob == 0 else
                    ["--pos_embed", "sincos", "--self_conditioning_prob", str(args.self_conditioning_prob)])  # fmt: skip
            if vae is not None:
                cmd += ["--pretrained_vae_model_name_or_path", vae]
            t.append(run(cmd, device))
        per_step.append(1e3 * (t[1] - t[0]) / (n2 - n1))
        walls.append(t)
        log(f"{model_name} script: {n1} steps {t[0]:.1f} s, {n2} steps {t[1]:.1f} s")
    return median(per_step), walls


def describe_env(device, args):
    import accelerate
    import diffusers

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    threads = f", {torch.get_num_threads()} torch threads" if device.type == "cpu" else ""
    omp = os.environ.get("OMP_NUM_THREADS")
    return (
        f"device={device} ({where}{threads}{f', OMP_NUM_THREADS={omp}' if omp else ''}), batch={args.batch_size}, "
        f"precision={args.mixed_precision}, self_conditioning_prob={args.self_conditioning_prob}, "
        f"classes={args.num_classes}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"accelerate {accelerate.__version__}"
    )


def pct(x, base):
    return f"{100 * (x / base - 1):+.1f}%"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["DiT-S/2"], help="DiT-{S,B,L,XL,tiny}/{1,2,4}.")
    parser.add_argument("--latents", nargs="+", type=parse_latents, default=["16x8x8", "4x32x32"], help="CxHxW.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_classes", type=int, default=7, help="Real classes of (a) and (b) (+1 null class).")
    parser.add_argument("--self_conditioning_prob", type=float, default=0.0, help="As the script's flag (paper 0.9).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed steps per variant, at least (after a warm-up).")
    parser.add_argument(
        "--min_seconds", type=float, default=8.0, help="Repeat until every variant has this much timed (cheap runs)."
    )
    parser.add_argument(
        "--warmup_all_below",
        type=float,
        default=5.0,
        help="Seconds: warm up every variant (not only (b)) when (b)'s warm-up step is quicker than this.",
    )
    parser.add_argument(
        "--script_latents",
        nargs="*",
        type=parse_latents,
        default=["16x8x8"],
        help="Latent shapes for (c); none skips it (4x32x32 costs ~(n1 + n2) DiT steps of ~10 s on 2 CPU cores).",
    )
    parser.add_argument("--script_steps", type=int, nargs=2, default=[10, 40], metavar=("N1", "N2"))
    parser.add_argument("--script_repeats", type=int, default=1, help="Pairs of script runs per configuration.")
    parser.add_argument("--script_num_latents", type=int, default=1024, help="Latents extracted for (c).")
    parser.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=10,
        help="(b)'s non-finite guard, as the script's flag (default 10, the script's): 0 skips its per-step copy.",
    )
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if not 0 < args.script_steps[0] < args.script_steps[1]:
        parser.error("--script_steps needs 0 < N1 < N2.")
    if args.script_num_latents < args.batch_size:
        parser.error("--script_num_latents must be at least --batch_size.")
    from accelerate import Accelerator

    device = torch.device(args.device)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=device.type == "cpu")
    print(describe_env(device, args))
    sc = args.self_conditioning_prob > 0
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_dit_") as tmp:
        extracted = {}
        for name in args.models:
            for latents in args.latents:
                med, n_params, reps = bench_in_process(accelerator, name, latents, args, device)
                r = {"model": name, "latents": latents, "med": med, "params": n_params, "reps": reps}
                if latents in args.script_latents:
                    if latents not in extracted:
                        extracted[latents] = extract(latents, args, tmp, device)
                    r["script"], r["walls"] = script_ms_per_step(name, *extracted[latents], args, tmp, device)
                results.append(r)

    header = ["model", "params", "latents (tokens)", "(a) bare ms"] + (["(a+aux) ms"] if sc else [])
    header += ["(b) loop ms", "(b) vs (a)"] + (["(b) vs (a+aux)"] if sc else [])
    header += ["(c) script ms", "(c) vs (a)"] + (["(c) vs (a+aux)"] if sc else [])
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    notes = []
    for r in results:
        med, s = r["med"], shape_of(r["latents"])[1]
        p = int(r["model"].rsplit("/", 1)[1])
        base = med["a+aux"] if sc else med["a"]
        row = [r["model"], f"{r['params'] / 1e6:.1f}M", f"{r['latents']} ({(s // p) ** 2})", f"{med['a']:.0f}"]
        row += [f"{med['a+aux']:.0f}"] if sc else []
        row += [f"{med['b']:.0f}", pct(med["b"], med["a"])] + ([pct(med["b"], base)] if sc else [])
        if "script" in r:
            row += [f"{r['script']:.0f}", pct(r["script"], med["a"])] + ([pct(r["script"], base)] if sc else [])
        else:
            row += ["n/a", "n/a"] + (["n/a"] if sc else [])
        print("| " + " | ".join(row) + " |")
        against = "(a+aux)" if sc else "(a)"
        for key, what in (("b", "loop step (b)"), ("script", "script (c)")):
            value = med["b"] if key == "b" else r.get("script")
            if value is None:
                continue
            verdict = "within" if value <= 1.10 * base else "ABOVE"
            notes.append(
                f"{r['model']} {r['latents']}: {what} {pct(value, base)} vs {against}, {verdict} the <= 10% target"
            )
        if "walls" in r:
            n1, n2 = args.script_steps
            walls = "; ".join(f"{t1:.1f} s / {t2:.1f} s" for t1, t2 in r["walls"])
            notes.append(f"{r['model']} {r['latents']}: script wall times for {n1} / {n2} steps: {walls}")
    print()
    print(
        f"ms per optimizer step at batch {args.batch_size}: (a), (b) medians of "
        f"{'/'.join(str(r['reps']) for r in results)} interleaved steps per variant (after a warm-up step); (c) median over {args.script_repeats} pair(s) of "
        f"script runs of (t2 - t1) / ({args.script_steps[1]} - {args.script_steps[0]}) steps."
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
