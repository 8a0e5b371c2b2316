#!/usr/bin/env python
"""Train a class-conditional latent DiT with rectified flow on autoencoder latents (paper Section 4, App. B).

The paper judges an autoencoder by the DiT trained on its latents. This script trains the paper's DiT (App. B: the
toolkit's ``SelfConditionedDiT``, with 2D RoPE and self-conditioning at 90%; ``--stock_dit`` trains diffusers'
``DiTTransformer2DModel`` instead) with the library's ``diffusability_hf.flow.FlowMatchingLoss``:

    x_t = (1 - sigma) x0 + sigma noise,   target v = noise - x0,   sigma = sigmoid(--logit_mean + --logit_std N(0, 1))

(sigma = 1 is pure noise, as in diffusers' ``FlowMatchEulerDiscreteScheduler``; ``--weighting_scheme uniform`` draws
sigma uniformly), with classifier-free-
guidance label dropout, AdamW (0.9, 0.99), weight decay 0.01, warmup then cosine decay to 1e-5, gradient clipping at
16 and an EMA, and saves a ``DiTFlowMatchPipeline`` (transformer + VAE + ``FlowMatchEulerDiscreteScheduler``) that
``DiffusionPipeline.from_pretrained(out, trust_remote_code=True)`` loads. The VAE must be the autoencoder whose
weights encoded the latents (compared by weights fingerprint, refused otherwise); the pipeline records both
fingerprints in ``model_index.json`` under ``provenance``. An ``--output_dir`` holding a finished pipeline or another
run's checkpoints is refused unless ``--resume_from_checkpoint`` or ``--overwrite_output_dir`` is given; checkpoints
and the final save are atomic. ``--pipeline_snapshot_steps N`` also saves the EMA pipeline every N steps as
``snapshots/step-N`` (for a FD-vs-steps curve with eval_dit.py). With no arguments it trains a small DiT on the
embedded autoencoder's latents of the scikit-image photographs (class = source photograph), offline:

    accelerate launch train_scripts/extract_latents.py --output_dir latents
    accelerate launch train_scripts/train_dit_flow.py --latents_dir latents --output_dir dit

Video latents (extract_latents.py with a video autoencoder, ``(C, T', h, w)``) train the paper's video DiT, "a direct
adaptation of the image one where we additionally unroll the temporal axis" (``SelfConditionedVideoDiT``: 3-axis
RoPE, no temporal patches), with the same flags, schedule, EMA and checkpoints; it is saved as a
``DiTFlowMatchVideoPipeline``.
"""

import argparse
import math
import os
import time

import torch
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from diffusability_hf import autoencoders as ae
from diffusability_hf import files, hub
from diffusability_hf.cpu import use_all_cpu_cores
from diffusability_hf.data.images import LabelledImages, collate_labelled
from diffusability_hf.data.latents import (
    LatentShards,
    check_latents_autoencoder,
    estimate_latent_statistics,
    normalization_tensors,
    on_the_fly_metadata,
    read_latents_metadata,
)
from diffusability_hf.errors import MissingPathError, UsageError, run_script
from diffusability_hf.flow import FlowMatchingLoss, warmup_cosine
from diffusability_hf.models.factory import build_transformer, transformer_config
from diffusability_hf.pipelines.training import class_sample_grid, make_pipeline, save_snapshot
from diffusability_hf.tracking import log_image_grid
from diffusability_hf.training import checkpoints, fsdp, launch, steps
from diffusability_hf.training.ema import EMA

logger = get_logger(__name__)

EMBEDDED_AE = ae.EMBEDDED_AE
MODEL_CARDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards")
# What a finished run leaves in --output_dir (a second run into it is refused without --overwrite_output_dir)
RESULTS = (
    "model_index.json", "pipeline.py", "transformer", "vae", "scheduler", "README.md", "samples.png", "metrics.json"
)  # fmt: skip
SNAPSHOTS = "snapshots"  # --pipeline_snapshot_steps: <output_dir>/snapshots/step-<N>, part of the run like checkpoints
# The argparse defaults are App. B's; the embedded CPU demo (no --pretrained_vae_model_name_or_path) runs this much
# shorter, under any flag given explicitly
EMBEDDED_DEMO = dict(max_train_steps=500, lr_warmup_steps=50, validation_steps=250, checkpointing_steps=500)


