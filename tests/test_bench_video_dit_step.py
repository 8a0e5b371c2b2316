"""benchmarks/bench_video_dit_step.py's smoke mode runs its variants and prints its table (no timing asserts)."""

import argparse
import importlib.util
import os
import subprocess
import sys

import pytest

from testing_utils import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "bench_video_dit_step.py")


def table(stdout):
    """The markdown table's rows (header first), as lists of cells."""
    rows = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


@pytest.mark.parametrize(
    "latents, extra, columns",
    [
        (["4x2x4x4", "8x3x4x4"], [], 10),  # self-conditioning (default 0.9): (a+aux) and 'vs (a+aux)' columns
        (["4x2x4x4"], ["--self_conditioning_prob", "0", "--pos_embed", "sincos"], 8),
    ],
)
def test_smoke_prints_the_table(latents, extra, columns):
    cmd = [
        sys.executable,
        SCRIPT,
        "--models",
        "DiT-tiny/2",
        "--batch_size",
        "2",
        "--repeats",
        "1",
        "--min_seconds",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        cmd + ["--latents", *latents] + extra, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("device=cpu")
    header, *rows = table(proc.stdout)
    assert len(header) == columns and header[-1] == "(b) tokens/s"
    assert ("(a+aux) ms" in header) == (columns == 10)
    assert [r[1] for r in rows] == latents
    assert [r[2] for r in rows] == [str(int(s.split("x")[1]) * 4) for s in latents]  # T' * (4 / 2)^2 tokens
    assert all(len(r) == columns for r in rows)


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_video_dit_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_tokens_and_refusals_before_timing(monkeypatch, capsys):
    bench = load_bench()
    assert bench.tokens_of("DiT-S/2", "16x5x8x8") == 80 and bench.tokens_of("DiT-B/1", "128x3x8x8") == 192
    for bad in ("16x8x8", "16x5x8x6"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_latents(bad)
    # Model names and patch sizes are checked against every latent shape before any model is built
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--models", "DiT-tiny/4", "--latents", "4x2x6x6"])
    with pytest.raises(SystemExit) as exit:
        bench.main()
    assert exit.value.code == 2 and "does not divide the latent size 6" in capsys.readouterr().err
