"""The diffusability bench: its --smoke run goes through every stage and writes a report whose numbers come from
the stages' own outputs; a rerun continues instead of redoing; bad arguments fail before any work; the statistics
and feature spaces it measures with."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusability_hf.metrics.bench import DomainClassifier, DomainFeatures, RandomFeatures, paired_comparison

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "train_scripts", "diffusability_bench.py")


def bench(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, BENCH, *map(str, args)], capture_output=True, text=True, env=env, **kwargs)


def test_smoke_run(tmp_path):
    """One test (one smoke run, whichever pytest-xdist worker gets it): every stage, the report, a rerun."""
    out, report = tmp_path / "bench", tmp_path / "report"
    proc = bench(["--smoke", "--output_dir", out, "--results_dir", report])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_every_stage(out)
    check_the_report(out, report)
    check_a_rerun_continues_and_other_settings_are_refused(out)


def check_every_stage(out):
    labels = ["vanilla", "plus-FT", "plus-FT-SE", "scratch", "scratchplus-SE"]
    for label in labels:
        assert (out / "ae" / label / "diffusion_pytorch_model.safetensors").is_file(), label
        assert (out / "latents_train" / label / "metadata.json").is_file()
        assert (out / "latents_reference" / label / "metadata.json").is_file()
        for seed in (0, 1):
            dit = out / "dit" / f"{label}-seed{seed}"
            assert (dit / "model_index.json").is_file() and (
                dit / "snapshots" / "step-2" / "model_index.json"
            ).is_file()
            for step in (2, 4):
                assert (out / "eval_dit" / f"{label}-seed{seed}" / f"step-{step}" / "metrics.json").is_file()
    for path in ("eval_ae/metrics.json", "eval_ae_fd/metrics.json", "spectrum/spectrum.json",
                 "spectrum_means/spectrum.json", "features_domain.pt", "features_random.pt", "fd_curve.png",
                 "loss_per_noise_level.png", "trajectories.png", "samples.png"):  # fmt: skip
        assert (out / path).is_file(), path
    # the data: class folders of the training photographs; held-out photographs are in no training folder
    train_classes = sorted(os.listdir(out / "data" / "train"))
    heldout = sorted(d for d in os.listdir(out / "data" / "heldout") if not d.startswith("."))
    assert heldout == ["chelsea", "coffee"] and not set(heldout) & set(train_classes) and len(train_classes) >= 7
    # +FT and +FT-SE start from the bench's vanilla and differ in the SE weight only; scratch starts from a config
    names = ("+FT", "+FT-SE", "scratch", "scratch+SE")
    logs = {n: (out / "logs" / ("train_" + n.replace("+", "plus-") + ".log")).read_text() for n in names}
    assert "alpha=0.0" in logs["+FT"] and "alpha=0.25" in logs["+FT-SE"] and "alpha=0.25" in logs["scratch+SE"]
    assert str(out / "ae" / "vanilla") in logs["+FT"].splitlines()[0]
    assert "--model_config_name_or_path" in logs["scratch"].splitlines()[0]


def check_the_report(out, report):
    result = json.loads((out / "report.json").read_text())
    labels = ["vanilla", "+FT", "+FT-SE", "scratch", "scratch+SE"]
    assert result["smoke"] is True and list(result["models"]) == labels
    eval_ae = json.loads((out / "eval_ae" / "metrics.json").read_text())
    for label in labels:
        assert result["reconstruction"][label]["psnr"]["mean"] == eval_ae["models"][label]["psnr"]["mean"]
        assert len(result["dct_cut_psnr"][label]) == 10
        assert 0 < result["spectrum_normalised_samples"][label]["hf_share"] < 1
        assert result["models"][label]["weights_fingerprint"] == eval_ae["models"][label]["weights_fingerprint"]
    # generation: each seed's FD is the one eval_dit wrote for the final pipeline, paired within each protocol
    for space in ("domain", "random"):
        for label in labels:
            tag = label.replace("+", "plus-")
            for seed in (0, 1):
                metrics = json.loads((out / "eval_dit" / f"{tag}-seed{seed}" / "step-4" / "metrics.json").read_text())
                value = next(v["value"] for k, v in metrics["metrics"].items() if f"features_{space}" in k)
                assert result["generation_fd"][space][label][str(seed)] == value
        fine = result["generation_comparisons"]["finetune"][space]
        assert list(fine) == ["vanilla", "+FT", "+FT-SE"] and "diff" not in fine["vanilla"]
        assert fine["+FT"]["baseline"] == "vanilla" and math.isfinite(fine["+FT-SE"]["diff"])
        assert result["generation_comparisons"]["scratch"][space]["scratch+SE"]["baseline"] == "scratch"
    assert len(result["loss_per_noise_level"]["+FT-SE"]["0"]["loss"]) == 4
    assert {v["pair"][0] for v in result["verdicts"]["generation"]} == {"+FT-SE", "scratch+SE"}
    assert result["seconds"]["total"] > 0
    # the published copy links only files it holds and names no absolute path of this run or checkout
    text = (report / "report.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (report / link).is_file(), link
    raw = (report / "report.json").read_text()
    assert str(out) not in raw and ROOT not in raw
    assert "Table 1" in text and "Fig. 8" in text and "Fig. 6" in text and "## Verdicts" in text


def check_a_rerun_continues_and_other_settings_are_refused(out):
    before = {p: p.stat().st_mtime for p in (out / "ae").rglob("*.safetensors")}
    proc = bench(["--smoke", "--output_dir", out])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p: p.stat().st_mtime for p in (out / "ae").rglob("*.safetensors")} == before  # nothing retrained
    times = json.loads((out / "times.json").read_text())
    assert len(times["invocations"]) == 2
    proc = bench(["--smoke", "--seeds", "0", "2", "--output_dir", out])
    assert proc.returncode == 2 and "other settings (seeds differ)" in proc.stderr
    assert "--overwrite_output_dir" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "3"], "at least 2 different seeds"),
        (["--jobs", "0"], "at least 1"),
        (["--finetune"], "--base_model PATH --finetune"),
        (["--models", "novalue"], "LABEL=PATH"),
        (["--models", "a=x", "a=y"], "labels must be different"),
        (["--train_data_dir", "/nonexistent/folder"], "is not a folder"),
    ],
)
def test_bad_arguments_fail_before_any_work(args, message, tmp_path):
    proc = bench([*args, "--output_dir", tmp_path / "out"])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_unrelated_output_folder_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    proc = bench(["--smoke", "--output_dir", tmp_path / "out"])
    assert proc.returncode == 2 and "holds no bench run" in proc.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_paired_comparison_matches_scipys_paired_t_test():
    from scipy import stats

    base = {0: 10.0, 1: 12.5, 2: 11.0, 3: 9.0}
    other = {0: 9.1, 1: 12.0, 2: 9.9, 3: 8.7}
    summary = paired_comparison({"base": base, "other": other}, "base")
    test = stats.ttest_rel(list(other.values()), list(base.values()))
    low, high = test.confidence_interval(0.95)
    row = summary["other"]
    assert row["diff_ci95"] == pytest.approx([low, high]) and row["ci95_excludes_zero"] == (test.pvalue < 0.05)
    assert row["diff"] == pytest.approx(np.mean(list(other.values())) - np.mean(list(base.values())))
    assert summary["base"]["std"] == pytest.approx(np.std(list(base.values()), ddof=1))
    with pytest.raises(ValueError, match="must be paired"):
        paired_comparison({"base": base, "other": {0: 1.0, 1: 2.0}}, "base")


def test_feature_spaces_are_deterministic_scriptable_and_independent():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = RandomFeatures(seed=0), RandomFeatures(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    x = torch.rand(3, 3, 64, 64)
    assert torch.equal(a(x), b(x)) and a(x).shape == (3, 128)
    assert not torch.equal(RandomFeatures(seed=1)(x), a(x))
    scripted = torch.jit.script(RandomFeatures(seed=0).eval())
    assert torch.allclose(scripted(x), a(x), atol=1e-6)
    classifier = DomainClassifier(num_classes=5)
    feats = DomainFeatures(classifier)
    assert torch.allclose(feats(x), classifier.features(x * 2 - 1)) and feats(x).shape == (3, 128)


def test_ablation_smoke_varies_one_factor_per_cell(tmp_path):
    out = tmp_path / "ablation"
    proc = bench(["--ablation", "--smoke", "--output_dir", out])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "report.json").read_text())
    cells = {(c["factor"], c["level"]): c for c in result["cells"]}
    assert {factor for factor, _ in cells} == {"latent size", "DiT training length", "DiT recipe", "SE scales"}
    small, big = (c for (f, _), c in cells.items() if f == "latent size")
    assert (small["no_se"], small["se"], big["no_se"], big["se"]) == (
        "+FT 8x8",
        "+FT-SE 8x8",
        "+FT 16x16",
        "+FT-SE 16x16",
    )
    assert result["models"]["+FT 8x8"]["resolution"] == 64 and result["models"]["+FT 16x16"]["resolution"] == 128
    short, long = (c for (f, _), c in cells.items() if f == "DiT training length")
    assert (short["dit_steps"], long["dit_steps"]) == (4, 8) and "fd_curve" in long and "fd_curve" not in short
    recipes = {c["recipe"] for (f, _), c in cells.items() if f == "DiT recipe"}
    assert recipes == {"appb", "stock"}
    stock = json.loads((out / "dit_configs" / "plus-FT_16x16-stock" / "config.json").read_text())
    assert stock["_class_name"] == "DiTTransformer2DModel"
    scales = [c for (f, _), c in cells.items() if f == "SE scales"]
    assert scales[1]["se"] == "+FT-SE {2} 16x16"
    log = (out / "logs" / "train_plus-FT-SE_2_16x16.log").read_text().splitlines()[0]
    assert "--se_scale_factors 2" in log and "--resolution 128" in log
    # each cell's numbers are the paired comparison of the two runs' final FDs
    for cell in result["cells"]:
        for space in ("domain", "random"):
            row = cell["comparisons"][space][cell["se"]]
            base = cell["comparisons"][space][cell["no_se"]]
            assert row["diff"] == pytest.approx(row["mean"] - base["mean"]) and cell["verdict"]
    text = (out / "report.md").read_text()
    assert "Where SE helps the generator" in text and "stock DiT" in text


RACE = """
import os
from concurrent.futures import ThreadPoolExecutor
import diffusability_bench as bench
bench.SCRIPTS, bench.PRELOAD = {tmp!r}, ["diffusability_bench"]
def one(i):
    return bench.run("ok.py", i, log=os.path.join({tmp!r}, f"{{i}}.log"), threads=1)
with ThreadPoolExecutor(8) as pool:
    list(pool.map(one, range(160)))
print("all succeeded")
"""


def test_parallel_runs_read_every_exit_code_correctly(tmp_path):
    """The bench runs scripts from several threads at once; a child that succeeded must never read as failed
    (forkserver's exit-code pipe, read twice by racing polls, gave 255 for about a fifth of such runs)."""
    (tmp_path / "ok.py").write_text("import sys\nassert len(sys.argv) == 2\n")
    # on the path of the fork server too, which preloads the bench once instead of each child importing it
    path = os.pathsep.join([os.path.join(ROOT, "train_scripts"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    code = RACE.format(tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "all succeeded" in proc.stdout, proc.stderr[-3000:]
