"""The bench's settings (the default run, ``--smoke``, the ablation, the recipe selection and the score study), its
output folder's contract, and where its files go."""

import json
import math
import os
import shutil

from ..errors import UsageError
from ..files import atomic_write_json
from ..models.dit import RECIPES

# the clone the bench runs from: its scripts are train_scripts/*.py, run as a user runs them
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    cut_ratios=[0, 0.5, 0.9],
)  # fmt: skip
# --ablation: +FT / +FT-SE from the embedded AE for this many steps per cell AE; the long DiT cell trains this many
# times the default DiT steps; two seeds per cell (the budget rule: 2 hours on 2 cores)
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
# The DCT cut's ratios (Fig. 8): the default run's; --smoke cuts at 0, 50% and 90% only (the same code path, a third
# of the decodes). The first must be 0 (the report measures each cut against the uncut reconstruction), and 0.5 is
# the ablation's column. Kept out of FULL so that a default run started before ``cut_ratios`` existed continues.
CUT_RATIOS = [0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def cut_ratios(cfg):
    return cfg.get("cut_ratios", CUT_RATIOS)


FEATURES = ("domain", "random")
# The default run's autoencoders: label -> (protocol, how it is made)
DEFAULT_AES = {
    "vanilla": "finetune",
    "+FT": "finetune",
    "+FT-SE": "finetune",
    "scratch": "scratch",
    "scratch+SE": "scratch",
}


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
    if args.ae_seed is not None:  # only when given: a continued older run keeps its settings
        cfg["ae_seed"] = args.ae_seed
    if args.fd_curve_from is not None:
        cfg["fd_curve_from"] = args.fd_curve_from
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


SELECTION_REPORT_FILES = ("report.md", "report.json")


STUDY_REPORT_FILES = ("report.md", "report.json", "study.png")


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
