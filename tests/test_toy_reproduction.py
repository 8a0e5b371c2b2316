"""The toy reproduction's --smoke mode: every stage runs through the toolkit's scripts and writes its files, and the
tables hold finite numbers."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_run_produces_every_stage(tmp_path):
    out = tmp_path / "toy"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    script = os.path.join(ROOT, "experiments", "toy_reproduction", "run.py")
    proc = subprocess.run(
        [sys.executable, script, "--smoke", "--output_dir", str(out), "--results_dir", str(tmp_path / "report")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for path in (
        "results.md", "results.json", "ae-ft/diffusion_pytorch_model.safetensors",
        "ae-ft-se/diffusion_pytorch_model.safetensors", "eval_ae/dct_cut.png", "spectrum/spectrum.png",
        "domain_features.pt", "latents-ft-se/metadata.json", "dit-ft-se-seed1/model_index.json",
        "eval-dit-vanilla-seed0/samples_grid.png", "samples.png",
    ):  # fmt: skip
        assert (out / path).exists(), path
    # the report is copied with the plots it links to, and names no absolute path of this run or checkout
    report = (tmp_path / "report" / "results.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", report):
        assert (tmp_path / "report" / link).is_file(), link
    raw = (tmp_path / "report" / "results.json").read_text()
    assert str(tmp_path) not in raw and ROOT not in raw
    result = json.loads((out / "results.json").read_text())
    assert result["smoke"] is True and 0 <= result["domain_classifier_accuracy"] <= 1
    for name in ("vanilla", "ft", "ft-se"):
        assert math.isfinite(result["reconstruction"][name]["psnr"]["mean"])
        assert 0 < result["spectrum"][name] < 1
        assert len(result["dct_cut_psnr"][name]) == 10
        gen = result["generation"][name]
        assert len(gen["fd_per_seed"]) == 2 and all(math.isfinite(v) and v >= 0 for v in gen["fd_per_seed"].values())
        assert math.isfinite(gen["mean"]) and math.isfinite(gen["std"])
    # +FT and +FT-SE differ only in the SE weight: their training logs say so
    logs = {n: (out / "logs" / f"train_{n}.log").read_text() for n in ("ft", "ft-se")}
    assert "alpha=0.0" in logs["ft"] and "alpha=0.25" in logs["ft-se"]
    text = (out / "results.md").read_text()
    assert "Table 4" in text and "Fig. 8" in text and "Table 1" in text and "nan" not in text.split("## Generation")[0]


def test_bad_arguments_fail_before_any_work(tmp_path):
    script = os.path.join(ROOT, "experiments", "toy_reproduction", "run.py")
    for args, message in ((["--seeds", "3"], "at least 2 different seeds"), (["--jobs", "0"], "at least 1")):
        out = tmp_path / "out"
        proc = subprocess.run(
            [sys.executable, script, *args, "--output_dir", str(out)], capture_output=True, text=True
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not out.exists()


def _run_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "toy_run", os.path.join(ROOT, "experiments", "toy_reproduction", "run.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_comparison_statistics():
    from scipy import stats

    run = _run_module()
    fd = {"vanilla": {0: 10.0, 1: 12.0, 2: 9.0}, "ft-se": {2: 9.5, 0: 11.0, 1: 14.0}}
    row = run.compare_to_baseline(fd)["ft-se"]
    diffs = [1.0, 2.0, 0.5]  # paired by seed, whatever the dict order
    assert math.isclose(row["mean"], (11.0 + 14.0 + 9.5) / 3)
    assert math.isclose(row["std"], float(stats.tstd([11.0, 14.0, 9.5])))
    assert math.isclose(row["diff_vs_vanilla"], sum(diffs) / 3)
    se = float(stats.sem(diffs))
    assert math.isclose(row["diff_standard_error"], se)
    # the same interval as scipy's paired t-test: excludes 0 exactly when its p-value is below 0.05
    low, high = stats.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=se)
    assert math.isclose(row["diff_ci95"][0], low) and math.isclose(row["diff_ci95"][1], high)
    p = stats.ttest_rel([11.0, 14.0, 9.5], [10.0, 12.0, 9.0]).pvalue
    assert row["ci95_excludes_zero"] == (p < 0.05)
    with pytest.raises(ValueError, match="paired"):
        run.compare_to_baseline({"vanilla": {0: 1.0, 1: 2.0}, "ft": {0: 1.0, 2: 2.0}})


def test_a_failed_run_cancels_the_queued_ones():
    run = _run_module()
    started = []

    def task(k, threads):
        started.append(k)
        if k == 0:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run.in_parallel([lambda t, k=k: task(k, t) for k in range(6)], jobs=1, cores=2)
    assert started[0] == 0 and len(started) <= 2  # at most the run the worker had already picked up
