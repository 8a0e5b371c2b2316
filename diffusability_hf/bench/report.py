"""The bench's report: ``report.md``, ``report.json`` and their plots."""

import os
import time

import numpy as np

from ..files import atomic_write_json, atomic_write_text
from ..hub import markdown_table
from ..metrics.bench import (
    paired_comparison,
)
from .rules import generation_verdict, last_interval, unusable
from .settings import FEATURES, cut_ratios, fd_values, portable, slug

# ----------------------------------------------------------------------------------------------------------------
# The report


def score_values(evals, labels):
    """``{label: {proxy: value}}`` of the cheap proxies (diffusability_score.py); empty when the run had no image
    folders to score on."""
    if "score" not in evals:
        return {}
    from diffusability_hf.metrics.diffusability import PROXIES

    models = evals["score"]["models"]
    proxies = [p for p in PROXIES if all(p in models[label] for label in labels)]
    return {label: {p: models[label][p] for p in proxies} for label in labels}


def score_lines(values):
    """The report's section of :func:`score_values`."""
    if not values:
        return []
    from diffusability_hf.metrics.diffusability import PROXIES

    proxies = list(next(iter(values.values())))
    arrows = {p: "↑" if PROXIES[p][1] > 0 else "↓" for p in proxies}
    rows = [[label] + [f"{v[p]:.4g}" for p in proxies] for label, v in values.items()]
    return [
        "## Diffusability score: cheap proxies (`diffusability_score.py`)",
        "",
        markdown_table(rows, ["AE"] + [f"{p} {arrows[p]}" for p in proxies]),
        "",
        "Each autoencoder in minutes, without a generator (arrows: the direction the paper's account predicts to be "
        "better). Which proxy tracks the generators' FD is measured in `experiments/diffusability_score`; here they "
        "describe the latents and give no verdict. `score/scores.md` says what each one is.",
        "",
    ]


