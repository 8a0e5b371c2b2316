"""benchmarks/bench_compile.py's --tiny mode compiles the DiT training step, prints its table, and the compiled losses
equal the eager ones (no timing asserts); without a C++ compiler it reports so and times the AE step eagerly.
Inductor caches its kernels on disk: about 20 s once they are cached, about 2 minutes on a machine's first run."""

import importlib.util
import os
import subprocess
import sys

import pytest

from testing_utils import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "bench_compile.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


def table(stdout):
    """The markdown table as {step: {column: cell}}."""
    header, _, *rows = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("|")
    ]
    return {row[0]: dict(zip(header, row)) for row in rows}


def load_bench_compile():
    """benchmarks/bench_compile.py as a module, for its in-process checks."""
    spec = importlib.util.spec_from_file_location("bench_compile", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def run(*flags, env=ENV, timeout=900):
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--tiny", *flags], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("device=cpu")
    return table(proc.stdout)


def test_tiny_compiles_the_dit_step_and_losses_match():
    """Inductor on the DiT step (about 2 minutes on 2 cores with a cold kernel cache; the AE step's compile takes
    about twice that, so CI runs it eagerly below and tests/test_compile_flag.py compiles the AE script's step)."""
    rows = run("--benchmarks", "dit")
    assert list(rows) == ["dit"]
    assert rows["dit"]["model"].startswith("DiT-tiny/2, 4x4x4")
    for step, row in rows.items():
        assert row["status"] == "ok", (step, row["status"])  # inductor works here (g++)
        assert float(row["eager ms"]) > 0 and float(row["compiled ms"]) > 0
        assert row["speedup"].endswith("x") and float(row["compile s"]) == float(row["compile s"])
        # Same weights, inputs and generator: the step-1 loss and gradient norm agree to float noise
        assert row["match"] == "yes", row
        assert abs(float(row["loss compiled"]) - float(row["loss eager"])) <= 1e-4 * abs(float(row["loss eager"]))
        assert float(row["grad-norm rel diff"]) <= 1e-3
        # No recompile during the timed steps: every shape was seen in the warm-up
        assert row["graphs (+timed)"].endswith("(+0)") and int(row["graphs (+timed)"].split()[0]) >= 1


def test_without_a_cxx_compiler_it_reports_and_times_eager(tmp_path):
    env = dict(ENV, CXX=str(tmp_path / "no-such-g++"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    rows = run("--benchmarks", "ae", env=env, timeout=300)
    row = rows["ae"]
    assert row["model"] == "tiny AE, 16px"
    assert row["status"].startswith("inductor unavailable") and "C++ compiler" in row["status"]
    assert float(row["eager ms"]) > 0 and row["compiled ms"] == "n/a" and row["match"] == "n/a"


def test_bad_model_is_refused_before_any_work(monkeypatch, capsys):
    bench = load_bench_compile()
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--model", "DiT-S/4", "--latents", "4x6x6"])
    with pytest.raises(SystemExit) as exit:
        bench.main()
    assert exit.value.code == 2 and "patch" in capsys.readouterr().err.lower()


def test_inductor_probe_tolerates_an_ulp_and_catches_a_wrong_kernel(monkeypatch):
    """The probe's verdict is deterministic: inductor's vectorised sin may differ from ATen's by a float32 ulp
    (with a random input and allclose's default tolerance, about 6% of probes called that a wrong result), while a
    kernel that computes something else is still refused."""
    import torch

    bench = load_bench_compile()
    inf = torch.tensor(float("inf"))
    kernels = {
        "ulp": lambda x: torch.nextafter(torch.sin(x), inf) + 1,  # sin one float32 ulp off, as inductor's may be
        "wrong": lambda x: torch.cos(x) + 1,
    }
    for name, kernel in kernels.items():
        monkeypatch.setattr(torch, "compile", lambda fn, kernel=kernel, **kwargs: kernel)
        for seed in range(100):  # whatever the global random state
            torch.manual_seed(seed)
            status = bench.inductor_status()
            assert status == ("ok" if name == "ulp" else "inductor unavailable: wrong result on a test function")