def parse_args(input_args=None):
    def demo(key):
        return f" (default: %(default)s; the embedded demo: {EMBEDDED_DEMO[key]})."

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Latents and the autoencoder
    parser.add_argument("--latents_dir", type=str, default=None, help="Output of extract_latents.py.")
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="Or an image folder with one subfolder per class, encoded on the fly by the frozen VAE.",
    )
    parser.add_argument("--dataset_name", type=str, default=None, help="Or an HF dataset (image + label columns).")
    parser.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image one).")
    parser.add_argument("--label_column", type=str, default="label", help="Class label column.")
    parser.add_argument("--resolution", type=int, default=256, help="Centre-crop side when encoding on the fly.")
    parser.add_argument("--random_flip", action="store_true", help="Mirror half the images (on-the-fly encoding).")
    parser.add_argument("--stats_batches", type=int, default=16, help="On the fly: batches for the latent mean/std.")
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="The autoencoder that encoded the latents (checked by weights fingerprint; it decodes the samples). "
        "Default: the toolkit's embedded AutoencoderKL, with the embedded demo's defaults below.",
    )
    parser.add_argument("--vae_subfolder", type=str, default=None, help="Subfolder of the VAE repo, e.g. 'vae'.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where models are cached.")
    # Model (App. B)
    parser.add_argument(
        "--model", type=str, default="DiT-S/2", help="DiT-{S,B,L,XL}/{1,2,4} (App. B sizes) or DiT-tiny/{1,2}."
    )
    parser.add_argument(
        "--model_config_name_or_path", type=str, default=None, help="A transformer config.json instead of --model."
    )
    parser.add_argument(
        "--stock_dit",
        action="store_true",
        help="Train diffusers' DiTTransformer2DModel (sin-cos positions, no self-conditioning) instead of the paper's "
        "App. B DiT (the toolkit's SelfConditionedDiT).",
    )
    parser.add_argument(
        "--pos_embed",
        type=str,
        default="rope",
        choices=["sincos", "rope", "rope+sincos"],
        help="Positions of the paper's DiT: 2D RoPE in attention (App. B; default), DiT's sin-cos table, or both "
        "(RoPE alone carries no absolute position: the public alphaflow DiT adds the table).",
    )
    parser.add_argument(
        "--class_embed_init_std",
        type=float,
        default=None,
        help="Std of the label table's normal init, for the paper's DiT and --stock_dit alike. Default: DiT's 0.02 "
        "(Peebles & Xie; App. B's 400k-step runs), or a config file's own value. In runs of a few hundred steps 0.02 "
        "leaves the model class-blind; 1.0 learns the class (docs/latent_dit.md, the DiT recipe section).",
    )
    parser.add_argument(
        "--self_conditioning_prob",
        type=float,
        default=0.9,
        help="Probability of the no-grad pass whose last-block activations condition the main one (App. B: 0.9, the "
        "default; 0: none). --stock_dit, or a config without self_conditioning: 0.",
    )
    # Flow matching
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default="logit_normal",
        choices=["logit_normal", "uniform"],
        help="How each sample's noise level sigma is drawn: logit-normal (the paper, after SD3; default) or uniform.",
    )
    parser.add_argument("--logit_mean", type=float, default=0.0, help="Logit-normal location (paper: 0).")
    parser.add_argument("--logit_std", type=float, default=1.0, help="Logit-normal scale (paper: 1).")
    parser.add_argument(
        "--class_dropout_prob", type=float, default=0.1, help="Labels replaced by the null class (CFG training)."
    )
    # Optimisation
    parser.add_argument(
        "--train_batch_size",
        type=int,
        default=32,
        help="Latents per process and micro-batch, as in diffusers' examples (default: %(default)s; App. B gives "
        "none).",
    )
    parser.add_argument(
        "--max_train_steps", type=int, default=400_000, help="Optimizer steps, App. B's 400k" + demo("max_train_steps")
    )
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per step.")
    parser.add_argument("--learning_rate", type=float, default=3e-4, help="Peak learning rate (App. B: 3e-4).")
    parser.add_argument("--lr_end", type=float, default=1e-5, help="Cosine decay target (App. B: 1e-5).")
    parser.add_argument(
        "--lr_warmup_steps", type=int, default=10_000, help="Linear warmup, App. B's 10k" + demo("lr_warmup_steps")
    )
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 (App. B: 0.9).")
    parser.add_argument("--adam_beta2", type=float, default=0.99, help="AdamW beta2 (App. B: 0.99).")
    parser.add_argument("--adam_weight_decay", type=float, default=0.01, help="AdamW weight decay (App. B: 0.01).")
    parser.add_argument("--max_grad_norm", type=float, default=16.0, help="Gradient clipping (App. B: 16).")
    parser.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=10,
        help="A step whose loss is not finite is skipped (no optimizer or EMA update) and counted; after this many "
        "in a row the run stops with a checkpoint and says what to try (0: never stop). Default %(default)s, our "
        "choice: a transient spike passes, a diverged run stops early.",
    )
    parser.add_argument(
        "--ema_halflife_steps", type=float, default=6931.0, help="EMA half-life (6931 = DiT's 0.9999/step)."
    )
    parser.add_argument("--ema_rampup_ratio", type=float, default=0.05, help="Half-life min(h, ratio * step).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    # Copied from train_scripts/train_ae_se.py
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the trained network in place (nn.Module.compile: checkpoints and saved weights keep "
        "their names); the objective around it stays eager. benchmarks/bench_compile.py measures the compile time "
        "and the step time against eager. Not with FSDP.",
    )
    parser.add_argument(
        "--compile_backend",
        type=str,
        default="inductor",
        help="torch.compile backend for --compile: inductor (builds C++ / Triton kernels: needs a C++ compiler on "
        "CPU), or e.g. aot_eager (no code generation) to check a run quickly.",
    )
    # End copy
    parser.add_argument("--seed", type=int, default=0, help="Seed for init, data order and noise.")
    # Sampling, checkpoints, logging, Hub
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Euler steps for validation samples.")
    parser.add_argument("--guidance_scale", type=float, default=1.5, help="CFG scale for validation samples.")
    parser.add_argument("--shift", type=float, default=1.0, help="Time shift (eq. 3) for validation samples.")
    parser.add_argument(
        "--validation_steps", type=int, default=5000, help="Sample a grid every N steps" + demo("validation_steps")
    )
    parser.add_argument(
        "--checkpointing_steps",
        type=int,
        default=10_000,
        help="Save the state every N steps" + demo("checkpointing_steps"),
    )
    parser.add_argument(
        "--pipeline_snapshot_steps",
        type=int,
        default=None,
        help="Also save the EMA pipeline every N steps (but the last) as --output_dir/snapshots/step-N, to measure "
        "FD versus training steps with eval_dit.py (each costs a pipeline save). Default: none.",
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=3,
        help="Keep this many newest complete checkpoints (default: %(default)s); 0 keeps them all.",
    )
    parser.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help="'latest' (the newest complete one) or a checkpoint."
    )
    parser.add_argument("--output_dir", type=str, default="dit-flow", help="Where everything is written.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Reuse an --output_dir that holds a finished pipeline or another run's checkpoints (deleted at the start).",
    )
    parser.add_argument("--report_to", type=str, default="tensorboard", help="'tensorboard', 'wandb' or 'none'.")
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder inside --output_dir.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline to the Hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id.")
    parser.add_argument(
        "--hub_token",
        type=str,
        default=None,
        help="Refused (it would show in process lists and logs): log in with `hf auth login` or set HF_TOKEN.",
    )
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument(
        "--license", type=str, default=None, help="The card's license (Hub id). Default: the autoencoder's card's."
    )
    args = parser.parse_args(input_args)
    hub.refuse_hub_token(parser, args)

    # Settings: an explicit flag, else the embedded demo's preset (without an autoencoder), else the argparse default
    if args.pretrained_vae_model_name_or_path is None:
        parser.set_defaults(pretrained_vae_model_name_or_path=EMBEDDED_AE, **EMBEDDED_DEMO)
        args = parser.parse_args(input_args)
    if sum(x is not None for x in (args.latents_dir, args.train_data_dir, args.dataset_name)) != 1:
        parser.error(
            "Give exactly one of --latents_dir (run train_scripts/extract_latents.py first), --train_data_dir or "
            "--dataset_name (encoded on the fly)."
        )
    if args.stock_dit:
        if args.self_conditioning_prob not in (0.0, 0.9):  # 0.9 is the default, 0 agrees with the stock model
            parser.error(
                "--stock_dit trains diffusers' DiTTransformer2DModel, which has no self-conditioning: drop "
                "--self_conditioning_prob, or drop --stock_dit to train the paper's DiT with it."
            )
        args.pos_embed, args.self_conditioning_prob = "sincos", 0.0
    if args.class_embed_init_std is not None and not args.class_embed_init_std > 0:
        parser.error(f"--class_embed_init_std must be positive, got {args.class_embed_init_std}.")
    if not 0 <= args.class_dropout_prob < 1 or not 0 <= args.self_conditioning_prob <= 1:
        parser.error("--class_dropout_prob must be in [0, 1) and --self_conditioning_prob in [0, 1].")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        parser.error(f"--learning_rate must be a positive number, got {args.learning_rate}.")
    if args.train_batch_size <= 0 or args.max_train_steps <= 0 or args.lr_warmup_steps < 0:
        parser.error("--train_batch_size and --max_train_steps must be positive, --lr_warmup_steps >= 0.")
    if args.checkpointing_steps <= 0 or args.validation_steps <= 0 or args.checkpoints_total_limit < 0:
        parser.error("--checkpointing_steps and --validation_steps must be positive, --checkpoints_total_limit >= 0.")
    if args.pipeline_snapshot_steps is not None and args.pipeline_snapshot_steps <= 0:
        parser.error("--pipeline_snapshot_steps must be positive (or left out: no snapshots).")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error(
            "--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would continue from: give "
            "one of them."
        )
    if args.report_to == "none":
        args.report_to = None
    return args


