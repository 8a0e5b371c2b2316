#!/usr/bin/env python
"""Does an autoencoder make latents easier to diffuse? The paper's protocols for several autoencoders on the same
data, through the toolkit's own scripts, in one report (``report.md``, ``report.json`` and their plots).

    python train_scripts/diffusability_bench.py                       # the default run (time: see docs/bench.md)
    python train_scripts/diffusability_bench.py --smoke               # every stage, a handful of steps each
    python train_scripts/diffusability_bench.py --models sd=./sd-vae sd-se=./sd-vae-se \\
        --train_data_dir ./my_classes --validation_data_dir ./my_val --resolution 256

Stages (each one the toolkit script a user would run, in a fresh process, offline):

0. Data. By default every colour photograph that ships with the installed packages (scikit-image; scikit-learn's
   and matplotlib's sample images when installed), cut into random-scale crops (a region of 1 to 4 crop sides,
   resized) written as image folders: ``data/train`` (the training photographs, one class per photograph: the
   autoencoders' and the DiTs' training data), ``data/reference`` (fresh crops of the same photographs, another
   seed: the generators' reference set, the reconstructions' Frechet distance and the held-out diffusion loss) and
   ``data/heldout`` (crops of photographs that no stage trains on: reconstruction, DCT cut and spectra). With
   ``--train_data_dir`` (subfolders = classes) or ``--dataset_name`` the user's data take their place.
1. Stage I (``train_ae_se.py``). The default run makes both of the paper's protocols from the toolkit's embedded
   AutoencoderKL: fine-tuning (Table 1: "vanilla" = the embedded AE trained on to a fair baseline at this
   resolution, then "+FT" and "+FT-SE" from it, the same steps, seed and data but for the SE weight) and training
   from scratch (App. C.5, Table 10: the same architecture from random init with and without SE). ``--models``
   takes existing AEs; ``--base_model PATH --finetune`` makes +FT and +FT-SE from one.
2. Reconstruction (``eval_ae.py``): PSNR, SSIM and the DCT cut (Fig. 8) on held-out crops; the Frechet distance of
   reconstructions of the reference crops to the crops themselves, in the generators' feature spaces (the decoder's
   share of a generator's distance).
3. Latent space (``analyze_spectrum.py``): the spectrum and high-frequency share of the per-channel normalised
   posterior samples the DiT is trained on, and of the raw posterior means; each channel's posterior variance
   ratio (the share of its variance that is posterior noise).
4. Stage II (``extract_latents.py``, ``train_dit_flow.py``, ``eval_dit.py``): per AE and seed the paper's DiT
   (App. B: RoPE, self-conditioning; sized to the budget) on its latents, with pipeline snapshots along training;
   every snapshot's samples scored (the FD-vs-steps curve), the final one's flow-matching loss per noise level on
   held-out latents and its decoded x0 predictions along one denoising trajectory (Fig. 6).

Feature spaces for the Frechet distances (no Inception or DINOv2 weights are needed): ``domain``, a small CNN
trained here to tell the training photographs apart (a domain "Inception"; trained on the training crops, never
on the reference ones), and ``random``, an untrained CNN with fixed seeded weights (multi-scale pooled features:
independent of the data and of the classifier). The report gives both and says whether they agree.

Generation numbers are mean ± std over seeds with each AE's seed-paired difference to the first AE of its
protocol (same DiT seed, data order and sampling noise) and its 95% Student-t interval; the interval covers the
DiTs' seed-to-seed variation only (each autoencoder is trained once). Independent script runs go ``--jobs`` at a
time with the CPU threads split between them. A rerun into the same ``--output_dir`` with the same settings
reuses every finished stage (an interrupted run continues); other settings are refused unless
``--overwrite_output_dir``.
"""

import argparse
import json
import math
import os
import shutil
import threading
import time
from functools import partial

import numpy as np
import torch
import torch.nn as nn

from diffusability_hf import autoencoders as ae
from diffusability_hf.bench.runner import Stages, cpu_cores, in_parallel
from diffusability_hf.data.images import EMBEDDED_VALIDATION_IMAGES, EmbeddedPhotoCrops, installed_photographs
from diffusability_hf.errors import UsageError, run_script
from diffusability_hf.files import atomic_write_json, atomic_write_text
from diffusability_hf.hub import markdown_table
from diffusability_hf.metrics.bench import (
    DomainClassifier,
    DomainFeatures,
    RandomFeatures,
    class_accuracy,
    class_position_means,
    instrument_flags,
    layout_correlation,
    paired_comparison,
    thumbnail_features,
    well_above_chance,
)
from diffusability_hf.models.dit import RECIPES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "train_scripts")

