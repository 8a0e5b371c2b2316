"""The bench's experiments besides the default run: ``--select_recipe``, ``--ablation`` and ``--score_study``, each
with its report."""

import math
import os
import time
from functools import partial

import numpy as np

from .. import autoencoders as ae
from ..files import atomic_write_json, atomic_write_text
from ..hub import markdown_table
from ..metrics.bench import (
    paired_comparison,
)
from ..models.dit import RECIPES
from .report import score_lines, score_values
from .rules import PROXY_COST, generation_verdict, proxy_study, select_recipe, study_verdict, unusable
from .settings import (
    ABLATION_REPORT_FILES,
    FEATURES,
    SELECTION_REPORT_FILES,
    STUDY_REPORT_FILES,
    ae_args,
    portable,
    publish,
)


def run_selection(bench):
    """``--select_recipe``: the vanilla AE (as the default run makes it), its latents, then every recipe of
    ``selection_recipes`` for every ``selection_seeds`` seed on them; the report applies :func:`select_recipe`."""
    cfg, res = bench.cfg, bench.cfg["resolution"]
    bench.train_ae("vanilla", ["--pretrained_model_name_or_path", ae.EMBEDDED_AE], 0.0, cfg["vanilla_steps"],
                   cfg["ae_lr"], res, "finetune", threads=bench.cores)  # fmt: skip
    bench.feature_spaces(res)
    bench.parallel([partial(bench.extract, "vanilla", which) for which in ("train", "reference")])
    recipes, seeds = cfg["selection_recipes"], cfg["selection_seeds"]
    for recipe in recipes:
        bench.dit_config("vanilla", recipe)
    bench.parallel([partial(bench.generate, "vanilla", seed, recipe=recipe, steps=cfg["dit_steps"])
                    for seed in seeds for recipe in recipes])  # fmt: skip
    write_selection_report(bench, recipes, seeds)
    if bench.args.results_dir:
        publish(bench.out, bench.args.results_dir, SELECTION_REPORT_FILES)