def check_dataset_size(count: int, args, num_processes: int) -> None:
    """Every process needs at least one full batch per epoch (batches are full: the last partial one is dropped)."""
    need = args.train_batch_size * num_processes
    if count < need:
        where = f"{args.latents_dir} holds {count} latents" if args.latents_dir else f"the data has {count} images"
        more = " (extract_latents.py --max_samples)" if args.latents_dir else ""
        processes = f" x {num_processes} processes" if num_processes > 1 else ""
        raise UsageError(
            f"{where}, fewer than one batch ({args.train_batch_size} per process{processes} = {need}): lower "
            f"--train_batch_size to at most {max(1, count // num_processes)}, or use more data{more}."
        )


def log_samples(accelerator, pipeline, args, step: int, num_classes: int):
    """The seeded class grid of ``pipeline`` (the validation settings) to the trackers; returns it (a PIL image)."""
    grid = class_sample_grid(
        pipeline, num_classes, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        shift=args.shift, seed=args.seed,
    )  # fmt: skip
    log_image_grid(accelerator.trackers, "validation/samples", grid, step)
    return grid


def write_card(folder, args, settings: dict, meta, transformer, global_step: int, seconds, loss: dict, global_batch):
    """The pipeline's README.md (model_cards/dit_pipeline.md), its license from the VAE's card unless --license;
    ``settings``: the flags as the run trained."""
    vae_source = args.pretrained_vae_model_name_or_path
    base_id = None if os.path.abspath(vae_source) == os.path.abspath(EMBEDDED_AE) else vae_source
    fields = hub.dit_pipeline_card_fields(
        meta, {**settings, "global_batch": global_batch}, transformer=transformer, steps=global_step, seconds=seconds,
        model=args.model if args.model_config_name_or_path is None else args.model_config_name_or_path,
        final_loss=loss.get("train/loss", float("nan")), global_batch=global_batch,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, shift=args.shift,
        base_id=base_id, license_fields=hub.card_license(args.license, base_id, args.cache_dir, args.push_to_hub),
    )  # fmt: skip
    card = hub.render_model_card("dit_pipeline", fields, template_dir=MODEL_CARDS)
    files.atomic_write_text(os.path.join(folder, "README.md"), card)


