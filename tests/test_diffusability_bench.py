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

from testing_utils import ROOT, run_in_process, run_script_in_process

BENCH = os.path.join(ROOT, "train_scripts", "diffusability_bench.py")


def bench(args, **kwargs):
    """The command as its own process: for the exit-code contract (one test)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, BENCH, *map(str, args)], capture_output=True, text=True, env=env, **kwargs)


def bench_in_process(args):
    """The command's path in this process (``run_script_in_process``): the smokes' stages still run as their own
    processes, forked from the bench's server, which a test worker starts once for all the smokes it runs."""
    return run_script_in_process("diffusability_bench.py", args)


@pytest.mark.minutes
def test_smoke_run(tmp_path):
    """One test (one smoke run, whichever pytest-xdist worker gets it): every stage, the report, a rerun."""
    out, report = tmp_path / "bench", tmp_path / "report"
    proc = bench_in_process(["--smoke", "--output_dir", out, "--results_dir", report])
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
        assert list(result["dct_cut_psnr"][label]) == ["0.0", "0.5", "0.9"]  # --smoke's ratios
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
    # every generator is checked as an instrument; class accuracy is the saved classifier's on the written samples
    classifier = torch.jit.load(str(out / "classifier_domain.pt")).eval()
    samples = out / "eval_dit" / "plus-FT-seed0" / "step-4" / "samples"
    labels = json.loads((samples / "labels.json").read_text())
    from PIL import Image

    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(samples / n).convert("RGB")).copy())
                          for n in sorted(labels)]).permute(0, 3, 1, 2).float() / 127.5 - 1  # fmt: skip
    with torch.no_grad():
        hits = (classifier(pixels).argmax(1) == torch.tensor([labels[n] for n in sorted(labels)])).float().mean()
    assert result["instrument"]["+FT"]["per_seed"]["0"]["class_accuracy"] == pytest.approx(float(hits))
    for verdict in result["verdicts"]["generation"]:
        usable = all(result["instrument"][label]["flags"]["usable"] for label in verdict["pair"])
        assert verdict["verdict"].startswith("no verdict") == (not usable)
    assert result["seconds"]["total"] > 0
    # the cheap proxies of every autoencoder, as diffusability_score.py wrote them for the same weights
    from diffusability_hf.metrics.diffusability import PROXIES

    scores = json.loads((out / "score" / "scores.json").read_text())["models"]
    for label in result["models"]:
        assert scores[label]["weights_fingerprint"] == eval_ae["models"][label]["weights_fingerprint"]
        assert result["diffusability_score"][label] == {p: scores[label][p] for p in PROXIES}
    # the published copy links only files it holds and names no absolute path of this run or checkout
    text = (report / "report.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (report / link).is_file(), link
    raw = (report / "report.json").read_text()
    assert str(out) not in raw and ROOT not in raw
    assert "Table 1" in text and "Fig. 8" in text and "Fig. 6" in text and "## Verdicts" in text
    assert "Is each generator an instrument?" in text and "## Diffusability score" in text


def check_a_rerun_continues_and_other_settings_are_refused(out):
    """In-process (the command line's path): a rerun of a finished bench starts no script, only reads and reports."""
    before = {p: p.stat().st_mtime for p in (out / "ae").rglob("*.safetensors")}
    code, stderr = run_in_process("diffusability_bench.py", ["--smoke", "--output_dir", out])
    assert code == 0, stderr[-3000:]
    assert {p: p.stat().st_mtime for p in (out / "ae").rglob("*.safetensors")} == before  # nothing retrained
    times = json.loads((out / "times.json").read_text())
    assert len(times["invocations"]) == 2
    code, stderr = run_in_process("diffusability_bench.py", ["--smoke", "--seeds", "0", "2", "--output_dir", out])
    assert code == 2 and "other settings (seeds differ)" in stderr
    assert "--overwrite_output_dir" in stderr and "Traceback" not in stderr


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
    """In-process (the command line's path); the next test runs the command for its exit code."""
    code, stderr = run_in_process("diffusability_bench.py", [*args, "--output_dir", tmp_path / "out"])
    assert code == 2 and message in stderr, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
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


@pytest.mark.minutes
def test_ablation_smoke_varies_one_factor_per_cell(tmp_path):
    out = tmp_path / "ablation"
    proc = bench_in_process(["--ablation", "--smoke", "--output_dir", out])
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
    assert (short["dit_steps"], long["dit_steps"]) == (4, 8) and "fd_curve" in long and "fd_curve" in short
    recipes = {c["recipe"] for (f, _), c in cells.items() if f == "DiT recipe"}
    assert recipes == {result["settings"]["dit_recipe"], "stock"}
    stock = json.loads((out / "dit_configs" / "plus-FT_16x16-stock" / "config.json").read_text())
    assert stock["_class_name"] == "DiTTransformer2DModel"
    # the recipe cell holds the init equal: the stock DiT is trained with the App. B cell's label-table init
    app_b = json.loads((out / "dit" / "plus-FT_16x16-seed0" / "transformer" / "config.json").read_text())
    stock_log = (out / "logs" / "dit_plus-FT_16x16-stock-4-seed0.log").read_text().splitlines()[0]
    assert "--stock_dit" in stock_log and f"--class_embed_init_std {app_b['class_embed_init_std']}" in stock_log
    for cell in result["cells"]:  # every generator's instrument check, and no verdict on an unusable one
        flags = [cell["instrument"][n]["flags"] for n in (cell["no_se"], cell["se"])]
        assert cell["verdict"].startswith("no verdict") == (not all(f["usable"] for f in flags))
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
from diffusability_hf.bench import runner
runner.PRELOAD = ["diffusability_hf.bench.runner"]
def one(i):
    return runner.run(os.path.join({tmp!r}, "ok.py"), i, log=os.path.join({tmp!r}, f"{{i}}.log"), threads=1, cwd={tmp!r})
with ThreadPoolExecutor(8) as pool:
    list(pool.map(one, range(160)))
print("all succeeded")
"""


@pytest.mark.slow
def test_parallel_runs_read_every_exit_code_correctly(tmp_path):
    """The bench runs scripts from several threads at once (diffusability_hf.bench.runner); a child that succeeded
    must never read as failed (forkserver's exit-code pipe, read twice by racing polls, gave 255 for about a fifth of
    such runs)."""
    (tmp_path / "ok.py").write_text("import sys\nassert len(sys.argv) == 2\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    code = RACE.format(tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "all succeeded" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.minutes
def test_select_recipe_smoke_tries_every_recipe_on_vanilla_only_and_applies_the_rule(tmp_path):
    out = tmp_path / "recipe"
    proc = bench_in_process(["--select_recipe", "--smoke", "--output_dir", out])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out / "ae")) == ["vanilla"]  # no SE autoencoder is made or looked at
    from diffusability_hf.bench.rules import select_recipe
    from diffusability_hf.bench.settings import slug
    from diffusability_hf.models.dit import RECIPES

    result = json.loads((out / "report.json").read_text())
    assert list(result["candidates"]) == list(RECIPES) and result["seeds"] == [10, 11]
    for recipe, cand in result["candidates"].items():
        tag = "vanilla" if recipe == result["settings"]["dit_recipe"] else f"vanilla-{slug(recipe)}-4"
        config = json.loads((out / "dit" / f"{tag}-seed10" / "transformer" / "config.json").read_text())
        assert (config["pos_embed"], config["class_embed_init_std"]) == (
            RECIPES[recipe]["pos_embed"], RECIPES[recipe]["class_embed_init_std"])  # fmt: skip
        metrics = json.loads((out / "eval_dit" / f"{tag}-seed11" / "step-4" / "metrics.json").read_text())
        gain = metrics["loss_per_noise_level"]["class_gain"]
        assert cand["diagnostics"]["per_seed"]["11"]["class_gain"] == pytest.approx(np.mean(gain))
    chosen, _ = select_recipe({r: {**{k: c[k] for k in ("well_above", "fd_mean", "fd_std")},
                                          "layout_blind": c["diagnostics"]["flags"]["layout_blind"]}
                                      for r, c in result["candidates"].items()})  # fmt: skip
    assert result["chosen"] == chosen and f"**Chosen: `{chosen}`**" in (out / "report.md").read_text()


def load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("diffusability_bench_under_test", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipe_rule_is_the_protocols():
    """experiments/dit_recipe/PROTOCOL.md: the lowest FD among candidates well above chance; an earlier-listed
    runner-up within the larger seed std wins; none well above chance keeps App. B as printed."""
    from diffusability_hf.bench.rules import select_recipe as rule

    def cand(ok, fd, std=1.0, layout_blind=False):
        return {"well_above": ok, "fd_mean": fd, "fd_std": std, "layout_blind": layout_blind}

    assert rule({"a": cand(False, 10), "b": cand(True, 30), "c": cand(True, 20)})[0] == "c"
    assert rule({"a": cand(True, 20.5), "b": cand(True, 20), "c": cand(True, 25)})[0] == "a"  # tie-break
    assert rule({"a": cand(True, 21.5), "b": cand(True, 20), "c": cand(True, 25)})[0] == "b"  # beyond the std
    assert rule({"a": cand(True, 20.5), "b": cand(True, 20, std=0.1), "c": cand(True, 25)})[0] == "a"  # larger std
    assert rule({"a": cand(True, 25), "b": cand(True, 20), "c": cand(True, 20.5)})[0] == "b"  # runner-up later
    chosen, reason = rule({"a": cand(False, 10), "b": cand(False, 5)})
    assert chosen == "a" and "no generation verdict" in reason
    # the amendment: a layout-blind candidate is not eligible (the registered rule did not look at layout)
    blind = {"a": cand(False, 60), "b": cand(True, 23.4, layout_blind=True), "c": cand(True, 22.7)}
    assert rule(blind)[0] == "c" and rule(blind, require_layout=False)[0] == "b"
    assert rule({"a": cand(True, 20, layout_blind=None)})[0] == "a"  # no layout in the data: not held against it


def test_the_score_rule_is_the_protocols():
    """experiments/diffusability_score/PROTOCOL.md: Spearman >= 0.8 on the usable generators AND at most 120 s per
    AE; the cheapest such proxy is recommended; too few usable generators give no verdict."""
    from scipy import stats

    from diffusability_hf.bench.rules import study_verdict

    def r(rho):
        return {"spearman": rho, "interval": [rho - 0.3, 1.0]}

    primary = {"slow": r(0.95), "cheap": r(0.85), "mid": r(0.9), "weak": r(0.5), "none": r(float("nan"))}
    cost = {"slow": 200.0, "cheap": 20.0, "mid": 60.0, "weak": 5.0, "none": 1.0}
    usable = list("abcdef")
    verdict, chosen = study_verdict(primary, cost, usable, usable, 5)
    assert chosen == "cheap" and verdict.startswith("cheap, mid meet the target") and "slow" not in verdict
    verdict, chosen = study_verdict({"slow": r(0.95), "weak": r(0.5)}, cost, usable, usable, 5)
    assert chosen is None and "no proxy meets the target" in verdict and "the best is slow at +0.95" in verdict
    verdict, chosen = study_verdict(primary, cost, usable[:4], usable, 5)
    assert chosen is None and verdict.startswith("no verdict: 4 of 6 generators")
    # the boundaries belong to the target: exactly 0.8 (as scipy computes it for five AEs) and exactly 120 s
    rho = stats.spearmanr([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]).statistic  # 0.7999999999999999
    assert study_verdict({"edge": r(rho)}, {"edge": 120.0}, usable, usable, 5)[1] == "edge"
    assert study_verdict({"edge": r(0.79)}, {"edge": 120.0}, usable, usable, 5)[1] is None
    assert study_verdict({"edge": r(0.9)}, {"edge": 120.5}, usable, usable, 5)[1] is None
    # a NaN Spearman is never the best, and a proxy without a measured cost is not ranked
    verdict, _ = study_verdict({"none": r(float("nan")), "weak": r(0.5)}, cost, usable, usable, 5)
    assert "the best is weak" in verdict
    verdict, chosen = study_verdict({"uncosted": r(0.99)}, {}, usable, usable, 5)
    assert chosen is None and verdict.startswith("no verdict: no proxy has both")


def test_no_verdict_on_a_generator_that_cannot_rank():
    from diffusability_hf.bench.rules import generation_verdict as verdict

    row = {"diff": -3.0, "diff_ci95": [-5.0, -1.0], "ci95_excludes_zero": True}
    both = {"domain": row, "random": row}
    assert verdict(both, "se", "base")["verdict"].startswith("supported")
    assert verdict(both, "se", "base", {"se": [], "base": []})["verdict"].startswith("supported")
    blind = verdict(both, "se", "base", {"se": [], "base": ["class-blind"], "other": ["layout-blind"]})
    assert blind["verdict"] == "no verdict: the generators cannot rank latent spaces (base's is class-blind)"
    assert "better" in blind["detail"]


def test_instrument_diagnostics_against_independent_computations():
    from scipy import stats

    from diffusability_hf.metrics.bench import (
        class_accuracy,
        class_position_means,
        instrument_flags,
        layout_correlation,
        thumbnail_features,
        well_above_chance,
    )

    class Colour(torch.nn.Module):  # classifies an image by its dominant channel
        def forward(self, x):
            return x.mean(dim=(2, 3))

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    images = -torch.ones(30, 3, 16, 16)
    images[torch.arange(30), labels] = 1.0
    assert class_accuracy(Colour(), images, labels, batch_size=7) == 1.0
    assert class_accuracy(Colour(), images, (labels + 1) % 3) == 0.0
    check = well_above_chance(40, 100, 5)
    assert check["p_value"] == pytest.approx(stats.binomtest(40, 100, 0.2, alternative="greater").pvalue)
    assert check["well_above"] and not well_above_chance(30, 100, 5)["well_above"]  # significant, under 2x chance
    assert not well_above_chance(3, 5, 5)["well_above"]  # 3x chance, but 5 samples prove nothing

    # layout: a class whose top half is bright; the same layout correlates 1, a flipped one -1, noise about 0
    top = torch.zeros(20, 3, 16, 16)
    top[:, :, :8] = 1.0
    lab = torch.zeros(20, dtype=torch.long)
    ref = class_position_means(top, lab, 2)
    assert torch.isnan(ref[1]).all() and ref[0].shape == (3, 8, 8)
    assert ref[0].mean(dim=(-1, -2)).abs().max() < 1e-6  # colour removed: layout only
    assert layout_correlation(class_position_means(top + 5, lab, 2), ref) == pytest.approx(1.0)
    assert layout_correlation(class_position_means(top.flip(2), lab, 2), ref) == pytest.approx(-1.0)
    noise = torch.randn(2000, 3, 16, 16, generator=gen)
    assert abs(layout_correlation(class_position_means(noise, torch.zeros(2000, dtype=torch.long), 2), ref)) < 0.2
    thumbs = thumbnail_features(top, size=4)
    assert thumbs.shape == (20, 48) and thumbs[0, 0] == 1.0 and thumbs[0, 15] == 0.0

    ok = {"well_above": True}
    assert instrument_flags(ok, 0.6, 0.8, 0.1, 0.5)["usable"]
    assert instrument_flags({"well_above": False}, 0.6, 0.8, 0.1, 0.5)["class_blind"]
    assert instrument_flags(ok, 0.3, 0.8, 0.1, 0.5)["layout_blind"]
    assert instrument_flags(ok, 0.3, -0.1, 0.1, 0.5)["layout_blind"] is None  # no layout in the data to miss
    flags = instrument_flags(ok, 0.6, 0.8, 2.0, 0.5)
    assert flags["still_improving"] and not flags["usable"]
    assert instrument_flags(ok, 0.6, 0.8, float("nan"), float("nan"))["still_improving"] is None


def test_the_default_run_trains_the_chosen_length_and_the_selection_its_registered_one():
    """experiments/dit_length chose 1200 DiT steps for the default run; --select_recipe keeps its protocol's 600."""
    from diffusability_hf.bench.settings import settings_for

    parse_args = load_bench().parse_args

    def steps(*argv):
        return settings_for(parse_args(list(argv)))["dit_steps"]

    assert steps() == 1200 and steps("--ablation") == 1200
    assert steps("--select_recipe") == 600 and steps("--select_recipe", "--dit_steps", "900") == 900
    assert steps("--select_recipe", "--smoke") == steps("--smoke") == 4


def test_the_registered_score_study_command_parses(capsys):
    """experiments/diffusability_score/PROTOCOL.md's command, --score_study --base_model PATH (no --finetune: the
    family starts from that AE), is accepted; --finetune with --score_study and --base_model alone are not."""
    module = load_bench()
    args = module.parse_args(["--score_study", "--base_model", "runs/vanilla", "--output_dir", "runs/score-study"])
    assert args.score_study and args.base_model == "runs/vanilla" and not args.finetune
    for argv, message in [
        (["--score_study", "--base_model", "v", "--finetune"], "--score_study runs on the default data"),
        (["--base_model", "v"], "--finetune and --base_model go together"),
    ]:
        with pytest.raises(SystemExit):
            module.parse_args(argv)
        assert message in capsys.readouterr().err


def test_ae_seed_and_fd_curve_from_reach_the_scripts_and_leave_the_default_settings_alone():
    """--ae_seed is every trained AE's --seed; --fd_curve_from starts the FD curve later, with a snapshot at every
    remaining point. Without them the settings (which a continued run compares) are the ones before these flags."""
    from types import SimpleNamespace

    from diffusability_hf.bench.bench import Bench
    from diffusability_hf.bench.settings import settings_for

    parse_args = load_bench().parse_args
    default = settings_for(parse_args([]))
    assert "ae_seed" not in default and "fd_curve_from" not in default
    cfg = settings_for(parse_args(["--ae_seed", "1", "--fd_curve_from", "800"]))
    assert (cfg["ae_seed"], cfg["fd_curve_from"]) == (1, 800)

    calls = []
    fake = SimpleNamespace(
        out="out", info={"a": {"resolution": 128}}, models={"a": "ae"}, calls=calls,
        stages=SimpleNamespace(script=lambda name, marker, script, *args, threads: calls.append((script, args))),
        data=lambda res: {"train": ["--train_data_dir", "t"], "reference": ["--data_dir", "r"]},
        feature_spaces=lambda res: ({"domain": "d.pt", "random": "r.pt"}, None), add=lambda *a, **k: None,
        dit_tag=lambda *a: "tag", recipe=lambda r: (False, None, 1.0), dit_config=lambda *a: "config",
    )  # fmt: skip
    fake.curve_steps = lambda steps: Bench.curve_steps(fake, steps)

    def flag(args, name):
        args = [str(a) for a in args]
        return args[args.index(name) + 1]

    for given, seed in [(default, "0"), (cfg, "1")]:
        calls.clear()
        fake.cfg = given
        Bench.train_ae(fake, "a", ["--pretrained_model_name_or_path", "v"], 0.25, 3, 1e-4, 128, "finetune", threads=1)
        assert calls[0][0] == "train_ae_se.py" and flag(calls[0][1], "--seed") == seed
    for given, curve in [(default, [400, 800, 1200]), (cfg, [800, 1200])]:
        calls.clear()
        fake.cfg = given
        assert Bench.curve_steps(fake, 1200) == curve
        Bench.generate(fake, "a", 40, threads=1)
        assert flag(calls[0][1], "--pipeline_snapshot_steps") == str(curve[0])
        evaluated = [os.path.basename(flag(args, "--pipeline")) for script, args in calls[1:]]
        assert evaluated == [f"step-{s}" for s in curve[:-1]] + ["tag"]
    fake.cfg = {**default, "fd_curve_from": 600}  # 600 and 1000: snapshots every 200 steps cover both
    assert Bench.curve_steps(fake, 1200) == [600, 1000, 1200]
    calls.clear()
    Bench.generate(fake, "a", 40, threads=1)
    assert flag(calls[0][1], "--pipeline_snapshot_steps") == "200"


def test_the_dct_cut_ratios_are_fig_8s_by_default_and_three_in_the_smoke():
    """The default run cuts at Fig. 8's ten ratios and keeps them out of its settings (so a default run started
    before --smoke had its own ratios continues); --smoke cuts at 0, 50% and 90% (0 first: every cut is measured
    against the uncut reconstruction; 0.5 is the ablation's column)."""
    from diffusability_hf.bench.settings import cut_ratios, settings_for

    parse_args = load_bench().parse_args
    default = settings_for(parse_args([]))
    assert "cut_ratios" not in default
    assert cut_ratios(default) == [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    for argv in (["--smoke"], ["--smoke", "--ablation"], ["--smoke", "--score_study"]):
        assert cut_ratios(settings_for(parse_args(argv))) == [0, 0.5, 0.9], argv


@pytest.mark.minutes
def test_score_study_smoke_scores_a_family_and_correlates_each_proxy_with_the_generators(tmp_path):
    """--score_study --smoke: the family trained as registered (SE weights, KL), the proxies and the generators of
    every member, and correlations that scipy recomputes from the report's own numbers."""
    from scipy import stats

    from diffusability_hf.metrics.diffusability import PROXIES

    out, report = tmp_path / "study", tmp_path / "published"
    proc = bench_in_process(["--score_study", "--smoke", "--output_dir", out, "--results_dir", report])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "report.json").read_text())
    labels = ["+FT", "+FT-SE 0.25", "+FT-KL 1e-2", "scratch"]
    assert list(result["models"]) == labels and result["seeds"] == [0, 1]
    flags = {}
    for label in labels:
        log = (out / "logs" / f"train_{label.replace('+', 'plus-').replace(' ', '_')}.log").read_text()
        flags[label] = re.search(r"alpha=([0-9.]+), scales=\[2, 4\], KL=([0-9.e-]+)", log).groups()
    assert flags == {"+FT": ("0.0", "0.0"), "+FT-SE 0.25": ("0.25", "0.0"), "+FT-KL 1e-2": ("0.0", "0.01"),
                     "scratch": ("0.0", "0.0")}  # fmt: skip
    assert str(out / "ae" / "vanilla") in (out / "logs" / "train_plus-FT.log").read_text().splitlines()[0]
    scores = json.loads((out / "score" / "scores.json").read_text())["models"]
    for p in PROXIES:
        x = [scores[label][p] for label in labels]
        fd = [np.mean(list(result["generation_fd"]["domain"][label].values())) for label in labels]
        expected = -PROXIES[p][1] * stats.spearmanr(x, fd).statistic
        got = result["study"]["all"]["domain"][p]["spearman"]
        assert (got is None and math.isnan(expected)) or got == pytest.approx(expected), p
    usable = [label for label in labels if result["instrument"][label]["flags"]["usable"]]
    assert result["usable"] == usable
    assert result["verdict"].startswith("no verdict") == (len(usable) < 3)
    assert result["recommended"] is None or result["recommended"] in result["verdict"]
    text = (report / "report.md").read_text()
    assert "## Rank correlation with FD" in text and (report / "study.png").is_file()