# The default run, sized for 2 CPU cores (see docs/bench.md for its measured time). The AE sizing is the embedded
# CPU one of train_ae_se.py (lr 2e-4, no LPIPS: its trunk is a download) at batch 8 and 128 px (16x16 latents).
# The DiT: the recipe chosen in experiments/dit_recipe for 1200 steps, the shortest length at which it stopped
# improving on the vanilla latents (experiments/dit_length).
FULL = dict(
    resolution=128, train_crops=2048, reference_crops=256, heldout_crops=128, ae_batch=8, ae_lr=2e-4,
    scratch_lr=5e-4, vanilla_steps=600, ft_steps=300, scratch_steps=300, classifier_steps=400,
    dit_width=128, dit_heads=2, dit_depth=4, dit_patch=2, dit_steps=1200, dit_batch=32, dit_lr=3e-4,
    dit_recipe="rope+sincos_std1", curve_points=3, fd_samples=256, sampling_steps=32, trajectory_steps=6,
    loss_noise_levels=10, seeds=(0, 1, 2), score_probe_steps=250,
)  # fmt: skip
SMOKE = dict(
    resolution=64, train_crops=64, reference_crops=16, heldout_crops=8, ae_batch=4, ae_lr=2e-4, scratch_lr=5e-4,
    vanilla_steps=2, ft_steps=2, scratch_steps=2, classifier_steps=3, dit_width=32, dit_heads=2, dit_depth=2,
    dit_patch=2, dit_steps=4, dit_batch=8, dit_lr=1e-3, dit_recipe="rope_std0.02", curve_points=2, fd_samples=16,
    sampling_steps=2, trajectory_steps=2, loss_noise_levels=4, seeds=(0, 1), score_probe_steps=2,
)  # fmt: skip
# --ablation: +FT / +FT-SE from the embedded AE for this many steps per cell AE; the long DiT cell trains this many
# times the default DiT steps; two seeds per cell (the issue's budget rule: 2 hours on 2 cores)
ABLATION = dict(ablation_ae_steps=300, ablation_long_factor=2, ablation_seeds=[0, 1])
ABLATION_SMOKE = dict(ablation_ae_steps=2, ablation_long_factor=2, ablation_seeds=[0, 1])
# The DiT recipes the bench can train: App. B's DiT with a position scheme and a label-table init (RECIPES), or
# diffusers' stock DiT ("stock": sin-cos table, no self-conditioning) with the label-table init of the run's recipe,
# so that only the architecture differs.
# --select_recipe: every App. B candidate on the vanilla AE's latents only, seeds never used by a comparison of AEs;
# the rule that picks the bench's recipe from them is select_recipe() (experiments/dit_recipe/PROTOCOL.md). Its runs
# are named against App. B as printed (the recipe the bench had before the selection).
SELECTION = dict(dit_recipe="rope_std0.02", selection_recipes=list(RECIPES), selection_seeds=[10, 11])  # smoke too
SELECTION_STEPS = 600  # the selection's registered DiT length (the default run's before experiments/dit_length)
# --score_study: the validation family of the diffusability score (experiments/diffusability_score/PROTOCOL.md),
# label -> (start: "base" (the vanilla AE, or --base_model) or "scratch" (the embedded AE's config), SE weight,
# extra train_ae_se.py flags); KL beta 1e-2 is the paper's Table 3 range, "+FT-KL" the paper's KL-amplifies-high-
# frequencies case (Fig. 3). Seeds never used by another run.
SCORE_STUDY = dict(
    study_family={
        "+FT": ["base", 0.0, []], "+FT-SE 0.1": ["base", 0.1, []], "+FT-SE 0.25": ["base", 0.25, []],
        "+FT-SE 0.5": ["base", 0.5, []], "+FT-SE 1": ["base", 1.0, []],
        "+FT-KL 1e-2": ["base", 0.0, ["--kl_weight", 0.01]],
        "scratch": ["scratch", 0.0, []], "scratch+SE": ["scratch", 0.25, []],
    },
    study_seeds=[30, 31, 32], study_min_aes=5,
)  # fmt: skip
SCORE_STUDY_SMOKE = dict(
    study_family={"+FT": ["base", 0.0, []], "+FT-SE 0.25": ["base", 0.25, []],
                  "+FT-KL 1e-2": ["base", 0.0, ["--kl_weight", 0.01]], "scratch": ["scratch", 0.0, []]},
    study_seeds=[0, 1], study_min_aes=3,
)  # fmt: skip
CUT_RATIOS = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
FEATURES = ("domain", "random")
# The default run's autoencoders: label -> (protocol, how it is made)
DEFAULT_AES = {
    "vanilla": "finetune",
    "+FT": "finetune",
    "+FT-SE": "finetune",
    "scratch": "scratch",
    "scratch+SE": "scratch",
}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The --models flag of eval_ae.py (LABEL=PATH[:SUBFOLDER]), with this script's help text
    parser.add_argument(
        "--models",
        type=str,
        nargs="+",
        default=None,
        help="Autoencoders to compare, LABEL=PATH[:SUBFOLDER] (local folders or Hub ids); the first is the baseline "
        "of the paired differences. Default: the default run's five (vanilla, +FT, +FT-SE, scratch, scratch+SE).",
    )
    parser.add_argument(
        "--base_model",
        type=str,
        default=None,
        help="PATH[:SUBFOLDER] of an autoencoder to fine-tune with --finetune (it is then the baseline 'vanilla').",
    )
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="Make the paper's +FT and +FT-SE from --base_model with train_ae_se.py (same steps, seed and data; SE "
        "weight 0 and 0.25).",
    )
    parser.add_argument(
        "--skip_base_model",
        action="store_true",
        help="With --finetune: compare +FT and +FT-SE only (Table 1's SE comparison); the base model is neither "
        "evaluated nor given DiTs (a confirmatory run spends its budget on seeds).",
    )
    parser.add_argument(
        "--train_data_dir", type=str, default=None, help="An image folder whose subfolders are the classes."
    )
    parser.add_argument("--dataset_name", type=str, default=None, help="Or an HF dataset with image + label columns.")
    parser.add_argument(
        "--validation_data_dir",
        type=str,
        default=None,
        help="Held-out images for reconstruction and spectra (with --train_data_dir; default: the training folder, "
        "which the report then says is not held out).",
    )
    parser.add_argument(
        "--validation_split", type=str, default="validation", help="The held-out split of --dataset_name."
    )
    parser.add_argument("--resolution", type=int, default=None, help="Crop side (default 128: 16x16 latents at 8x).")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="DiT seeds (default 0 1 2).")
    parser.add_argument("--dit_steps", type=int, default=None, help="DiT training steps (default 1200).")
    parser.add_argument("--ae_steps", type=int, default=None, help="Fine-tuning steps of +FT / +FT-SE (default 300).")
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="Independent script runs at once, the CPU threads split between them (default 2: small models use 2 "
        "cores better as 2 one-thread runs than as one two-thread run).",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="Every stage with a handful of steps (the plumbing; meaningless numbers)."
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="The second run: the factors that separate a small CPU run from the paper's regime, one at a time "
        "(latent size 8x8 vs 16x16, DiT training length, DiT recipe stock vs App. B, SE scales {2, 4} vs {2}), +FT vs +FT-SE per cell "
        "with two seeds.",
    )
    parser.add_argument(
        "--select_recipe",
        action="store_true",
        help="Choose the DiT recipe before any comparison of autoencoders: every App. B candidate (RoPE or RoPE + "
        "sin-cos table; label table at DiT's 0.02 or 1.0) on the vanilla AE's latents only, seeds 10 and 11, and the "
        "fixed rule of experiments/dit_recipe/PROTOCOL.md (the best FD among generators that are not class-blind).",
    )
    parser.add_argument(
        "--score_study",
        action="store_true",
        help="Validate the diffusability score (experiments/diffusability_score/PROTOCOL.md): a family of autoencoders "
        "from the vanilla one (or --base_model) that spans diffusability (SE weights 0 to 1, a KL-heavy fine-tune, "
        "from scratch with and without SE), each scored by the cheap proxies and by the bench's generators over "
        "seeds 30 to 32, and the rank correlation of every proxy with the generators' FD.",
    )
    parser.add_argument(
        "--dit_recipe",
        type=str,
        default=None,
        choices=list(RECIPES),
        help="The DiT recipe of the comparisons (default: the one --select_recipe chose, see docs/bench.md).",
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="Where everything goes (default: diffusability_bench, diffusability_bench_ablation or "
        "diffusability_bench_recipe).",
    )
    parser.add_argument(
        "--results_dir",
        type=str,
        default=None,
        help="Also copy the report (report.md, report.json and the plots it links to) here.",
    )
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Delete an --output_dir made with other settings and start again (without it such a folder is refused; "
        "one made with the same settings is continued).",
    )
    args = parser.parse_args(input_args)
    if args.seeds is not None and len(set(args.seeds)) < 2:
        parser.error("--seeds needs at least 2 different seeds to show a spread (the default run uses 0 1 2).")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1.")
    if args.skip_base_model and not args.finetune:
        parser.error("--skip_base_model goes with --base_model PATH --finetune (it drops the base model's DiTs).")
    if args.finetune != (args.base_model is not None) and not args.score_study:  # the study's family starts from it
        parser.error("--finetune and --base_model go together: --base_model PATH --finetune.")
    if args.train_data_dir is not None and args.dataset_name is not None:
        parser.error("Give --train_data_dir or --dataset_name, not both.")
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        parser.error(f"--train_data_dir {args.train_data_dir} is not a folder.")
    if args.validation_data_dir is not None and not os.path.isdir(args.validation_data_dir):
        parser.error(f"--validation_data_dir {args.validation_data_dir} is not a folder.")
    args.user_data = args.train_data_dir is not None or args.dataset_name is not None
    if args.ablation and (args.user_data or args.models or args.base_model):
        parser.error("--ablation runs on the default data with the embedded autoencoder: drop --models, "
                     "--base_model and the data flags, or drop --ablation.")  # fmt: skip
    if args.ablation and args.resolution is not None and args.resolution < 128:
        parser.error("--ablation compares latents of --resolution and half of it: give at least 128 (8x8 latents "
                     "in the small cell, one 8x8 DCT block per channel).")  # fmt: skip
    if args.select_recipe and (args.ablation or args.user_data or args.models or args.base_model or args.dit_recipe):
        parser.error("--select_recipe runs on the default data with the embedded autoencoder's vanilla fine-tune and "
                     "tries every recipe: drop --ablation, --models, --base_model, --dit_recipe and the data flags.")  # fmt: skip
    if args.score_study and (args.ablation or args.select_recipe or args.user_data or args.models or args.finetune):
        parser.error("--score_study runs on the default data with its own family of autoencoders (from --base_model "
                     "or the vanilla one it makes): drop --ablation, --select_recipe, --models, --finetune and the "
                     "data flags.")  # fmt: skip
    if args.output_dir is None:
        args.output_dir = ("diffusability_bench_ablation" if args.ablation else
                           "diffusability_bench_recipe" if args.select_recipe else
                           "diffusability_bench_score_study" if args.score_study else "diffusability_bench")  # fmt: skip
    models = []
    for spec in args.models or []:
        label, sep, path = spec.partition("=")
        if not sep or not label or not path:
            parser.error(f"--models takes LABEL=PATH[:SUBFOLDER], got {spec!r}.")
        models.append((label, path))
    if len({label for label, _ in models}) != len(models):
        parser.error("--models labels must be different.")
    args.model_list = models
    for key in ("dit_steps", "ae_steps", "resolution"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be positive.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Running the toolkit's scripts


# ----------------------------------------------------------------------------------------------------------------
# Data and feature spaces


def write_crops(folder, names, num, resolution, seed):
    """``num`` random-scale crops of the photographs ``names`` (crop ``i`` from photograph ``i % len(names)``) as
    PNGs in ``folder/<photograph>/``, an image folder whose subfolders are the classes."""
    from PIL import Image

    if os.path.isfile(os.path.join(folder, ".complete")):
        return
    shutil.rmtree(folder, ignore_errors=True)
    crops = EmbeddedPhotoCrops(resolution, names, num_samples=num, seed=seed, random_flip=False)
    for i in range(num):
        pixels, k = crops.crop(i)
        sub = os.path.join(folder, names[k])
        os.makedirs(sub, exist_ok=True)
        array = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(os.path.join(sub, f"{i:05d}.png"))
    open(os.path.join(folder, ".complete"), "w").close()


def image_folder_items(folder):
    """``[(path, class index)]`` of an image folder whose subfolders are the classes, and the class names."""
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    items = [
        (os.path.join(folder, c, f), k)
        for k, c in enumerate(classes)
        for f in sorted(os.listdir(os.path.join(folder, c)))
        if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    ]
    return items, classes


def load_items(items, resolution):
    from diffusability_hf.data.images import open_and_crop

    pixels, labels = [], []
    for path, label in items:
        x = open_and_crop(path, resolution)
        if x is not None:
            pixels.append(x)
            labels.append(label)
    return torch.stack(pixels), torch.tensor(labels)


def make_feature_spaces(out, train_dir, test_dir, resolution, steps, batch=32):
    """Train the domain classifier on ``train_dir`` (random flips), measure its accuracy on ``test_dir`` (other
    crops), export both feature networks as TorchScript, and the classifier itself (``classifier_domain.pt``: the
    class accuracy of a generator's samples). Returns ``({name: path}, accuracy)``."""
    paths = {name: os.path.join(out, f"features_{name}.pt") for name in FEATURES}
    info_path = os.path.join(out, "features.json")
    classifier_path = os.path.join(out, "classifier_domain.pt")
    if all(os.path.isfile(p) for p in [*paths.values(), classifier_path, info_path]):
        with open(info_path) as fh:
            return paths, json.load(fh)["domain_accuracy"]
    torch.manual_seed(0)
    train_items, classes = image_folder_items(train_dir)
    x_train, y_train = load_items(train_items, resolution)
    x_test, y_test = load_items(image_folder_items(test_dir)[0], resolution)
    model = DomainClassifier(len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(x_train), (batch,), generator=gen)
        x = x_train[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        loss = nn.functional.cross_entropy(model(x), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    torch.jit.script(DomainFeatures(model)).save(paths["domain"])
    torch.jit.script(model).save(classifier_path)
    torch.jit.script(RandomFeatures(seed=0).eval()).save(paths["random"])
    atomic_write_json(info_path, {"domain_accuracy": accuracy, "classes": classes, "steps": steps})
    return paths, accuracy


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def last_interval(curve, seeds):
    """``(mean fall of the FD over the last interval of a curve, std over seeds of the final FD)`` of ``{step: {seed:
    FD}}`` (NaN where there are too few points or seeds)."""
    points = sorted(curve)
    if len(points) < 2:
        return float("nan"), float("nan")
    a = np.array([curve[points[-2]][s] for s in seeds])
    b = np.array([curve[points[-1]][s] for s in seeds])
    return float((a - b).mean()), float(b.std(ddof=1)) if len(seeds) > 1 else float("nan")


def unusable(diagnostics):
    """The flags that stop a generator from ranking latent spaces (class-blind, layout-blind, still improving), as
    words; empty for a usable one."""
    return [k.replace("_", "-") for k, v in diagnostics["flags"].items() if k != "usable" and v]


def generation_verdict(comparisons, better, worse, flags=None):
    """One sentence on a seed-paired comparison over both feature spaces (lower FD is better). ``flags``: ``{label:
    [why its generator cannot rank latent spaces]}``; any flag on either generator gives "no verdict" (the numbers
    stay in ``detail``)."""
    outcome = {}
    for space, row in comparisons.items():
        if not row["ci95_excludes_zero"]:
            outcome[space] = "no difference beyond the seed noise"
        else:
            outcome[space] = "better" if row["diff"] < 0 else "worse"
    spaces = list(outcome)
    agree = len(set(outcome.values())) == 1
    text = "; ".join(
        f"{space} FD {comparisons[space]['diff']:+.3f} (95% CI [{comparisons[space]['diff_ci95'][0]:+.3f}, "
        f"{comparisons[space]['diff_ci95'][1]:+.3f}]): {outcome[space]}"
        for space in spaces
    )
    if agree and outcome[spaces[0]] == "better":
        verdict = f"supported: {better}'s generator is better than {worse}'s in both feature spaces"
    elif agree and outcome[spaces[0]] == "worse":
        verdict = f"contradicted: {better}'s generator is worse than {worse}'s in both feature spaces"
    elif agree:
        verdict = f"not shown: {better} and {worse} give generators that do not differ beyond the seed noise"
    else:
        verdict = "inconclusive: the two feature spaces disagree"
    bad = {label: why for label, why in (flags or {}).items() if why and label in (better, worse)}
    if bad:
        verdict = "no verdict: the generators cannot rank latent spaces (" + "; ".join(
            f"{label}'s is {', '.join(why)}" for label, why in bad.items()) + ")"  # fmt: skip
    return {"verdict": verdict, "detail": text, "feature_spaces_agree": agree, "per_space": outcome}


# ----------------------------------------------------------------------------------------------------------------
# The bench


def settings_for(args):
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.resolution is not None:
        cfg["resolution"] = args.resolution
    if args.seeds is not None:
        cfg["seeds"] = tuple(dict.fromkeys(args.seeds))
    if args.dit_steps is not None:
        cfg["dit_steps"] = args.dit_steps
    if args.ae_steps is not None:
        cfg["ft_steps"] = args.ae_steps
    cfg["seeds"] = list(cfg["seeds"])
    cfg["models"] = [list(m) for m in args.model_list]
    cfg["base_model"] = args.base_model
    cfg["finetune"] = args.finetune
    if args.skip_base_model:
        cfg["skip_base_model"] = True
    cfg["train_data_dir"] = os.path.abspath(args.train_data_dir) if args.train_data_dir else None
    cfg["validation_data_dir"] = os.path.abspath(args.validation_data_dir) if args.validation_data_dir else None
    cfg["dataset_name"] = args.dataset_name
    cfg["validation_split"] = args.validation_split
    cfg["smoke"] = args.smoke
    if args.dit_recipe is not None:
        cfg["dit_recipe"] = args.dit_recipe
    if args.select_recipe:
        cfg.update(select_recipe=True, **SELECTION)
        if not args.smoke and args.dit_steps is None:
            cfg["dit_steps"] = SELECTION_STEPS
        if args.seeds is not None:
            cfg["selection_seeds"] = list(cfg["seeds"])
    if args.score_study:
        cfg.update(score_study=True, **json.loads(json.dumps(SCORE_STUDY_SMOKE if args.smoke else SCORE_STUDY)))
        if args.seeds is not None:
            cfg["study_seeds"] = list(cfg["seeds"])
    if args.ablation:
        if args.smoke and args.resolution is None:  # its small cell needs 8x8 latents (one DCT block)
            cfg["resolution"] = 128
        cfg.update(ablation=True, **(ABLATION_SMOKE if args.smoke else ABLATION))
        if args.seeds is not None:
            cfg["ablation_seeds"] = list(cfg["seeds"])
    return cfg


def check_output(out, cfg, overwrite):
    """A folder of another bench's settings is refused (or, with ``overwrite``, emptied); the same settings
    continue."""
    path = os.path.join(out, "bench_settings.json")
    if os.path.isfile(path):
        with open(path) as fh:
            old = json.load(fh)
        if old["settings"] != json.loads(json.dumps(cfg)):
            if not overwrite:
                changed = sorted(k for k in set(old["settings"]) | set(cfg) if old["settings"].get(k) != cfg.get(k))
                raise UsageError(
                    f"{out} holds a bench run with other settings ({', '.join(changed)} differ): choose another "
                    "--output_dir, or pass --overwrite_output_dir to delete it and start again."
                )
            shutil.rmtree(out)
    elif os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UsageError(
            f"{out} is not empty and holds no bench run: choose another --output_dir, or pass --overwrite_output_dir "
            "to delete it."
        )
    elif overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    if not os.path.isfile(path):
        atomic_write_json(path, {"settings": cfg})


def split_spec(spec):
    """``PATH[:SUBFOLDER]`` -> ``(path, subfolder)``; an existing path is kept whole."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, sub = spec.rsplit(":", 1)
    return path, sub or None


def ae_args(spec, flag="--pretrained_model_name_or_path", subflag="--subfolder"):
    path, sub = split_spec(spec)
    return [flag, path] + ([subflag, sub] if sub else [])


def slug(label):
    """A folder name for a label: ``+FT-SE`` -> ``plus-FT-SE``, ``+FT-SE {2} 16x16`` -> ``plus-FT-SE_2_16x16``."""
    return label.replace("+", "plus-").replace(" ", "_").replace("{", "").replace("}", "").replace(",", "")


class Bench:
    """The bench's stages over a set of autoencoders: the data and feature spaces of a resolution, stage I runs,
    the evaluations of a group of AEs, latents, and DiT runs keyed by (AE, recipe, steps, seed)."""

    def __init__(self, args, cfg, out):
        self.args, self.cfg, self.out = args, cfg, out
        self.stages = Stages(out, SCRIPTS, ROOT)
        self.cores, self.jobs = cpu_cores(), args.jobs
        self.sources, self.features = {}, {}
        # parallel stage-I tasks ask for the same data and feature spaces: the first writes them, the others wait
        self.prepare = threading.RLock()
        self.models, self.info = {}, {}  # label -> path spec; label -> protocol, resolution, made by the bench
        self.instruments = {}  # resolution -> Instrument

    def parallel(self, tasks):
        return in_parallel(tasks, self.jobs, self.cores)

    def suffix(self, res):
        """Folder suffix of a resolution that is not the run's main one (the ablation's 64 px cell)."""
        return "" if res == self.cfg["resolution"] else f"_{res}px"

    # 0. Data
    def data(self, res):
        """The script arguments of the training, held-out and reference data at ``res`` (written once)."""
        with self.prepare:
            if res not in self.sources:
                self.sources[res] = self._write_data(res)
            return self.sources[res]

    def _write_data(self, res):
        cfg, start = self.cfg, time.time()
        if self.args.user_data:
            train = (["--train_data_dir", cfg["train_data_dir"]] if cfg["train_data_dir"] else
                     ["--dataset_name", cfg["dataset_name"]])  # fmt: skip
            heldout = (["--data_dir", cfg["validation_data_dir"] or cfg["train_data_dir"]] if cfg["train_data_dir"]
                       else ["--dataset_name", cfg["dataset_name"], "--split", cfg["validation_split"]])  # fmt: skip
            held = cfg["validation_data_dir"] or (
                f"split {cfg['validation_split']}" if cfg["dataset_name"] else
                "NOT held out (no --validation_data_dir: the training folder)")  # fmt: skip
            src = dict(train=train, heldout=heldout, reference=heldout, train_dir=cfg["train_data_dir"],
                       test_dir=cfg["validation_data_dir"] or cfg["train_data_dir"], photos={},
                       note=f"the user's data ({cfg['train_data_dir'] or cfg['dataset_name']}); held out: {held}")  # fmt: skip
        else:
            names = installed_photographs()
            heldout_names = [n for n in names if n in EMBEDDED_VALIDATION_IMAGES]
            train_names = [n for n in names if n not in heldout_names]
            data = os.path.join(self.out, "data" + self.suffix(res))
            write_crops(os.path.join(data, "train"), train_names, cfg["train_crops"], res, seed=0)
            write_crops(os.path.join(data, "reference"), train_names, cfg["reference_crops"], res, seed=1)
            write_crops(os.path.join(data, "heldout"), heldout_names, cfg["heldout_crops"], res, seed=2)
            src = dict(
                train=["--train_data_dir", os.path.join(data, "train")],
                heldout=["--data_dir", os.path.join(data, "heldout")],
                reference=["--data_dir", os.path.join(data, "reference")],
                train_dir=os.path.join(data, "train"), test_dir=os.path.join(data, "reference"),
                photos={"train": train_names, "heldout": heldout_names},
                note=(f"{len(names)} colour photographs of the installed packages; classes (training): "
                      f"{', '.join(train_names)}; held out (never trained on): {', '.join(heldout_names)}. "
                      f"{cfg['train_crops']} training crops, {cfg['reference_crops']} reference crops (other seed), "
                      f"{cfg['heldout_crops']} held-out crops, {res} px, each a random region of 1 to 4 crop sides"),
            )  # fmt: skip
        self.stages.record("data" + self.suffix(res), time.time() - start)
        return src

    def feature_spaces(self, res):
        with self.prepare:
            if res not in self.features:
                start, src = time.time(), self.data(res)
                folder = os.path.join(self.out, "features" + self.suffix(res)) if self.suffix(res) else self.out
                os.makedirs(folder, exist_ok=True)
                self.features[res] = make_feature_spaces(folder, src["train_dir"], src["test_dir"], res,
                                                         self.cfg["classifier_steps"])  # fmt: skip
                self.stages.record("feature_spaces" + self.suffix(res), time.time() - start)
            return self.features[res]

    # 1. Stage I
    def train_ae(self, label, start, se_weight, steps, lr, res, protocol, threads, extra=()):
        """``train_ae_se.py`` from ``start`` (``--pretrained_model_name_or_path`` or ``--model_config_name_or_path``
        arguments) on the bench's training data; everything but ``se_weight`` and ``extra`` is shared."""
        cfg, folder = self.cfg, os.path.join(self.out, "ae", slug(label))
        self.stages.script(
            f"train_{slug(label)}", os.path.join(folder, "config.json"), "train_ae_se.py", *start,
            *self.data(res)["train"], "--resolution", res, "--train_batch_size", cfg["ae_batch"], "--lpips_weight", 0,
            "--random_flip", "--seed", 0, "--report_to", "none", "--checkpoints_total_limit", 1, "--se_weight",
            se_weight, "--learning_rate", lr, "--max_train_steps", steps, "--validation_steps", steps,
            "--checkpointing_steps", steps, *extra, "--output_dir", folder, threads=threads,
        )  # fmt: skip
        self.add(label, folder, protocol, res, made=True)

    def add(self, label, path, protocol, res, made=False):
        self.models[label] = path
        self.info[label] = {"protocol": protocol, "resolution": res, "made_by_the_bench": made}

    # 2-3. Reconstruction, DCT cut, spectra
    def evaluate(self, labels):
        """eval_ae.py (held-out: PSNR, SSIM, DCT cut; reference: rFD in both feature spaces) and
        analyze_spectrum.py (normalised posterior samples; raw means) of ``labels``, which share a resolution."""
        res = self.info[labels[0]]["resolution"]
        src, (features, _) = self.data(res), self.feature_spaces(res)
        specs = [f"{label}={self.models[label]}" for label in labels]
        n_held, n_ref, sfx = self.cfg["heldout_crops"], self.cfg["reference_crops"], self.suffix(res)
        runs = {
            "eval_ae": ("metrics.json", "eval_ae.py", *src["heldout"], "--num_samples", n_held, "--metrics", "psnr",
                        "ssim", "--dct_cut_ratios", *CUT_RATIOS),
            "eval_ae_fd": ("metrics.json", "eval_ae.py", *src["reference"], "--num_samples", n_ref, "--metrics",
                           "fd", "psnr", "--feature_extractor", *[features[n] for n in FEATURES]),
            "spectrum": ("spectrum.json", "analyze_spectrum.py", *src["heldout"], "--num_samples", n_held,
                         "--sample_posterior", "--normalize_latents", "per_channel"),  # what the DiT sees
            "spectrum_means": ("spectrum.json", "analyze_spectrum.py", *src["heldout"], "--num_samples", n_held),
        }  # fmt: skip
        if src["train_dir"]:  # the cheap proxies (diffusability_score.py) need image folders with class subfolders
            held = src["heldout"][1] if src["heldout"][0] == "--data_dir" else src["test_dir"]
            runs["score"] = (
                "scores.json", "diffusability_score.py", "--train_data_dir", src["train_dir"], "--reference_data_dir",
                src["test_dir"], "--heldout_data_dir", held, "--probe_steps", self.cfg["score_probe_steps"],
                "--probe_batch_size", self.cfg["dit_batch"], "--dit_recipe", self.cfg["dit_recipe"], "--dit_width",
                self.cfg["dit_width"], "--dit_depth", self.cfg["dit_depth"], "--dit_heads", self.cfg["dit_heads"],
                "--dit_patch", self.cfg["dit_patch"], "--noise_levels", self.cfg["loss_noise_levels"],
            )  # fmt: skip

        def one(name, threads):
            marker, script, *rest = runs[name]
            folder = os.path.join(self.out, name + sfx)
            self.stages.script(name + sfx, os.path.join(folder, marker), script, "--models", *specs, *rest,
                               "--resolution", res, "--output_dir", folder, threads=threads)  # fmt: skip

        # the DCT cut (eval_ae) decodes every AE eleven times: it goes last, when it gets every core to itself
        self.parallel([partial(one, name) for name in ("eval_ae_fd", "spectrum", "spectrum_means", "score", "eval_ae")
                       if name in runs])  # fmt: skip
        return {name: read_json(self.out, name + sfx, runs[name][0]) for name in runs}

    # 4. Stage II
    def extract(self, label, which, threads):
        """Latents of the training crops (with flips) or of the reference crops (the held-out loss)."""
        res, cfg = self.info[label]["resolution"], self.cfg
        src = self.data(res)
        folder = os.path.join(self.out, f"latents_{which}", slug(label))
        source = src["train"] if which == "train" else (
            ["--train_data_dir", src["reference"][1]] if src["reference"][0] == "--data_dir" else
            ["--dataset_name", cfg["dataset_name"], "--split", cfg["validation_split"]])  # fmt: skip
        extra = ["--flip"] if which == "train" else ["--max_samples", cfg["reference_crops"]]
        self.stages.script(f"extract_{which}_{slug(label)}", os.path.join(folder, "metadata.json"),
                           "extract_latents.py", *ae_args(self.models[label]), *source, "--resolution", res, *extra,
                           "--output_dir", folder, threads=threads)  # fmt: skip

    def recipe(self, recipe=None):
        """``(stock, pos_embed, class_embed_init_std)`` of a recipe name (default: the run's); ``"stock"`` is
        diffusers' DiT with the run's recipe's label-table init."""
        name = recipe or self.cfg["dit_recipe"]
        if name == "stock":
            return True, "sincos", RECIPES[self.cfg["dit_recipe"]]["class_embed_init_std"]
        return False, RECIPES[name]["pos_embed"], RECIPES[name]["class_embed_init_std"]

    def dit_config(self, label, recipe=None):
        """The paper's DiT (App. B: RoPE, self-conditioning; a recipe of :data:`RECIPES`) or diffusers' stock DiT
        (``"stock"``: sin-cos positions, no self-conditioning) at the bench's size, for this AE's latents."""
        meta = read_json(self.out, "latents_train", slug(label), "metadata.json")
        cfg, recipe = self.cfg, recipe or self.cfg["dit_recipe"]
        stock, pos_embed, std = self.recipe(recipe)
        folder = os.path.join(self.out, "dit_configs", f"{slug(label)}-{slug(recipe)}")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            channels, size = meta["latent_shape"][0], meta["latent_shape"][1]
            shape = dict(num_attention_heads=cfg["dit_heads"], attention_head_dim=cfg["dit_width"] // cfg["dit_heads"],
                         in_channels=channels, num_layers=cfg["dit_depth"], sample_size=size,
                         patch_size=cfg["dit_patch"], num_embeds_ada_norm=meta["num_classes"])  # fmt: skip
            if not stock:
                from diffusability_hf.models.selfcond_dit import SelfConditionedDiT

                model = SelfConditionedDiT(**shape, pos_embed=pos_embed, self_conditioning=True,
                                           class_embed_init_std=std)  # fmt: skip
            else:
                from diffusers import DiTTransformer2DModel

                model = DiTTransformer2DModel(**shape, out_channels=channels, norm_type="ada_norm_zero")
            model.save_config(folder)
        return folder

    def dit_tag(self, label, seed, recipe=None, steps=None):
        recipe, steps = recipe or self.cfg["dit_recipe"], steps or self.cfg["dit_steps"]
        variant = (
            "" if (recipe, steps) == (self.cfg["dit_recipe"], self.cfg["dit_steps"]) else f"-{slug(recipe)}-{steps}"
        )
        return f"{slug(label)}{variant}-seed{seed}"

    def curve_steps(self, steps):
        every = max(1, steps // self.cfg["curve_points"])
        return sorted({*range(every, steps, every), steps})

    def generate(self, label, seed, threads, recipe=None, steps=None, curve=True):
        """train_dit_flow.py with pipeline snapshots, then eval_dit.py on every snapshot and the final pipeline
        (which also gets the held-out loss per noise level and the Fig. 6 trajectory)."""
        cfg, steps = self.cfg, steps or self.cfg["dit_steps"]
        res = self.info[label]["resolution"]
        src, (features, _) = self.data(res), self.feature_spaces(res)
        tag = self.dit_tag(label, seed, recipe, steps)
        stock, _, init_std = self.recipe(recipe)
        dit = os.path.join(self.out, "dit", tag)
        curve = self.curve_steps(steps) if curve else [steps]
        snapshots = ["--pipeline_snapshot_steps", curve[0]] if len(curve) > 1 else []
        self.stages.script(
            f"dit_{tag}", os.path.join(dit, "model_index.json"), "train_dit_flow.py", "--latents_dir",
            os.path.join(self.out, "latents_train", slug(label)),
            *ae_args(self.models[label], "--pretrained_vae_model_name_or_path", "--vae_subfolder"),
            "--model_config_name_or_path", self.dit_config(label, recipe), *(["--stock_dit"] if stock else []),
            "--class_embed_init_std", init_std, "--max_train_steps", steps, "--train_batch_size", cfg["dit_batch"], "--learning_rate",
            cfg["dit_lr"], "--lr_warmup_steps", max(1, steps // 10), "--validation_steps", steps,
            "--checkpointing_steps", steps, *snapshots, "--num_inference_steps",
            cfg["sampling_steps"], "--seed", seed, "--report_to", "none", "--output_dir", dit, threads=threads,
        )  # fmt: skip
        reference = (["--reference_data_dir", src["reference"][1]] if src["reference"][0] == "--data_dir" else
                     ["--reference_dataset_name", cfg["dataset_name"], "--reference_split", cfg["validation_split"]])  # fmt: skip
        for step in curve:
            final = step == steps
            pipeline = dit if final else os.path.join(dit, "snapshots", f"step-{step}")
            folder = os.path.join(self.out, "eval_dit", tag, f"step-{step}")
            extra = []
            if final:
                extra = ["--loss_latents_dir", os.path.join(self.out, "latents_reference", slug(label)),
                         "--loss_noise_levels", cfg["loss_noise_levels"], "--trajectory_steps",
                         cfg["trajectory_steps"]]  # fmt: skip
            self.stages.script(
                f"eval_dit_{tag}_{step}", os.path.join(folder, "metrics.json"), "eval_dit.py", "--pipeline", pipeline,
                "--num_samples", cfg["fd_samples"], "--num_inference_steps", cfg["sampling_steps"],
                "--class_sampling", "balanced", "--seed", seed, "--feature_extractor",
                *[features[n] for n in FEATURES], *reference, "--num_reference", cfg["reference_crops"],
                "--resolution", res, "--stats_cache_dir", os.path.join(self.out, "reference_stats"), *extra,
                "--output_dir", folder, threads=threads,
            )  # fmt: skip

    def instrument(self, label):
        res = self.info[label]["resolution"]
        meta = read_json(self.out, "latents_train", slug(label), "metadata.json")
        if res not in self.instruments:
            self.instruments[res] = Instrument(self, res, meta["id2label"])
        return self.instruments[res]

    def diagnose(self, label, seeds, recipe=None, steps=None, curve=True):
        """Is this AE's generator (``recipe``, ``steps``) an instrument? Per seed: class accuracy, layout
        correlation and thumbnail FD of the final samples, the held-out loss's class gain (mean over noise levels);
        over seeds: the pooled class-accuracy test, and :func:`instrument_flags` (the FD curve's last interval
        in the ``domain`` space against the final FD's seed std)."""
        steps = steps or self.cfg["dit_steps"]
        instrument = self.instrument(label)
        per_seed = {}
        for seed in seeds:
            folder = os.path.join(self.out, "eval_dit", self.dit_tag(label, seed, recipe, steps), f"step-{steps}")
            row = instrument.measure(os.path.join(folder, "samples"))
            gain = read_json(folder, "metrics.json")["loss_per_noise_level"]["class_gain"]
            per_seed[seed] = {**row, "class_gain": float(np.mean(gain))}
        check = well_above_chance(sum(r["correct"] for r in per_seed.values()),
                                  sum(r["num_samples"] for r in per_seed.values()), instrument.num_classes)  # fmt: skip
        fd, fd_curve, _ = self.results(label, seeds, recipe, steps, curve)
        nan = float("nan")
        last_gain, noise = last_interval(fd_curve["domain"], seeds) if len(seeds) >= 2 else (nan, nan)
        layout = float(np.mean([r["layout_correlation"] for r in per_seed.values()]))
        flags = instrument_flags(check, layout, instrument.layout_ceiling, last_gain, noise)
        return {
            "per_seed": {str(s): r for s, r in per_seed.items()},
            "class_accuracy": check,
            "layout_correlation": layout,
            "layout_ceiling": instrument.layout_ceiling,
            "fd_thumbnail": float(np.mean([r["fd_thumbnail"] for r in per_seed.values()])),
            "class_gain": float(np.mean([r["class_gain"] for r in per_seed.values()])),
            "fd_last_interval_gain": last_gain,
            "fd_seed_std": noise,
            "flags": flags,
        }

    def results(self, label, seeds, recipe=None, steps=None, curve=True):
        """``(final FD {space: {seed: value}}, curve {space: {step: {seed: value}}}, loss {seed: ...})``; the
        curve has the final step only when the run was made with ``curve=False``."""
        steps = steps or self.cfg["dit_steps"]
        evaluated = self.curve_steps(steps) if curve else [steps]
        fd = {space: {} for space in FEATURES}
        curve = {space: {} for space in FEATURES}
        loss = {}
        for seed in seeds:
            for step in evaluated:
                m = read_json(self.out, "eval_dit", self.dit_tag(label, seed, recipe, steps), f"step-{step}",
                              "metrics.json")  # fmt: skip
                values = fd_values(m["metrics"])
                for space in FEATURES:
                    curve[space].setdefault(step, {})[seed] = values[space]
                    if step == steps:
                        fd[space][seed] = values[space]
                if step == steps:
                    loss[seed] = m["loss_per_noise_level"]
        return fd, curve, loss


def load_samples(folder):
    """An eval_dit ``samples/`` folder as ``(images (N, 3, H, W) in [-1, 1], the classes they were asked for)``."""
    from PIL import Image

    with open(os.path.join(folder, "labels.json")) as fh:
        labels = json.load(fh)
    names = sorted(labels)
    images = [torch.from_numpy(np.asarray(Image.open(os.path.join(folder, n)).convert("RGB")).copy()) for n in names]
    pixels = torch.stack(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, torch.tensor([int(labels[n]) for n in names])


class Instrument:
    """What a generator's samples say about the generator itself, against the reference crops: class accuracy (the
    domain classifier), per-class layout (:func:`layout_correlation`, against the data's own consistency between
    the reference crops and as many training crops), and the FD of 8x8 thumbnails (a space not pooled over
    space). Built once per resolution."""

    def __init__(self, bench, res, id2label):
        src, (features, _) = bench.data(res), bench.feature_spaces(res)
        folder = os.path.dirname(features["domain"])
        self.classifier = torch.jit.load(os.path.join(folder, "classifier_domain.pt")).eval()
        self.num_classes = len(id2label)
        index = {name: int(k) for k, name in id2label.items()}

        def labelled(directory, limit=None):
            items, classes = image_folder_items(directory)
            items = [(path, index[classes[k]]) for path, k in items if classes[k] in index]
            if limit is not None and len(items) > limit:
                keep = torch.randperm(len(items), generator=torch.Generator().manual_seed(0))[:limit].tolist()
                items = [items[i] for i in sorted(keep)]
            return load_items(items, res)

        ref, ref_labels = labelled(src["test_dir"])
        self.reference_means = class_position_means(ref, ref_labels, self.num_classes)
        train, train_labels = labelled(src["train_dir"], limit=len(ref))
        self.layout_ceiling = layout_correlation(class_position_means(train, train_labels, self.num_classes),
                                                 self.reference_means)  # fmt: skip
        thumbs = thumbnail_features(ref)
        self.reference_thumbs = (thumbs.mean(0), np.cov(thumbs, rowvar=False))

    def measure(self, samples_dir):
        from diffusability_hf.metrics import frechet_distance

        pixels, labels = load_samples(samples_dir)
        accuracy = class_accuracy(self.classifier, pixels, labels)
        thumbs = thumbnail_features(pixels)
        return {
            "class_accuracy": accuracy,
            "correct": int(round(accuracy * len(labels))),
            "num_samples": len(labels),
            "layout_correlation": layout_correlation(
                class_position_means(pixels, labels, self.num_classes), self.reference_means
            ),  # fmt: skip
            "fd_thumbnail": frechet_distance(thumbs.mean(0), np.cov(thumbs, rowvar=False), *self.reference_thumbs),
        }


def main(args):
    cfg = settings_for(args)
    out = os.path.abspath(args.output_dir)
    check_output(out, cfg, args.overwrite_output_dir)
    bench = Bench(args, cfg, out)
    if args.ablation:
        return run_ablation(bench)
    if args.select_recipe:
        return run_selection(bench)
    if args.score_study:
        return run_score_study(bench)
    res = cfg["resolution"]

    # 1. Stage I
    if not args.model_list and not args.base_model:  # the default run: both protocols from the embedded AE
        bench.train_ae("vanilla", ["--pretrained_model_name_or_path", ae.EMBEDDED_AE], 0.0, cfg["vanilla_steps"],
                       cfg["ae_lr"], res, "finetune", threads=bench.cores)  # fmt: skip
        vanilla = ["--pretrained_model_name_or_path", bench.models["vanilla"]]
        config = ["--model_config_name_or_path", os.path.join(ae.EMBEDDED_AE, "config.json")]
        bench.parallel([
            partial(bench.train_ae, "+FT", vanilla, 0.0, cfg["ft_steps"], cfg["ae_lr"], res, "finetune"),
            partial(bench.train_ae, "+FT-SE", vanilla, 0.25, cfg["ft_steps"], cfg["ae_lr"], res, "finetune"),
            partial(bench.train_ae, "scratch", config, 0.0, cfg["scratch_steps"], cfg["scratch_lr"], res, "scratch"),
            partial(bench.train_ae, "scratch+SE", config, 0.25, cfg["scratch_steps"], cfg["scratch_lr"], res,
                    "scratch"),
        ])  # fmt: skip
        for label in DEFAULT_AES:  # in the table's order, whichever run finished first
            bench.info[label] = bench.info.pop(label)
            bench.models[label] = bench.models.pop(label)
    else:
        for label, spec in args.model_list:
            bench.add(label, spec, "given", res)
        if args.base_model:
            if not args.skip_base_model:
                bench.add("vanilla", args.base_model, "finetune", res)
            base = ae_args(args.base_model)
            bench.parallel([
                partial(bench.train_ae, "+FT", base, 0.0, cfg["ft_steps"], cfg["ae_lr"], res, "finetune"),
                partial(bench.train_ae, "+FT-SE", base, 0.25, cfg["ft_steps"], cfg["ae_lr"], res, "finetune"),
            ])  # fmt: skip
            for label in ("+FT", "+FT-SE"):
                bench.info[label] = bench.info.pop(label)
                bench.models[label] = bench.models.pop(label)
    labels = list(bench.models)

    # 2-3. Reconstruction, DCT cut, spectra
    evals = bench.evaluate(labels)

    # 4. Stage II: latents, then per AE and seed a DiT and its scores; seeds outermost, so that runs sharing the
    # machine at the same time are spread over the AEs
    bench.parallel([partial(bench.extract, label, which) for label in labels for which in ("train", "reference")])
    for label in labels:
        bench.dit_config(label)
    bench.parallel([partial(bench.generate, label, seed) for seed in cfg["seeds"] for label in labels])
    write_report(bench, labels, evals)
    if args.results_dir:
        publish(out, args.results_dir, REPORT_FILES)


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


SELECTION_REPORT_FILES = ("report.md", "report.json")


def select_recipe(candidates, require_layout=True):
    """The rule of experiments/dit_recipe/PROTOCOL.md, with its amendment. ``candidates``: ``{recipe: {"well_above":
    bool, "layout_blind": bool or None, "fd_mean": float, "fd_std": float}}`` in the protocol's order (closest to
    App. B as printed first). Returns ``(recipe, reason)``: the lowest mean ``domain`` FD among the candidates whose
    samples are well above chance and (``require_layout``, the amendment) not layout-blind; if the runner-up is
    listed earlier and within the larger seed std of the two, the runner-up; with none eligible, App. B as printed
    (whose comparisons then give no verdict). ``require_layout=False`` is the rule as registered before the run,
    which left layout to the report: it chose a layout-blind recipe, on which the bench can give no verdict."""
    order = list(candidates)
    eligible = [
        n for n in order if candidates[n]["well_above"] and not (require_layout and candidates[n]["layout_blind"])
    ]
    ok = sorted(eligible, key=lambda n: candidates[n]["fd_mean"])
    what = "well above chance and not layout-blind" if require_layout else "well above chance"
    if not ok:
        return order[0], f"no candidate's samples are {what}: App. B as printed, and no generation verdict"
    best, reason = ok[0], f"the lowest mean domain FD among the candidates {what}"
    if len(ok) > 1:
        runner = ok[1]
        margin = max(candidates[best]["fd_std"], candidates[runner]["fd_std"])
        if (
            order.index(runner) < order.index(best)
            and candidates[runner]["fd_mean"] - candidates[best]["fd_mean"] <= margin
        ):
            best = runner
            reason = (f"the runner-up, listed earlier, within the larger seed std ({margin:.3g}) of {ok[0]}'s mean "
                      "domain FD (tie-break)")  # fmt: skip
    return best, reason


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


# what each proxy's cost includes besides encoding the crops (diffusability_score.py's seconds)
PROXY_COST = {"hf_share": "spectrum", "spectral_slope": "spectrum", "rgb_profile_distance": "spectrum",
              "dct_cut_slope": "dct_cut", "noise_psnr": "noise", "linear_probe": "linear_probe",
              "flow_loss_auc": "flow_probe", "flow_class_gain": "flow_probe"}  # fmt: skip
STUDY_TARGET = 0.8  # the issue's target: Spearman at least 0.8 (in the predicted direction) against generator FD


def proxy_study(scores, fd, labels, seeds, min_aes=5):
    """Every proxy against the generators' FD over ``labels`` (one feature space): Spearman and Kendall signed so
    that +1 is a perfect prediction (:data:`PROXIES`' direction), a bootstrap interval of the signed Spearman over
    autoencoders and seeds, and the pairs that FD separates beyond its noise that the proxy orders the same way.
    ``fd``: ``{label: {seed: FD}}``. With fewer than ``min_aes`` labels: no correlations (NaN)."""
    from diffusability_hf.metrics.diffusability import (
        PROXIES,
        bootstrap_spearman,
        pair_agreement,
        rank_correlations,
    )

    def no_study():  # too few autoencoders, or a proxy some of them lack
        return {
            "spearman": float("nan"),
            "kendall": float("nan"),
            "interval": [float("nan")] * 2,
            "pairs": {"agreement": float("nan"), "agree": 0, "separated": 0},
        }

    if len(labels) < min_aes:
        return {proxy: no_study() for proxy in PROXIES}
    per_seed = np.array([[fd[label][s] for s in seeds] for label in labels])
    means = per_seed.mean(1)
    noise = per_seed.std(1, ddof=1) / math.sqrt(len(seeds)) if len(seeds) > 1 else np.zeros(len(labels))
    out = {}
    for proxy, (_, sign) in PROXIES.items():
        if any(proxy not in scores[label] for label in labels):
            out[proxy] = no_study()
            continue
        x = np.array([scores[label][proxy] for label in labels], dtype=np.float64)
        r = rank_correlations(x, means)
        ci = bootstrap_spearman(x, per_seed)
        lo, hi = sorted((-sign * ci["low"], -sign * ci["high"]))
        out[proxy] = {"spearman": -sign * r["spearman"], "kendall": -sign * r["kendall"], "interval": [lo, hi],
                      "bootstrap_draws": ci["draws"], "pairs": pair_agreement(list(x), list(means), list(noise), sign)}  # fmt: skip
    return out


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
    primary = study["usable"]["domain"]
    if len(usable) < cfg["study_min_aes"]:
        verdict = (f"no verdict: {len(usable)} of {len(labels)} generators pass the instrument checks (at least "
                   f"{cfg['study_min_aes']} are needed to rank the family)")  # fmt: skip
    else:
        met = [p for p, r in primary.items() if r["spearman"] >= STUDY_TARGET]
        best = max(primary, key=lambda p: primary[p]["spearman"])
        verdict = (f"{', '.join(met)} reach Spearman >= {STUDY_TARGET} against the domain FD" if met else
                   f"no proxy reaches Spearman {STUDY_TARGET}: the best is {best} at {primary[best]['spearman']:+.2f} "
                   f"[{primary[best]['interval'][0]:+.2f}, {primary[best]['interval'][1]:+.2f}]")  # fmt: skip
    times = {"total": bench.stages.total(), "invocations": list(bench.stages.times["invocations"]),
             **bench.stages.times["steps"]}  # fmt: skip
    result = {
        "smoke": cfg["smoke"], "score_study": True, "settings": cfg, "seeds": seeds,
        "models": {label: {"path": bench.models[label], **bench.info[label],
                           "weights_fingerprint": scores[label]["weights_fingerprint"]} for label in labels},
        "proxies": {label: {p: scores[label][p] for p in PROXIES if p in scores[label]} for label in labels},
        "proxy_seconds": cost, "generation_fd": fd, "instrument": diagnostics, "usable": usable, "study": study,
        "verdict": verdict, "seconds": times,
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


STUDY_REPORT_FILES = ("report.md", "report.json", "study.png")


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


def read_json(*parts):
    with open(os.path.join(*parts)) as fh:
        return json.load(fh)


def fd_values(metrics):
    """``{feature space: value}`` of an eval_dit/eval_ae metrics.json ``metrics`` block, keyed by extractor file."""
    found = {}
    for key, entry in metrics.items():
        for space in FEATURES:
            if f"features_{space}" in key:  # eval_dit: {"value": ...}; eval_ae: the number itself
                found[space] = entry["value"] if isinstance(entry, dict) else entry
    return found


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
                 for r in CUT_RATIOS[1:]}  # fmt: skip
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
                for r in CUT_RATIOS
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


def portable(value, out):
    """``value`` ready for ``report.json``: the output folder's and the repository's absolute paths made relative
    to them, NaN and infinities as ``None`` (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): portable(v, out) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v, out) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, str) and os.path.isabs(value):
        for base in (out, ROOT):
            if value == base or value.startswith(base + os.sep):
                return os.path.relpath(value, base)
    return value


REPORT_FILES = ("report.md", "report.json", "fd_curve.png", "loss_per_noise_level.png", "trajectories.png",
                "samples.png", "spectrum/spectrum.png", "eval_ae/dct_cut.png", "eval_ae/dct_cut_grid.png",
                "score/scores.md", "score/scores.png")  # fmt: skip
SCORE_FILES = ("score/scores.md", "score/scores.png")  # absent where the data was no image folder (nothing to score)


ABLATION_REPORT_FILES = ("report.md", "report.json")


def publish(out, results_dir, files):
    """Copy the report and the plots it links to (paths relative to it, so the links keep working)."""
    for rel in files:
        if rel in SCORE_FILES and not os.path.isfile(os.path.join(out, rel)):
            continue
        os.makedirs(os.path.dirname(os.path.join(results_dir, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(out, rel), os.path.join(results_dir, rel))


if __name__ == "__main__":
    run_script(main, parse_args)