def main(args):
    launch.check_launcher(args.compile, args.mixed_precision)
    use_all_cpu_cores()
    # Validate cheap things: the output folder, the latents, the AE they came from, the model geometry
    found = files.check_output_dir(
        args.output_dir, RESULTS + (SNAPSHOTS,), args.overwrite_output_dir, args.resume_from_checkpoint
    )
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise MissingPathError(f"--train_data_dir {args.train_data_dir} is not a folder.")
    vae_name = args.pretrained_vae_model_name_or_path
    vae_config = ae.pretrained_config(vae_name, args.vae_subfolder, None, args.cache_dir)
    if args.latents_dir:
        meta, images = read_latents_metadata(args.latents_dir), None
        check_latents_autoencoder(meta, args.latents_dir, vae_name, vae_config=vae_config)
    else:  # images encoded during training
        images = LabelledImages(
            args.resolution, args.dataset_name, args.train_data_dir, args.image_column, args.label_column,
            cache_dir=args.cache_dir, random_flip=args.random_flip, seed=args.seed,
        )  # fmt: skip
        meta = on_the_fly_metadata(
            vae_name, vae_config, args.resolution, images.names, args.dataset_name or args.train_data_dir
        )
    if meta.get("video") and args.stock_dit:  # (C, T', h, w) latents train the video DiT (App. B, Sec. 4)
        raise UsageError(
            f"{args.latents_dir} holds video latents, and --stock_dit trains diffusers' image DiT: drop --stock_dit "
            "to train the paper's video DiT (SelfConditionedVideoDiT) on them."
        )
    model_config = transformer_config(
        meta["latent_shape"], meta["num_classes"], args.model, args.model_config_name_or_path, args.latents_dir
    )

    accelerator = launch.make_accelerator(args)
    logger.info(accelerator.state, main_process_only=False)
    check_dataset_size(meta["num_samples"] if images is None else len(images), args, accelerator.num_processes)
    resume_path = checkpoints.resolve_resume(args.output_dir, args.resume_from_checkpoint, logger.warning, found)

    # The autoencoder, named by its weights: it must be the one that encoded the latents (it decodes the samples)
    vae = ae.model_class(vae_config).from_pretrained(
        args.pretrained_vae_model_name_or_path, subfolder=args.vae_subfolder, cache_dir=args.cache_dir
    )
    meta["vae_weights_fingerprint"] = ae.weights_fingerprint(vae)
    if args.latents_dir:
        check_latents_autoencoder(meta, args.latents_dir, vae_name, vae_fingerprint=meta["vae_weights_fingerprint"])
    else:  # encoded on the fly by this very autoencoder
        meta["ae_weights_fingerprint"] = meta["vae_weights_fingerprint"]
    vae = ae.prepare_for_training(vae).to(accelerator.device).eval().requires_grad_(False)

    repo_id = None
    if accelerator.is_main_process:
        files.lock_output_dir(args.output_dir)  # one run at a time in a folder: a second one is refused here
        if args.overwrite_output_dir:  # so that `latest` can never resume the old run
            for name in checkpoints.remove_checkpoints(args.output_dir, also=[SNAPSHOTS]):
                logger.info(f"Removed {name} of the earlier run (--overwrite_output_dir)")
        for name in checkpoints.remove_interrupted_saves(args.output_dir, subfolders=[SNAPSHOTS]):
            logger.info(f"Removed {name}, left by a save that was interrupted")
        repo_id = hub.hub_repo(args)

    # Data: posterior mean/std per image; a fresh sample each step, normalised per channel (extraction statistics)
    if images is None:
        dataset, collate = LatentShards(args.latents_dir, meta, args.seed), None
    else:
        dataset, collate = images, collate_labelled
        num_images = min(len(dataset), args.stats_batches * args.train_batch_size)
        meta["latents_mean"], meta["latents_std"] = estimate_latent_statistics(
            vae, dataset, num_images, args.train_batch_size, args.seed, accelerator.device, collate
        )
        logger.info(f"Latent statistics (of posterior samples) estimated on {num_images} images")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, drop_last=True, collate_fn=collate
    )
    lat_mean, lat_std = normalization_tensors(meta, accelerator.device)  # (1, C, 1, 1): broadcast over the batch

    # Model: the initial weights are --seed's (torch's own start seed differs from run to run)
    set_seed(args.seed)
    transformer = build_transformer(
        model_config, from_config=args.model_config_name_or_path is not None, stock_dit=args.stock_dit,
        pos_embed=args.pos_embed, self_conditioning=args.self_conditioning_prob > 0,
        class_embed_init_std=args.class_embed_init_std,
    )  # fmt: skip
    # The settings this run trains with (`args` stays as parsed): a config without self-conditioning decides
    settings = dict(vars(args))
    if args.self_conditioning_prob > 0 and not getattr(transformer.config, "self_conditioning", False):
        logger.info(f"{args.model_config_name_or_path} has no self-conditioning: training without it")
        settings["self_conditioning_prob"] = 0.0  # recorded as trained
    num_classes = meta["num_classes"]
    n_params = sum(p.numel() for p in transformer.parameters())
    logger.info(f"{type(transformer).__name__} ({args.model}): {n_params / 1e6:.1f}M parameters")
    objective = FlowMatchingLoss(
        transformer,
        num_classes,
        weighting_scheme=args.weighting_scheme,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        class_dropout_prob=args.class_dropout_prob,
        self_conditioning_prob=settings["self_conditioning_prob"],
    )

    # Optimizer (App. B): AdamW, warmup then cosine decay to --lr_end, an EMA of the weights
    params = list(transformer.parameters())
    sharded = fsdp.fsdp_active(accelerator)  # FSDP2: the main process keeps an unsharded copy to validate and save
    plain = fsdp.plain_copy(transformer, accelerator)
    optimizer = torch.optim.AdamW(
        params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay
    )
    n = accelerator.num_processes  # the prepared scheduler steps once per process per optimizer step
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(
            step, args.lr_warmup_steps * n, args.max_train_steps * n, args.learning_rate, args.lr_end
        ),
    )
    blocks = fsdp.shard_blocks(accelerator, objective)  # FSDP: each DiT block its own shard group
    if blocks:
        logger.info(f"FSDP2: {accelerator.num_processes} processes; each {', '.join(blocks)} sharded on its own")
    model, optimizer, loader, lr_scheduler = accelerator.prepare(objective, optimizer, loader, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model).transformer
    if args.compile:  # in place: copies for validation and snapshots (deepcopy) are eager
        unwrapped.compile(backend=args.compile_backend)
    # The EMA of the prepared parameters: whole tensors, or under FSDP this process's shards (saved per process)
    ema = None
    if args.ema_halflife_steps > 0:
        ema = EMA(unwrapped.parameters(), args.ema_halflife_steps, args.ema_rampup_ratio or None)

    def checkpoint(step):
        checkpoints.save_checkpoint(
            accelerator, args.output_dir, step, args.checkpoints_total_limit or None,
            extra=lambda folder: fsdp.save_ema_state(ema, folder, accelerator),
        )  # fmt: skip

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_dit_flow", config=launch.tracker_config(settings))
    per_process = {"latents": args.train_batch_size}
    global_batch = launch.describe_global_batch(per_process, n, args.gradient_accumulation_steps)["description"]
    logger.info(f"***** Flow matching: {args.max_train_steps} steps, global batch {global_batch} *****")
    global_step, first_epoch, skip = checkpoints.resume_position(
        accelerator, resume_path, steps_per_epoch, args.gradient_accumulation_steps
    )
    if resume_path is not None:
        fsdp.load_ema_state(ema, resume_path, accelerator)
        steps.use_learning_rate(lr_scheduler, args.learning_rate, logger.info)  # the flags win over the checkpoint

    # Training loop
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process
    )
    t_start, micro, last = time.time(), 0, {}
    meter = steps.StepMeter(args.train_batch_size * n * args.gradient_accumulation_steps, accelerator.device)
    guard = steps.NonFiniteGuard(args.max_nonfinite_steps)
    trainable = list(unwrapped.parameters())
    if global_step >= args.max_train_steps:  # resumed from the last step's checkpoint: only the final save is left
        logger.info(f"{resume_path} is at step {global_step} of {args.max_train_steps}: nothing left to train")
    stop = launch.GracefulStop()  # SIGTERM and Ctrl-C stop after the current step, with a checkpoint
    for epoch in range(first_epoch, num_epochs):
        if global_step >= args.max_train_steps:
            break
        dataset.epoch = epoch
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if epoch == first_epoch and skip else loader
        for batch in meter.batches(batches):
            gen = steps.step_generator(accelerator.device, args.seed, global_step, accelerator.process_index, micro)
            micro += 1
            if "pixels" in batch:  # on-the-fly: the frozen AE's posterior of this batch
                with torch.no_grad():
                    post = ae.encode(vae, batch["pixels"])
                batch["mean"] = post.mean.float()
                batch["std"] = post.std.float() if post.std is not None else torch.zeros_like(batch["mean"])
            eps = torch.randn(batch["mean"].shape, generator=gen, device=accelerator.device)
            x0 = (batch["mean"] + batch["std"] * eps - lat_mean) / lat_std  # (B, C, h, w) posterior sample, normalised
            with accelerator.accumulate(model):
                loss = model(x0, batch["label"], gen).mean()
                grad_norm = steps.optimizer_step(
                    loss, accelerator, model, optimizer, lr_scheduler, args.max_grad_norm, guard, trainable, ema
                )
            if not accelerator.sync_gradients:
                continue
            global_step, micro = global_step + 1, 0
            progress_bar.update(1)
            perf = meter.step()
            try:
                skipped = guard.step_done(global_step)
            except steps.NonFiniteLossError:
                guard.restore()  # the weights of the last finite loss, not the diverged ones
                checkpoint(global_step)
                raise
            if ema is not None and not skipped:
                ema.update(trainable, global_step)
            last = {
                "train/loss": accelerator.reduce(loss.detach(), "mean").item(),
                "train/lr": lr_scheduler.get_last_lr()[0],
                "train/nonfinite_steps": guard.skipped,
                **perf,
            }
            if grad_norm is not None:
                last["train/grad_norm"] = float(grad_norm)
            accelerator.log(last, step=global_step)
            progress_bar.set_postfix(
                loss=f"{last['train/loss']:.4f}", samples_s=f"{perf['train/samples_per_second']:.1f}",
                data=f"{perf['train/data_wait_s']:.2f}s",
            )  # fmt: skip
            if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                checkpoint(global_step)
            snapshot = (
                args.pipeline_snapshot_steps is not None
                and global_step % args.pipeline_snapshot_steps == 0
                and global_step < args.max_train_steps  # the last step's weights are the main save
            )
            validate = global_step % args.validation_steps == 0
            if (snapshot or validate) and sharded:  # every process gathers the full EMA weights into `plain`
                fsdp.gather_into(plain, unwrapped, ema)
            if (snapshot or validate) and accelerator.is_main_process:
                pipeline = make_pipeline(  # an EMA copy (under FSDP: the gathered one)
                    plain if sharded else unwrapped, vae, meta, ema=None if sharded else ema, shift=args.shift,
                    latents_dir=args.latents_dir, step=global_step, copy=not sharded,
                )  # fmt: skip
                if snapshot:
                    path = save_snapshot(pipeline, os.path.join(args.output_dir, SNAPSHOTS), global_step)
                    logger.info(f"Saved the EMA pipeline at step {global_step} to {path}")
                if validate:
                    log_samples(accelerator, pipeline, args, global_step, num_classes)
                del pipeline
            if global_step >= args.max_train_steps:
                break
            if stop.requested(
                accelerator
            ):  # SIGTERM or Ctrl-C: a checkpoint of this step (unless just saved), one line
                if global_step % args.checkpointing_steps:
                    checkpoint(global_step)
                raise stop.stopped(global_step, os.path.join(args.output_dir, f"checkpoint-{global_step}"))
            meter.restart()  # logging, checkpoints, snapshots and validation are not training time
        if global_step >= args.max_train_steps:
            break
    stop.close()

    # Save the EMA transformer as a DiTFlowMatchPipeline: pipeline, remote-code files, samples and card are written
    # into a temporary folder and moved in together (model_index.json last), so a killed save never leaves a half
    # pipeline where a loadable one was
    accelerator.wait_for_everyone()
    # Copied from train_scripts/train_ae_se.py
    peak = steps.peak_memory_gb(accelerator.device)
    logger.info(f"Peak memory: {peak:.2f} GiB ({'CUDA allocated' if accelerator.device.type == 'cuda' else 'RSS'})")
    # End copy
    if global_step % args.checkpointing_steps == 0:
        checkpoint(global_step)
    if sharded:  # the final weights, gathered by every process into the main process's unsharded copy
        unwrapped, ema = fsdp.gather_into(plain, unwrapped, ema), None
    if accelerator.is_main_process:
        seconds = time.time() - t_start
        pipeline = make_pipeline(
            unwrapped, vae, meta, ema=ema, shift=args.shift, latents_dir=args.latents_dir, step=global_step, copy=False
        )
        grid = log_samples(accelerator, pipeline, args, global_step, num_classes)
        with files.atomic_save(args.output_dir) as tmp:
            pipeline.save_pretrained(tmp)
            grid.save(os.path.join(tmp, "samples.png"))
            write_card(tmp, args, settings, meta, unwrapped, global_step, seconds, last, global_batch)
            run = {
                "train_steps": global_step,
                "train_seconds": round(seconds, 1),
                "final_loss": last.get("train/loss"),
                "global_batch": global_batch,
                "peak_memory_gb": round(peak, 3),
                "throughput": meter.summary(),  # this launch's steps (a resumed run: the steps after the resume)
                "nonfinite_steps": guard.skipped,
            }
            files.atomic_write_json(os.path.join(tmp, "metrics.json"), run)
        if repo_id is not None:
            logger.info(f"Uploaded to {hub.push_folder(repo_id, args.output_dir, None, 'DiT flow pipeline')}")
        saved = [os.path.basename(p) for p in checkpoints.list_checkpoints(args.output_dir)]
        files.report_written(args.output_dir, [*RESULTS, *saved[-1:], SNAPSHOTS, args.logging_dir], log=logger.info)
    accelerator.wait_for_everyone()  # no process tears down the process group while another still works
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main, parse_args)