def write_report(bench, labels, evals):
    """report.json, report.md and the plots of the default run (or of the user's autoencoders)."""
    out, cfg = bench.out, bench.cfg
    rec, rfd, spec, spec_means = (evals[n] for n in ("eval_ae", "eval_ae_fd", "spectrum", "spectrum_means"))
    seeds, curve_steps = cfg["seeds"], bench.curve_steps(cfg["dit_steps"])
    final = curve_steps[-1]
    fd = {space: {} for space in FEATURES}
    curve = {space: {} for space in FEATURES}
    loss = {}
    for label in labels:
        final_fd, label_curve, loss[label] = bench.results(label, seeds)
        for space in FEATURES:
            fd[space][label], curve[space][label] = final_fd[space], label_curve[space]
    groups = {}
    for label in labels:
        groups.setdefault(bench.info[label]["protocol"], []).append(label)
    models, made = bench.models, [label for label in labels if bench.info[label]["made_by_the_bench"]]
    accuracy = bench.feature_spaces(cfg["resolution"])[1]
    src = bench.data(cfg["resolution"])
    photos, data_note = src["photos"], src["note"]
    times = {"total": bench.stages.total(), "invocations": list(bench.stages.times["invocations"]),
             **bench.stages.times["steps"]}  # fmt: skip
    generation = {}
    for protocol, members in groups.items():
        if len(members) < 2 and protocol != "given":
            continue
        generation[protocol] = {
            space: paired_comparison({m: fd[space][m] for m in members}, members[0]) for space in FEATURES
        }
    all_comparison = {space: paired_comparison({m: fd[space][m] for m in labels}, labels[0]) for space in FEATURES}

    # Verdicts: SE versus its counterpart trained identically without it
    pairs = [(b, a) for a, b in (("+FT", "+FT-SE"), ("scratch", "scratch+SE")) if a in labels and b in labels]
    if not pairs and len(labels) >= 2:
        pairs = [(m, labels[0]) for m in labels[1:]]
    instrument = {label: bench.diagnose(label, seeds) for label in labels}
    flags = {label: unusable(d) for label, d in instrument.items()}
    verdicts = {"spectrum": [], "dct_cut": [], "generation": []}
    for se, base in pairs:
        hs, hb = spec["models"][se]["hf_share"], spec["models"][base]["hf_share"]
        verdicts["spectrum"].append({
            "pair": [se, base], "hf_share": [hs, hb],
            "verdict": (f"supported: {se}'s normalised latents have less high-frequency energy than {base}'s "
                        f"({hs:.3f} vs {hb:.3f}, {100 * (hs - hb) / hb:+.0f}%)") if hs < hb else
                       (f"not supported: {se}'s normalised latents have no less high-frequency energy than {base}'s "
                        f"({hs:.3f} vs {hb:.3f})"),
        })  # fmt: skip
        curves = rec["dct_cut"]["curves"]
        diffs = {r: curves[se][str(float(r))]["psnr"]["mean"] - curves[base][str(float(r))]["psnr"]["mean"]
                 for r in cut_ratios(cfg)[1:]}  # fmt: skip
        gap0 = curves[se]["0.0"]["psnr"]["mean"] - curves[base]["0.0"]["psnr"]["mean"]
        gains = {r: d - gap0 for r, d in diffs.items()}  # the cut's effect beyond the uncut reconstruction gap
        better = [r for r, g in gains.items() if g > 0]
        verdicts["dct_cut"].append({
            "pair": [se, base], "psnr_diff_per_ratio": diffs, "uncut_psnr_diff": gap0, "gain_beyond_uncut": gains,
            "verdict": (f"supported: cutting {se}'s latent high frequencies costs less PSNR than {base}'s at every "
                        f"ratio (beyond the uncut gap {gap0:+.2f} dB)") if len(better) == len(gains) else
                       (f"not supported: {se} loses less PSNR than {base} at {len(better)} of {len(gains)} cut "
                        f"ratios (beyond the uncut gap {gap0:+.2f} dB)"),
        })  # fmt: skip
        comparisons = {space: paired_comparison({base: fd[space][base], se: fd[space][se]}, base)[se]
                       for space in FEATURES}  # fmt: skip
        verdicts["generation"].append({"pair": [se, base], **generation_verdict(comparisons, se, base, flags)})

    # Plateau of the FD curve: the last interval's improvement against the seed noise
    plateau = {}
    for space in FEATURES:
        for label in labels:
            if len(curve_steps) < 2:
                continue
            gain, noise = last_interval(curve[space][label], seeds)
            plateau.setdefault(space, {})[label] = {
                "last_interval_gain": gain, "seed_std_final": noise, "plateaued": bool(gain <= noise),
            }  # fmt: skip

    figures = plot_report(out, labels, seeds, curve_steps, curve, loss, final)
    result = {
        "smoke": cfg["smoke"],
        "settings": cfg,
        "data": {"description": data_note, **photos},
        "models": {
            label: {
                "path": models[label],
                "protocol": [p for p, m in groups.items() if label in m][0],
                "made_by_the_bench": label in made,
                "weights_fingerprint": rec["models"][label].get("weights_fingerprint"),
            }
            for label in labels
        },  # fmt: skip
        "domain_classifier_accuracy": accuracy,
        "reconstruction": {label: rec["models"][label] for label in labels},
        "reconstruction_fd": {label: rfd["models"][label] for label in labels},
        "dct_cut_psnr": {
            label: {r: v["psnr"]["mean"] for r, v in rec["dct_cut"]["curves"][label].items()} for label in labels
        },  # fmt: skip
        "spectrum_normalised_samples": spec["models"],
        "spectrum_raw_means": spec_means["models"],
        "diffusability_score": score_values(evals, labels),
        "generation_fd": fd,
        "generation_comparisons": generation,
        "generation_all_vs_first": all_comparison,
        "fd_curve": {
            space: {label: {str(k): v for k, v in c.items()} for label, c in curve[space].items()}
            for space in FEATURES
        },  # fmt: skip
        "fd_curve_plateau": plateau,
        "instrument": instrument,
        "loss_per_noise_level": loss,
        "verdicts": verdicts,
        "seconds": times,
        "figures": figures,
    }
    atomic_write_json(os.path.join(out, "report.json"), portable(result, out))
    text = report_markdown(result, cfg, labels, curve_steps, rec, rfd, spec, spec_means)
    atomic_write_text(os.path.join(out, "report.md"), text)
    print(text)
    return result