def write_selection_report(bench, recipes, seeds):
    """report.json and report.md of ``--select_recipe``: every candidate's FDs, curve and instrument diagnostics,
    and the recipe the rule picks."""
    out, cfg = bench.out, bench.cfg
    rows, result = [], {}
    for recipe in recipes:
        fd, curve, _ = bench.results("vanilla", seeds, recipe, cfg["dit_steps"])
        diag = bench.diagnose("vanilla", seeds, recipe, cfg["dit_steps"])
        dom = np.array([fd["domain"][s] for s in seeds])
        result[recipe] = {**RECIPES[recipe], "fd": fd, "fd_curve": {sp: {str(k): v for k, v in c.items()}
                          for sp, c in curve.items()}, "fd_mean": float(dom.mean()), "fd_std": float(dom.std(ddof=1)),
                          "well_above": diag["class_accuracy"]["well_above"], "diagnostics": diag}  # fmt: skip
        ca = diag["class_accuracy"]
        steps = sorted(curve["domain"])
        rows.append([
            recipe, f"{dom.mean():.4g} ± {dom.std(ddof=1):.2g}", " / ".join(f"{fd['domain'][s]:.4g}" for s in seeds),
            " → ".join(f"{np.mean(list(curve['domain'][k].values())):.4g}" for k in steps),
            f"{np.mean([fd['random'][s] for s in seeds]):.4g}", f"{diag['fd_thumbnail']:.4g}",
            f"{ca['accuracy']:.3f} (p = {ca['p_value']:.1e})", f"{diag['class_gain']:+.4f}",
            f"{diag['layout_correlation']:.2f} / {diag['layout_ceiling']:.2f}",
            ", ".join(k.replace("_", "-") for k, v in diag["flags"].items() if v and k != "usable") or "none",
        ])  # fmt: skip
    keys = ("well_above", "fd_mean", "fd_std")
    summary = {r: {**{k: result[r][k] for k in keys}, "layout_blind": result[r]["diagnostics"]["flags"]["layout_blind"]}
               for r in recipes}  # fmt: skip
    chosen, reason = select_recipe(summary)
    registered, registered_reason = select_recipe(summary, require_layout=False)
    times = {"total": bench.stages.total(), **bench.stages.times["steps"]}
    report = {"smoke": cfg["smoke"], "settings": cfg, "seeds": seeds, "candidates": result, "chosen": chosen,
              "reason": reason, "chosen_by_the_registered_rule": registered, "registered_reason": registered_reason,
              "seconds": times}  # fmt: skip
    atomic_write_json(os.path.join(out, "report.json"), portable(report, out))
    chance = 1 / bench.instrument("vanilla").num_classes
    lines = [
        "# Choosing the bench's DiT recipe" + (" (smoke run: the numbers are meaningless)" if cfg["smoke"] else ""),
        "",
        "The rule of [PROTOCOL.md](PROTOCOL.md), fixed before this run, on the vanilla AE's latents only: the lowest "
        "mean `domain` FD at the last step among the recipes whose samples are well above chance (class accuracy at "
        "least twice chance and a one-sided binomial p < 0.001, pooled over seeds).",
        "",
        f"App. B's DiT at width {cfg['dit_width']}, depth {cfg['dit_depth']}, patch {cfg['dit_patch']}, "
        f"{cfg['dit_steps']} steps at batch {cfg['dit_batch']}, seeds {seeds}; {cfg['fd_samples']} samples per FD "
        f"({cfg['sampling_steps']} Euler steps, no guidance, classes balanced: chance {chance:.3f}). "
        f"{time.strftime('%H:%M:%S', time.gmtime(times['total']))} in total.",
        "",
        "    python train_scripts/diffusability_bench.py --select_recipe" + (" --smoke" if cfg["smoke"] else ""),
        "",
        markdown_table(
            rows,
            [
                "recipe",
                "FD domain (mean ± std)",
                "per seed",
                "FD domain at steps " + "/".join(map(str, steps)),
                "FD random",
                "FD 8x8 thumbnails",
                "class accuracy (pooled)",
                "class gain of the loss",
                "layout corr. / data's",
                "flags",
            ],
        ),  # fmt: skip
        "",
        f"**Chosen: `{chosen}`** ({reason}).",
        "",
        f"The rule as registered before the run (class accuracy only; layout reported but not used) chooses "
        f"`{registered}` ({registered_reason})"
        + (
            "."
            if registered == chosen
            else ": the bench's instrument check flags it layout-blind, so a bench "
            "built on it could give no verdict at all. The amended rule (AMENDMENT.md) also requires the layout "
            "check; it looks at the vanilla AE only, like the rule it amends."
        ),
        "",
        "Class gain: held-out flow-matching loss with the null class minus with the true class, mean over "
        f"{cfg['loss_noise_levels']} noise levels (about 0 for a class-blind model). Layout: mean over classes of the correlation of the samples' "
        "per-class, per-position means (8x8, colour removed) with the reference crops'; the data's own value "
        "(as many training crops against the reference crops) is its ceiling. Flags: class-blind (not well above "
        "chance), layout-blind (layout below half the data's), still-improving (domain FD fell over the last "
        "interval by more than its seed std).",
        "",
        "Every number above comes from `report.json`.",
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(os.path.join(out, "report.md"), text)
    print(text)
    return report


def ablation_design(cfg):
    """The ablation's autoencoders (label -> resolution, SE weight, extra train_ae_se flags) and cells (factor,
    level, the no-SE and SE autoencoders compared, DiT recipe, DiT steps): each factor that separates a small CPU run
    from the paper's regime is varied alone, the rest held at the default run's values."""
    big, small = cfg["resolution"], cfg["resolution"] // 2
    side = {r: f"{r // 8}x{r // 8}" for r in (big, small)}  # the embedded AE compresses 8x
    aes = {
        f"+FT {side[small]}": (small, 0.0, ()),
        f"+FT-SE {side[small]}": (small, 0.25, ()),
        f"+FT {side[big]}": (big, 0.0, ()),
        f"+FT-SE {side[big]}": (big, 0.25, ()),
        f"+FT-SE {{2}} {side[big]}": (big, 0.25, ("--se_scale_factors", 2)),
    }
    steps, long = cfg["dit_steps"], cfg["dit_steps"] * cfg["ablation_long_factor"]
    ft, se = f"+FT {side[big]}", f"+FT-SE {side[big]}"
    app_b = f"App. B DiT ({cfg['dit_recipe']}: RoPE{' + sin-cos' if 'sincos' in cfg['dit_recipe'] else ''}, "
    app_b += "self-conditioning)"
    cells = [
        ("latent size", f"{side[small]} latents ({small} px)", f"+FT {side[small]}", f"+FT-SE {side[small]}", None,
         steps),
        ("latent size", f"{side[big]} latents ({big} px)", ft, se, None, steps),
        ("DiT training length", f"{steps} steps", ft, se, None, steps),
        ("DiT training length", f"{long} steps", ft, se, None, long),
        ("DiT recipe", app_b, ft, se, None, steps),
        ("DiT recipe", "stock DiT (sin-cos positions, no self-conditioning, the same init)", ft, se, "stock", steps),
        ("SE scales", "{2, 4} (the paper's)", ft, se, None, steps),
        ("SE scales", "{2}", ft, f"+FT-SE {{2}} {side[big]}", None, steps),
    ]  # fmt: skip
    return aes, cells


def run_ablation(bench):
    """``--ablation``: +FT and +FT-SE from the embedded AE (``--ablation_ae_steps`` each, the default run's AE
    sizing) at two latent sizes and with SE scales {2}, then paired DiT runs per cell (see :func:`ablation_design`)."""
    cfg = bench.cfg
    aes, cells = ablation_design(cfg)
    embedded = ["--pretrained_model_name_or_path", ae.EMBEDDED_AE]
    bench.parallel([
        partial(bench.train_ae, label, embedded, se, cfg["ablation_ae_steps"], cfg["ae_lr"], res, "ablation",
                extra=list(extra))
        for label, (res, se, extra) in aes.items()
    ])  # fmt: skip
    for label in aes:
        bench.info[label] = bench.info.pop(label)
        bench.models[label] = bench.models.pop(label)
    by_res = {}
    for label, (res, _, _) in aes.items():
        by_res.setdefault(res, []).append(label)
    evals = {}
    for group in by_res.values():
        for name, result in bench.evaluate(group).items():
            evals.setdefault(name, {"models": {}, "dct_cut": {"curves": {}}})
            evals[name]["models"].update(result["models"])
            if "dct_cut" in result:
                evals[name]["dct_cut"]["curves"].update(result["dct_cut"]["curves"])
    bench.parallel([partial(bench.extract, label, which) for label in aes for which in ("train", "reference")])
    seeds = cfg["ablation_seeds"]
    runs = list(dict.fromkeys((label, recipe, steps) for _, _, a, b, recipe, steps in cells for label in (a, b)))
    for label, recipe, _ in runs:
        bench.dit_config(label, recipe)
    runs.sort(key=lambda r: -r[2])  # the longest first, so that the last ones to start are short
    # FD curves along every run: a generator still improving gives no verdict
    bench.parallel([partial(bench.generate, label, seed, recipe=recipe, steps=steps)
                    for label, recipe, steps in runs for seed in seeds])  # fmt: skip
    write_ablation_report(bench, list(aes), cells, evals, seeds)
    if bench.args.results_dir:
        publish(bench.out, bench.args.results_dir, ABLATION_REPORT_FILES)


def write_ablation_report(bench, labels, cells, evals, seeds):
    out, cfg = bench.out, bench.cfg
    rows, result_cells = [], []
    for factor, level, base, se, recipe, steps in cells:
        fd_base, curve_base, _ = bench.results(base, seeds, recipe, steps)
        fd_se, curve_se, _ = bench.results(se, seeds, recipe, steps)
        comparisons = {space: paired_comparison({base: fd_base[space], se: fd_se[space]}, base)
                       for space in FEATURES}  # fmt: skip
        diagnostics = {label: bench.diagnose(label, seeds, recipe, steps) for label in (base, se)}
        verdict = generation_verdict({space: c[se] for space, c in comparisons.items()}, se, base,
                                     {label: unusable(d) for label, d in diagnostics.items()})  # fmt: skip
        result_cells.append({"factor": factor, "level": level, "no_se": base, "se": se,
                             "recipe": recipe or cfg["dit_recipe"], "dit_steps": steps, "comparisons": comparisons,
                             **verdict, "fd_curve": {base: curve_base, se: curve_se},
                             "instrument": diagnostics})  # fmt: skip
        cells_md = [factor, level, f"{se} vs {base}"]
        for space in FEATURES:
            c = comparisons[space]
            cells_md += [f"{c[base]['mean']:.4g} / {c[se]['mean']:.4g}",
                         f"{c[se]['diff']:+.4g} [{c[se]['diff_ci95'][0]:+.4g}, {c[se]['diff_ci95'][1]:+.4g}]"
                         + (" *" if c[se]["ci95_excludes_zero"] else "")]  # fmt: skip
        cells_md.append(" / ".join(f"{diagnostics[n]['class_accuracy']['accuracy']:.2f}" for n in (base, se)))
        cells_md.append(" / ".join(", ".join(unusable(diagnostics[n])) or "usable" for n in (base, se)))
        cells_md.append(verdict["verdict"].split(":")[0])
        rows.append(cells_md)
    rec, spec = evals["eval_ae"], evals["spectrum"]
    scores = score_values(evals, labels)
    ae_rows = [[label, f"{rec['models'][label]['psnr']['mean']:.2f}", f"{rec['models'][label]['ssim']['mean']:.4f}",
                f"{spec['models'][label]['hf_share']:.3f}",
                f"{rec['dct_cut']['curves'][label]['0.5']['psnr']['mean']:.2f}"] for label in labels]  # fmt: skip
    times = {"total": bench.stages.total(), "invocations": list(bench.stages.times["invocations"]),
             **bench.stages.times["steps"]}  # fmt: skip
    result = {
        "smoke": cfg["smoke"], "ablation": True, "settings": cfg,
        "data": {res: {"description": src["note"], **src["photos"]} for res, src in bench.sources.items()},
        "models": {label: {"path": bench.models[label], **bench.info[label],
                           "weights_fingerprint": rec["models"][label].get("weights_fingerprint")}
                   for label in labels},
        "reconstruction": {label: rec["models"][label] for label in labels},
        "dct_cut_psnr": {label: {r: v["psnr"]["mean"] for r, v in rec["dct_cut"]["curves"][label].items()}
                         for label in labels},
        "spectrum_normalised_samples": {label: spec["models"][label] for label in labels},
        "diffusability_score": scores, "cells": result_cells, "seconds": times,
    }  # fmt: skip
    atomic_write_json(os.path.join(out, "report.json"), portable(result, out))
    fmt_time = time.strftime("%H:%M:%S", time.gmtime(times["total"]))
    header = ["factor", "level", "compared"] + [h for space in FEATURES for h in (
        f"FD ({space}) no SE / SE", f"SE - no SE ({space}, 95% CI)")] + [
        "class accuracy no SE / SE", "instrument no SE / SE", "generation"]  # fmt: skip
    lines = [
        "# Diffusability bench: ablation" + (" (smoke run: the numbers are meaningless)" if cfg["smoke"] else ""),
        "",
        "Each factor that separates a small CPU run from the paper's regime, varied alone around the default run's "
        "settings: "
        f"+FT and +FT-SE from the embedded AE ({cfg['ablation_ae_steps']} steps each, batch {cfg['ae_batch']}), "
        f"the paper's DiT (width {cfg['dit_width']}, depth {cfg['dit_depth']}, patch {cfg['dit_patch']}) for "
        f"{cfg['dit_steps']} steps unless the cell says otherwise, seeds {seeds}, {cfg['fd_samples']} samples per "
        f"FD. {fmt_time} in total.",
        "",
        "    python train_scripts/diffusability_bench.py --ablation" + (" --smoke" if cfg["smoke"] else ""),
        "",
        "## Generation: +FT-SE against +FT per cell (mean FD over seeds; paired difference, * = 95% CI excludes 0)",
        "",
        markdown_table(rows, header),
        "",
        "## The autoencoders (held-out crops at their resolution)",
        "",
        markdown_table(ae_rows, ["AE", "PSNR (dB)", "SSIM", "HF share, normalised samples", "PSNR, 50% DCT cut"]),
        "",
        *score_lines(scores),
        "## Where SE helps the generator",
        "",
    ]
    for cell in result_cells:
        lines.append(f"- {cell['factor']}, {cell['level']}: {cell['verdict']} ({cell['detail']}).")
    lines += ["", "Every number above comes from `report.json`, which also keeps each stage's seconds.", ""]
    text = "\n".join(lines)
    atomic_write_text(os.path.join(out, "report.md"), text)
    print(text)


# ----------------------------------------------------------------------------------------------------------------
# --score_study: do the cheap proxies rank autoencoders as the generators do?


def run_score_study(bench):
    """``--score_study``: the family of :data:`SCORE_STUDY` from the vanilla AE (or ``--base_model``), the bench's
    evaluation of each (with the cheap proxies, diffusability_score.py), then a DiT per AE and seed; the report
    correlates every proxy with the generators' FD (experiments/diffusability_score/PROTOCOL.md)."""
    cfg, res = bench.cfg, bench.cfg["resolution"]
    if bench.args.base_model:
        base = ae_args(bench.args.base_model)
    else:
        bench.train_ae("vanilla", ["--pretrained_model_name_or_path", ae.EMBEDDED_AE], 0.0, cfg["vanilla_steps"],
                       cfg["ae_lr"], res, "finetune", threads=bench.cores)  # fmt: skip
        base = ["--pretrained_model_name_or_path", bench.models["vanilla"]]
    config = ["--model_config_name_or_path", os.path.join(ae.EMBEDDED_AE, "config.json")]
    tasks = []
    for label, (start, se, extra) in cfg["study_family"].items():
        if start == "base":
            tasks.append(partial(bench.train_ae, label, base, se, cfg["ft_steps"], cfg["ae_lr"], res, "finetune",
                                 extra=list(extra)))  # fmt: skip
        else:
            tasks.append(partial(bench.train_ae, label, config, se, cfg["scratch_steps"], cfg["scratch_lr"], res,
                                 "scratch", extra=list(extra)))  # fmt: skip
    bench.parallel(tasks)
    labels = list(cfg["study_family"])
    evals = bench.evaluate(labels)
    bench.parallel([partial(bench.extract, label, which) for label in labels for which in ("train", "reference")])
    for label in labels:
        bench.dit_config(label)
    seeds = cfg["study_seeds"]
    bench.parallel([partial(bench.generate, label, seed) for seed in seeds for label in labels])
    write_study_report(bench, labels, evals, seeds)
    if bench.args.results_dir:
        publish(bench.out, bench.args.results_dir, STUDY_REPORT_FILES)


def write_study_report(bench, labels, evals, seeds):
    from diffusability_hf.metrics.diffusability import PROXIES

    out, cfg = bench.out, bench.cfg
    scores = evals["score"]["models"]
    fd, diagnostics = {space: {} for space in FEATURES}, {}
    for label in labels:
        final, _, _ = bench.results(label, seeds)
        for space in FEATURES:
            fd[space][label] = final[space]
        diagnostics[label] = bench.diagnose(label, seeds)
    usable = [label for label in labels if diagnostics[label]["flags"]["usable"]]
    study = {
        group: {space: proxy_study(scores, fd[space], members, seeds, cfg["study_min_aes"]) for space in FEATURES}
        for group, members in (("usable", usable), ("all", labels))
    }
    encode = float(np.mean([scores[label]["seconds"]["encode"] for label in labels]))
    cost = {p: encode + float(np.mean([scores[label]["seconds"][PROXY_COST[p]] for label in labels]))
            for p in PROXIES if all(PROXY_COST[p] in scores[label]["seconds"] for label in labels)}  # fmt: skip
    verdict, recommended = study_verdict(study["usable"]["domain"], cost, usable, labels, cfg["study_min_aes"])
    times = {"total": bench.stages.total(), "invocations": list(bench.stages.times["invocations"]),
             **bench.stages.times["steps"]}  # fmt: skip
    result = {
        "smoke": cfg["smoke"], "score_study": True, "settings": cfg, "seeds": seeds,
        "models": {label: {"path": bench.models[label], **bench.info[label],
                           "weights_fingerprint": scores[label]["weights_fingerprint"]} for label in labels},
        "proxies": {label: {p: scores[label][p] for p in PROXIES if p in scores[label]} for label in labels},
        "proxy_seconds": cost, "generation_fd": fd, "instrument": diagnostics, "usable": usable, "study": study,
        "verdict": verdict, "recommended": recommended, "seconds": times,
    }  # fmt: skip
    atomic_write_json(os.path.join(out, "report.json"), portable(result, out))
    plot_study(out, labels, result)
    fmt_time = time.strftime("%H:%M:%S", time.gmtime(times["total"]))
    fd_rows = [[label, *[f"{np.mean(list(fd[space][label].values())):.4g} ± "
                         f"{np.std(list(fd[space][label].values()), ddof=1) if len(seeds) > 1 else 0:.2g}"
                         for space in FEATURES],
                f"{diagnostics[label]['class_accuracy']['accuracy']:.2f}", ", ".join(unusable(diagnostics[label]))
                or "usable"] for label in labels]  # fmt: skip
    proxy_rows = [[label] + [f"{scores[label][p]:.4g}" for p in PROXIES if p in cost] for label in labels]
    lines = [
        "# Diffusability score: do the cheap proxies rank autoencoders as the generators do?"
        + (" (smoke run: the numbers are meaningless)" if cfg["smoke"] else ""),
        "",
        f"Family: {', '.join(labels)} (Stage I as the bench's default run: fine-tunes {cfg['ft_steps']} steps from "
        f"the vanilla AE, scratch {cfg['scratch_steps']} steps; batch {cfg['ae_batch']}, {cfg['resolution']} px). "
        f"Ground truth: the bench's generator ({cfg['dit_recipe']}, {cfg['dit_steps']} steps at batch "
        f"{cfg['dit_batch']}), seeds {seeds}, {cfg['fd_samples']} samples per FD. Proxies: diffusability_score.py "
        f"(flow probe {cfg['score_probe_steps']} steps). {fmt_time} in total.",
        "",
        "    python train_scripts/diffusability_bench.py --score_study" + (" --smoke" if cfg["smoke"] else ""),
        "",
        f"**Verdict** (usable generators, `domain` FD, Spearman in the predicted direction): {verdict}.",
        "",
        "## Ground truth: the generators' FD (mean ± std over seeds) and their instrument checks",
        "",
        markdown_table(fd_rows, ["AE"] + [f"FD {space}" for space in FEATURES] + ["class accuracy", "instrument"]),
        "",
        "## The proxies",
        "",
        markdown_table(proxy_rows, ["AE"] + [f"{p} {'↑' if PROXIES[p][1] > 0 else '↓'}" for p in cost]),
        "",
        "## Rank correlation with FD (+1: the proxy orders the family exactly as the generators do)",
        "",
    ]
    for group in ("usable", "all"):
        members = usable if group == "usable" else labels
        rows = []
        for p in cost:
            cells = [p]
            for space in FEATURES:
                r = study[group][space][p]
                cells += [f"{r['spearman']:+.2f} [{r['interval'][0]:+.2f}, {r['interval'][1]:+.2f}]",
                          f"{r['kendall']:+.2f}", f"{r['pairs']['agree']}/{r['pairs']['separated']}"]  # fmt: skip
            cells.append(f"{cost[p]:.0f}")
            rows.append(cells)
        header = ["proxy"] + [h for space in FEATURES for h in (
            f"Spearman ({space}, 95% bootstrap)", f"Kendall ({space})", f"pairs agreeing ({space})")] + ["seconds"]  # fmt: skip
        lines += [f"### {'Usable generators' if group == 'usable' else 'All generators'} ({len(members)} AEs)", "",
                  markdown_table(rows, header), ""]  # fmt: skip
    lines += [
        "Spearman and Kendall are signed so that +1 means the proxy's predicted direction (lower HF share, higher "
        "noise PSNR, ...) orders the autoencoders as their generators' FD does; the interval resamples autoencoders "
        "and seeds. A pair counts when its FD gap exceeds twice its standard error over seeds. Seconds: encoding the "
        "crops plus the proxy, per autoencoder, on this machine.",
        "",
        "![proxies against FD](study.png)",
        "",
        "Every number above comes from `report.json`, which also keeps each stage's seconds.",
        "",
    ]
    text = "\n".join(lines)
    atomic_write_text(os.path.join(out, "report.md"), text)
    print(text)


def plot_study(out, labels, result):
    """study.png: every proxy against the generators' mean domain FD, one point per autoencoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusability_hf.figures import save_png

    proxies = list(result["proxy_seconds"])
    fd = {label: np.mean(list(result["generation_fd"]["domain"][label].values())) for label in labels}
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(proxies) / cols), cols, figsize=(4 * cols, 3.2 * math.ceil(len(proxies) / cols)),
                             squeeze=False)  # fmt: skip
    for ax, p in zip(axes.flat, proxies):
        for label in labels:
            ax.scatter(result["proxies"][label][p], fd[label])
            ax.annotate(label, (result["proxies"][label][p], fd[label]), fontsize=6)
        rho = result["study"]["all"]["domain"][p]["spearman"]
        ax.set(xlabel=p, ylabel="FD (domain)", title=f"{p}: signed Spearman {rho:+.2f}")
    for ax in list(axes.flat)[len(proxies) :]:
        ax.axis("off")
    fig.tight_layout()
    save_png(fig, os.path.join(out, "study.png"))
