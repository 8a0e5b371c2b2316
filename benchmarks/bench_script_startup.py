#!/usr/bin/env python
"""What a tiny end-to-end run of ``train_ae_se.py`` costs as its own process against in this one.

The test suite runs the scripts end to end on tiny autoencoders, mostly as subprocesses. This times the same
4-step run (the tests' quick settings, a random 2-halving ``AutoencoderKL`` at 32 px, one thread) ``--runs`` times
as ``python train_scripts/train_ae_se.py`` and ``--runs`` times in this process through the command line's own path
(``errors.run_script(main, parse_args)``, as ``tests/testing_utils.run_in_process`` does), and checks that both
write the same weights and the same metrics (timings and memory aside). The difference is the interpreter's start
and the imports (torch, diffusers, accelerate, torchvision, matplotlib, datasets), paid again by every subprocess.

``--launch`` times the same run on 2 processes instead: through ``torchrun`` (two fresh interpreters and its agent)
and through ``tests/testing_utils.Forked`` (two processes with torchrun's environment, forked from a server that has
imported torch, diffusers and the toolkit; its first launch starts the server), and checks that both write the same
weights.

    python benchmarks/bench_script_startup.py [--runs 3] [--launch]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the tests' quick settings (tests/test_train_ae_se.py FAST)
QUICK = ["--resolution", 32, "--train_batch_size", 2, "--report_to", "none", "--validation_steps", 2,
         "--num_validation_images", 2, "--learning_rate", 1e-3, "--max_train_steps", 4]  # fmt: skip


def flat(d, prefix=""):
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="Runs of each kind (the first in-process one imports).")
    parser.add_argument("--launch", action="store_true", help="Compare 2-process launches: torchrun and forked.")
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1")
    sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tests' tiny autoencoder and in-process runner
    import torch
    import torchvision
    from safetensors.torch import load_file

    from testing_utils import Forked, run_in_process, tiny_autoencoder_kl, torchrun

    torch.set_num_threads(1)
    tmp = tempfile.mkdtemp()
    vae = os.path.join(tmp, "vae")
    tiny_autoencoder_kl((8, 16, 16), mid_block_add_attention=False).save_pretrained(vae)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), os.path.join(vae, "alexnet_trunk.pth"))

    def argv(out):
        trunk = os.path.join(vae, "alexnet_trunk.pth")
        return [str(a) for a in ["--pretrained_model_name_or_path", vae, "--output_dir", out, *QUICK,
                                 "--lpips_trunk_path", trunk]]  # fmt: skip

    script = os.path.join(ROOT, "train_scripts", "train_ae_se.py")
    if args.launch:
        return compare_launches(args.runs, script, argv, tmp, torchrun, Forked)
    times = {"subprocess": [], "in-process": []}
    for i in range(args.runs):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, script, *argv(os.path.join(tmp, f"sub{i}"))], capture_output=True)
        times["subprocess"].append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    for i in range(args.runs):
        start = time.perf_counter()
        code, err = run_in_process("train_ae_se.py", argv(os.path.join(tmp, f"in{i}")))
        times["in-process"].append(time.perf_counter() - start)
        assert code == 0, err[-3000:]

    a = load_file(os.path.join(tmp, "sub0", "diffusion_pytorch_model.safetensors"))
    b = load_file(os.path.join(tmp, f"in{args.runs - 1}", "diffusion_pytorch_model.safetensors"))
    same_weights = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (flat(json.load(open(os.path.join(tmp, d, "metrics.json")))) for d in ("sub0", f"in{args.runs - 1}"))
    timing = ("throughput.", "peak_memory", "seconds")
    differ = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k) and not any(t in k for t in timing))
    for kind, values in times.items():
        print(f"{kind:>11}: " + ", ".join(f"{v:.1f} s" for v in values))
    print(f"same weights: {same_weights}; metrics that differ besides timings and memory: {differ or 'none'}")


def compare_launches(runs, script, argv, tmp, torchrun, forked):
    """The run on 2 processes, ``runs`` times through torchrun and ``runs`` times forked, one port per launch."""
    import torch
    from safetensors.torch import load_file

    env = dict(os.environ)
    times = {"torchrun": [], "forked": []}
    for i in range(runs):
        start = time.perf_counter()
        cmd = [*torchrun(29591 + 2 * i), script, *argv(os.path.join(tmp, f"torchrun{i}"))]
        proc = subprocess.run(cmd, capture_output=True, env=env)
        times["torchrun"].append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    for i in range(runs):
        start = time.perf_counter()
        proc = forked(29592 + 2 * i)(script, argv(os.path.join(tmp, f"forked{i}")), env)
        times["forked"].append(time.perf_counter() - start)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (load_file(os.path.join(tmp, d, "diffusion_pytorch_model.safetensors")) for d in ("torchrun0", "forked0"))
    for kind, values in times.items():
        print(f"{kind:>9}: " + ", ".join(f"{v:.1f} s" for v in values))
    print(f"same weights: {a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)}")


if __name__ == "__main__":
    main()