def report_markdown(result, cfg, labels, curve_steps, rec, rfd, spec, spec_means):
    smoke, seeds = cfg["smoke"], cfg["seeds"]
    fmt_time = time.strftime("%H:%M:%S", time.gmtime(result["seconds"]["total"]))
    aes = ", ".join(f"{k} ({v['protocol']})" for k, v in result["models"].items())
    lines = [
        "# Diffusability bench" + (" (smoke run: the numbers are meaningless)" if smoke else ""),
        "",
        f"Data: {result['data']['description']}.",
        "",
        f"Autoencoders: {aes}. Stage I: "
        f"AE batch {cfg['ae_batch']}, {cfg['resolution']} px; vanilla = the embedded AE trained on for "
        f"{cfg['vanilla_steps']} steps, +FT / +FT-SE {cfg['ft_steps']} more steps from it (SE weight 0 / 0.25), "
        f"scratch / scratch+SE {cfg['scratch_steps']} steps from random init. Stage II: the paper's DiT (App. B: "
        f"RoPE, self-conditioning at 90%) at width {cfg['dit_width']}, depth {cfg['dit_depth']}, patch "
        f"{cfg['dit_patch']}, {cfg['dit_steps']} steps at batch {cfg['dit_batch']}, seeds {seeds}; "
        f"{cfg['fd_samples']} samples per FD ({cfg['sampling_steps']} Euler steps, no guidance, classes balanced) "
        f"against {cfg['reference_crops']} reference crops. {fmt_time} in total.",
        "",
        "    python train_scripts/diffusability_bench.py" + (" --smoke" if smoke else ""),
        "",
        "## Reconstruction and latent space (Table 4, Fig. 4)",
        "",
    ]
    rows = []
    for label in labels:
        r, s, sm = rec["models"][label], spec["models"][label], spec_means["models"][label]
        rows.append([
            label, f"{r['psnr']['mean']:.2f} ± {r['psnr']['ci95']:.2f}", f"{r['ssim']['mean']:.4f}",
            f"{fd_values(rfd['models'][label]).get('domain', float('nan')):.3f}", f"{fd_values(rfd['models'][label]).get('random', float('nan')):.4f}",
            f"{s['hf_share']:.3f}", f"{sm['hf_share']:.3f}", f"{s.get('posterior_variance_ratio_mean', float('nan')):.3f}",
        ])  # fmt: skip
    lines += [
        markdown_table(
            rows,
            [
                "AE",
                "PSNR (dB)",
                "SSIM",
                "rFD domain",
                "rFD random",
                "HF share, normalised samples",
                "HF share, raw means",
                "posterior variance ratio",
            ],
        ),  # fmt: skip
        "",
        "PSNR (mean ± 95% interval) and SSIM on held-out crops; rFD: Frechet distance of the reconstructions of the "
        "reference crops to the crops, in the generators' feature spaces (the decoder's floor under a generator's "
        "FD). HF share: the part of the latents' AC energy in the upper half of the zigzag order (8x8 blocks); "
        "variance ratio: the mean over channels of E[std^2] / Var(z).",
        "",
        "![spectrum](spectrum/spectrum.png)",
        "",
        *score_lines(result["diffusability_score"]),
        "## DCT cut (Fig. 8): PSNR when the top share of latent zigzag coefficients is zeroed",
        "",
    ]
    curves = rec["dct_cut"]["curves"]
    lines += [
        markdown_table(
            [
                [f"{100 * r:.0f}"] + [f"{curves[n][str(float(r))]['psnr']['mean']:.2f}" for n in labels]
                for r in cut_ratios(cfg)
            ],
            ["cut (%)"] + labels,
        ),  # fmt: skip
        "",
        "![DCT cut](eval_ae/dct_cut.png)",
        "",
        f"## Generation (Table 1: fine-tuning; Table 10: from scratch): Frechet distance of the DiT's samples after "
        f"{curve_steps[-1]} steps, lower is better",
        "",
        f"Feature spaces: `domain` (the classifier trained on the training crops; accuracy on the reference crops "
        f"{100 * result['domain_classifier_accuracy']:.1f}%) and `random` (an untrained seeded CNN).",
        "",
    ]
    for protocol, comparison in result["generation_comparisons"].items():
        rows = []
        members = list(comparison["domain"])
        for label in members:
            cells = [label]
            for space in FEATURES:
                row = comparison[space][label]
                cells.append(f"{row['mean']:.4g} ± {row['std']:.2g}")
                cells.append(" / ".join(f"{row['per_seed'][str(s)]:.4g}" for s in seeds))
                cells.append("" if "diff" not in row else f"{row['diff']:+.4g} [{row['diff_ci95'][0]:+.4g}, "
                             f"{row['diff_ci95'][1]:+.4g}]" + (" *" if row["ci95_excludes_zero"] else ""))  # fmt: skip
            rows.append(cells)
        header = ["AE"] + [
            f"{h} ({space})" for space in FEATURES for h in ("FD mean ± std", "per seed", f"vs {members[0]} (95% CI)")
        ]
        lines += [f"Protocol: {protocol}", "", markdown_table(rows, header), ""]
    lines += [
        "Differences are paired by seed (same DiT seed, data order and sampling noise); * marks a 95% Student-t "
        "interval that excludes 0. They cover the DiTs' seed-to-seed variation only: each autoencoder was trained "
        "once.",
        "",
        "## FD along DiT training (is it trained long enough?)",
        "",
    ]
    for space in FEATURES:
        rows = []
        for label in labels:
            c = result["fd_curve"][space][label]
            rows.append(
                [label]
                + [f"{np.mean(list(c[str(k)].values())):.4g}" for k in curve_steps]
                + ["yes" if result["fd_curve_plateau"].get(space, {}).get(label, {}).get("plateaued") else "no"]
            )
        lines += [
            f"`{space}` features, mean over seeds:",
            "",
            markdown_table(rows, ["AE"] + [f"step {k}" for k in curve_steps] + ["last gain <= seed std"]),
            "",
        ]
    rows = []
    for label in labels:
        d = result["instrument"][label]
        ca = d["class_accuracy"]
        rows.append([label, f"{ca['accuracy']:.3f} (p = {ca['p_value']:.1e})", f"{d['class_gain']:+.4f}",
                     f"{d['layout_correlation']:.2f} / {d['layout_ceiling']:.2f}", f"{d['fd_thumbnail']:.4g}",
                     f"{d['fd_last_interval_gain']:+.3g} / {d['fd_seed_std']:.3g}",
                     ", ".join(unusable(d)) or "usable"])  # fmt: skip
    lines += [
        "![FD curve](fd_curve.png)",
        "",
        "## Is each generator an instrument? (final DiTs, samples pooled over seeds)",
        "",
        markdown_table(
            rows,
            [
                "AE",
                f"class accuracy (chance {ca['chance']:.3f})",
                "class gain of the loss",
                "layout corr. / data's",
                "FD 8x8 thumbnails",
                "last FD gain (domain) / seed std",
                "flags",
            ],
        ),  # fmt: skip
        "",
        "A generator that ignores its class (class-blind: accuracy not at least twice chance with a one-sided "
        "binomial p < 0.001), ignores where things are (layout-blind: per-class layout correlation below half the "
        "data's own) or is still improving (its domain FD fell over the last curve interval by more than the final "
        "FD's seed std) cannot rank latent spaces: comparisons that involve it get no verdict. Class gain: held-out "
        "loss with the null class minus with the true class (about 0 when the label is ignored). The thumbnail FD "
        "is a feature space that keeps where colour is (both CNN spaces average over space).",
        "",
        "## Flow-matching loss per noise level on held-out latents (final DiTs, mean over seeds)",
        "",
    ]
    sigmas = next(iter(next(iter(result["loss_per_noise_level"].values())).values()))["sigma"]
    rows = []
    for label in labels:
        per = np.mean([result["loss_per_noise_level"][label][s]["loss"] for s in seeds], axis=0)
        rows.append([label] + [f"{v:.4f}" for v in per])
    lines += [markdown_table(rows, ["AE"] + [f"σ={s:.2f}" for s in sigmas]), "", "![loss](loss_per_noise_level.png)",
              "", "## Fig. 6: decoded x0 predictions along one denoising trajectory (seed "
              f"{seeds[0]}, sample 0, the same noise and class for every AE)", "", "![trajectories](trajectories.png)",
              "", "![samples](samples.png)", "", "## Verdicts", ""]  # fmt: skip
    for claim, title in (("spectrum", "Spectrum"), ("dct_cut", "DCT cut"), ("generation", "Generation")):
        for v in result["verdicts"][claim]:
            detail = f" ({v['detail']})" if "detail" in v else ""
            lines.append(f"- **{title}**, {v['pair'][0]} vs {v['pair'][1]}: {v['verdict']}{detail}.")
    lines += ["", "Every number above comes from `report.json`, which also keeps each stage's seconds.", ""]
    return "\n".join(lines)


