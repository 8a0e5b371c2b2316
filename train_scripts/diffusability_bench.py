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
import os
from functools import partial

from diffusability_hf import autoencoders as ae
from diffusability_hf.bench.bench import Bench
from diffusability_hf.bench.report import write_report
from diffusability_hf.bench.settings import DEFAULT_AES, REPORT_FILES, ae_args, check_output, publish, settings_for
from diffusability_hf.bench.studies import run_ablation, run_score_study, run_selection
from diffusability_hf.errors import run_script
from diffusability_hf.models.dit import RECIPES


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
        "--ae_seed", type=int, default=None, help="The seed of every autoencoder the bench trains (default 0)."
    )
    parser.add_argument(
        "--fd_curve_from",
        type=int,
        default=None,
        help="The first DiT step of the FD curve (default: a third of --dit_steps). The instrument check reads only "
        "the curve's last interval, so a later start saves evaluations without changing the check.",
    )
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
    for key in ("dit_steps", "ae_steps", "resolution", "fd_curve_from"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"--{key} must be positive.")
    return args


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


if __name__ == "__main__":
    run_script(main, parse_args)
