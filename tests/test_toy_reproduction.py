"""The toy reproduction's --smoke mode: every stage runs through the toolkit's scripts and writes its files, and the
tables hold finite numbers."""

import json
import math
import os
import re
import subprocess
import sys

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