def plot_report(out, labels, seeds, curve_steps, curve, loss, final):
    """fd_curve.png, loss_per_noise_level.png, trajectories.png (Fig. 6) and samples.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(FEATURES), figsize=(5 * len(FEATURES), 3.5), squeeze=False)
    for ax, space in zip(axes[0], FEATURES):
        for label in labels:
            values = np.array([[curve[space][label][k][s] for s in seeds] for k in curve_steps])
            ax.errorbar(curve_steps, values.mean(1), yerr=values.std(1, ddof=1) if len(seeds) > 1 else None,
                        label=label, marker="o", capsize=3)  # fmt: skip
        ax.set_xlabel("DiT training step")
        ax.set_ylabel(f"FD ({space} features)")
        ax.set_title(f"{space} features, mean ± std over seeds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "fd_curve.png"), dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label in labels:
        per = np.array([loss[label][s]["loss"] for s in seeds])
        ax.plot(loss[label][seeds[0]]["sigma"], per.mean(0), marker="o", label=label)
    ax.set_xlabel("noise level sigma (0 = data, 1 = noise)")
    ax.set_ylabel("flow-matching loss (held-out latents)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_per_noise_level.png"), dpi=90)
    plt.close(fig)

    def stack(name, filename):
        rows = []
        for label in labels:
            path = os.path.join(out, "eval_dit", f"{slug(label)}-seed{seeds[0]}", f"step-{final}", filename)
            rows.append((label, Image.open(path).convert("RGB")))
        width = max(im.width for _, im in rows)
        height = sum(im.height for _, im in rows)
        fig = plt.figure(figsize=(width / 80 + 1.2, height / 80 + 0.3))
        for i, (label, im) in enumerate(rows):
            ax = fig.add_subplot(len(rows), 1, i + 1)
            ax.imshow(np.asarray(im))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(label, fontsize=8)
        fig.tight_layout(pad=0.3)
        fig.savefig(os.path.join(out, name), dpi=80)
        plt.close(fig)

    stack("trajectories.png", "trajectory.png")
    samples_row(out, labels, seeds[0], final)
    return ["fd_curve.png", "loss_per_noise_level.png", "trajectories.png", "samples.png"]


def samples_row(out, labels, seed, final, columns=12):
    """``samples.png``: the first ``columns`` samples of each AE's DiT (seed ``seed``); sample ``i`` has the same
    class (balanced sampling) and starting noise in every row."""
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(len(labels), columns, figsize=(columns, len(labels) + 0.4), squeeze=False)
    for r, label in enumerate(labels):
        folder = os.path.join(out, "eval_dit", f"{slug(label)}-seed{seed}", f"step-{final}", "samples")
        files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))[:columns]
        for c in range(columns):
            ax = axes[r, c]
            if c < len(files):
                ax.imshow(np.asarray(Image.open(os.path.join(folder, files[c]))))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.tight_layout(pad=0.2)
    fig.savefig(os.path.join(out, "samples.png"), dpi=80)
    plt.close(fig)
