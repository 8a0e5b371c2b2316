#!/usr/bin/env python
"""Fine-tune a diffusers autoencoder with scale-equivariance (SE) regularization.

Paper: "Improving the Diffusability of Autoencoders" (Skorokhodov et al., 2025), eq. 2:

    L(x) = d(x, Dec(z)) + alpha * d(down(x), Dec(down(z))) [+ beta * KL],   d = MSE + LPIPS,  alpha = 0.25

with ``down`` a x2 or x4 bilinear downsampling drawn once per step (``diffusability_hf.losses.SEAutoencoderLoss``).
``--se_weight 0`` is the paper's "+FT" baseline (the same fine-tuning without the regulariser). Run with no
arguments to fine-tune the toolkit's own small pretrained AutoencoderKL on crops of the photographs that ship inside
scikit-image, offline, on a CPU:

    accelerate launch train_scripts/train_ae_se.py --output_dir ae-se

The result in ``--output_dir`` is a plain diffusers autoencoder (``AutoencoderKL.from_pretrained(output_dir)``),
plus ``README.md`` (model card), ``spectrum.png`` and ``metrics.json``.
"""

import argparse
import contextlib
import math
import os
import random
import time

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from diffusability_hf import autoencoders as ae
from diffusability_hf import files, hub
from diffusability_hf.cpu import use_all_cpu_cores
from diffusability_hf.data.images import SkipLog
from diffusability_hf.data.training import DataSource, TrainingData, check_streamed
from diffusability_hf.errors import run_script
from diffusability_hf.figures import plot_fine_tuning_spectra, save_png
from diffusability_hf.latent_normalization import (
    current_latent_normalization,
    reestimate_latent_normalization,
    training_latents,
)
from diffusability_hf.losses import DOWNSAMPLE_MODES, ReconstructionDistance, SEAutoencoderLoss
from diffusability_hf.metrics.reconstruction import (
    before_after_record,
    cross_decoding,
    reconstruction_metrics,
    rgb_spectrum,
)
from diffusability_hf.spectral import SOFT_PENALTY_NORMALIZATIONS
from diffusability_hf.tracking import log_clips, log_images, log_reconstruction_metrics
from diffusability_hf.training import checkpoints, fsdp, launch, steps
from diffusability_hf.training.ema import EMA
from diffusability_hf.training.lora import add_lora, lora_adapter, lora_target_names, merge_lora, save_lora_adapter
from diffusability_hf.training.presets import SE_PRESETS, se_preset_settings, settings_epilog

logger = get_logger(__name__)

MODEL_CARDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards")
RESULT_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "metrics.json", "lora")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=settings_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Model
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Hub id or local folder of a diffusers autoencoder (e.g. black-forest-labs/FLUX.1-dev with "
        "--subfolder vae). Default: the toolkit's embedded pretrained AutoencoderKL.",
    )
    parser.add_argument("--subfolder", type=str, default=None, help="Subfolder of the model repo, e.g. 'vae'.")
    parser.add_argument("--revision", type=str, default=None, help="Model revision (branch, tag or commit).")
    parser.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. 'fp16'.")
    parser.add_argument(
        "--model_config_name_or_path",
        type=str,
        default=None,
        help="A diffusers config.json (file or folder): train from random init (paper App. C.5). The class comes from "
        "its '_class_name'.",
    )
    parser.add_argument(
        "--preset",
        type=str,
        default=None,
        choices=sorted(SE_PRESETS),
        help="Table 5's per-AE settings (listed below); flags given explicitly win. Its batch sizes are the paper's "
        "global ones (e.g. 32 images per step in total), split over the processes and accumulation steps; a launch "
        "that does not divide them is refused.",
    )
    # Data
    parser.add_argument("--dataset_name", type=str, default=None, help="HF datasets name (or local dataset script).")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="HF dataset config.")
    parser.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image one).")
    parser.add_argument(
        "--train_data_dir",
        type=str,
        default=None,
        help="A folder of images (HF 'imagefolder'), or of webdataset tar shards (*.tar, sorted by name; also a URL "
        "such as hf://datasets/org/name/train), which are streamed.",
    )
    # Streaming (web-scale data: diffusability_hf.data.streaming)
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="Stream --dataset_name / --video_dataset_name (Hub or a packaged builder such as 'parquet' with "
        "--train_data_files) or an image folder --train_data_dir with load_dataset(..., streaming=True) instead of "
        "loading them whole. Tar shards always stream. A stream has no length: training runs --max_train_steps.",
    )
    parser.add_argument(
        "--train_data_files",
        type=str,
        nargs="+",
        default=None,
        help="Webdataset tar shards of images, streamed: one or more paths or URLs with brace expansion and globs, "
        "e.g. 'shards/{000000..000127}.tar' (quote it). With --streaming and --dataset_name, that builder's data "
        "files (e.g. --dataset_name parquet --train_data_files 'data/*.parquet').",
    )
    parser.add_argument(
        "--shuffle_buffer_size",
        type=int,
        default=1000,
        help="Streams: samples in each process's shuffle buffer (webdataset's shuffle; 0 reads in shard order). "
        "Shard order is shuffled per epoch too. Default %(default)s.",
    )
    parser.add_argument(
        "--decode_threads",
        type=int,
        default=0,
        help="Streams: threads decoding images and videos ahead of the training step (a stream is read in the "
        "training process, not in DataLoader workers, so that its position can be checkpointed). Default: none.",
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where datasets and models are cached.")
    parser.add_argument("--resolution", type=int, default=256, help="Square training crop side (%(default)s).")
    parser.add_argument("--center_crop", action="store_true", help="Center crops instead of random crops.")
    parser.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    # Video data (video AEs train on joint image + video batches, paper Table 5)
    parser.add_argument(
        "--video_data_dir",
        type=str,
        default=None,
        help="A folder of videos (mp4/webm/mkv/mov/avi/gif) and/or of frame folders (one subfolder of images per "
        "clip), or of webdataset tar shards of videos (streamed). Default for video AEs: camera-pan clips over the "
        "embedded photographs and scikit-image's GIF.",
    )
    parser.add_argument(
        "--video_data_files",
        type=str,
        nargs="+",
        default=None,
        help="Webdataset tar shards of videos, streamed, as --train_data_files (e.g. 'clips/{0000..0063}.tar').",
    )
    parser.add_argument("--video_dataset_name", type=str, default=None, help="HF dataset with a Video column.")
    parser.add_argument("--video_dataset_config_name", type=str, default=None, help="Its config.")
    parser.add_argument("--video_column", type=str, default=None, help="Video column (default: the first Video one).")
    parser.add_argument(
        "--num_frames",
        type=int,
        default=17,
        help="Frames per clip (paper: %(default)s; must fit the AE, e.g. 1 + 8k).",
    )
    parser.add_argument("--frame_stride", type=int, default=1, help="Take every N-th frame of a video.")
    # Loss (paper eq. 2 and Appendix C)
    parser.add_argument("--mse_weight", type=float, default=1.0, help="MSE weight in d (Table 5; %(default)s).")
    parser.add_argument("--lpips_weight", type=float, default=1.0, help="LPIPS weight in d (Table 5: %(default)s).")
    parser.add_argument(
        "--lpips_net", type=str, default="alex", choices=["alex", "vgg", "squeeze"], help="LPIPS trunk."
    )
    parser.add_argument(
        "--lpips_trunk_path",
        type=str,
        default=None,
        help="Local torchvision state dict of the LPIPS trunk (else torch's hub cache).",
    )
    parser.add_argument("--se_weight", type=float, default=0.25, help="alpha of eq. 2 (paper: 0.25; 0 = '+FT').")
    parser.add_argument(
        "--se_scale_factors",
        type=int,
        nargs="+",
        default=[2, 4],
        help="Downsampling factors for SE, one drawn per step (paper: 2 and 4).",
    )
    parser.add_argument(
        "--se_downsample_mode",
        type=str,
        default="bilinear",
        choices=DOWNSAMPLE_MODES,
        help="How x and z are downsampled for SE (paper: 'bilinear'; see losses.downsample): 'bilinear' "
        "(align_corners=False, no antialiasing), 'bilinear_align_corners' (the authors' code's 'bil'), "
        "'bilinear_antialias', or 'area' (box averaging, the authors' code's 'mean'). Default: %(default)s.",
    )
    parser.add_argument(
        "--kl_weight",
        type=float,
        default=0.0,
        help="KL beta, per-element mean (default: %(default)s; without SE, the preset's value).",
    )
    parser.add_argument(
        "--chf_weight",
        type=float,
        default=0.0,
        help="Weight of the CHF term (App. C.1, eq. 4-5): latents cut in --dct_block_size blocks, images in blocks "
        "of that times the spatial compression (64 for an 8x AE), as the authors' code, so both lose the same "
        "frequencies.",
    )
    parser.add_argument(
        "--chf_max_ratio",
        type=float,
        default=0.9,
        help="CHF zeroes a share of the zigzag coefficients drawn once per step, uniformly in [0, this), shared by "
        "the batch and seeded by --seed and the step (the authors' code: rand() * max per call; Table 6 uses "
        "0.1-0.9). Default: %(default)s.",
    )
    parser.add_argument(
        "--soft_penalty_weight",
        type=float,
        default=0.0,
        help="gamma of the soft high-frequency penalty (App. C.2, eq. 6-7; the paper's Table 7 tries 0.001-0.1, "
        "'e.g. 0.01'). Its scale depends on --soft_penalty_normalization.",
    )
    parser.add_argument(
        "--soft_penalty_normalization",
        type=str,
        default="authors",
        choices=SOFT_PENALTY_NORMALIZATIONS,
        help="'authors' (default): the authors' code, mean over coefficients of |D_uv| ((u+v)/(B-1))^p / 4, the "
        "normalisation the paper's gamma values were found with; 'paper': eq. 6-7 as printed, per-block sum of "
        "|D_uv| (u+v)^p / B^p (196x stronger at B = 8, p = 2).",
    )
    parser.add_argument("--soft_penalty_p", type=float, default=2.0, help="Exponent p of eq. 6 (authors' code: 2).")
    parser.add_argument(
        "--se_temporal_scale_factors",
        type=int,
        nargs="+",
        default=None,
        help="Video AEs only: also downsample clips and latents in time by a factor drawn per step (frame 0 kept, "
        "the rest averaged in groups, as the authors' code). Off by default: the paper found it did not help.",
    )
    parser.add_argument(
        "--decode_timestep",
        type=float,
        default=0.05,
        help="Timestep-conditioned LTX decoders (0.9.1+): the decode timestep (diffusers recommends 0.05).",
    )
    parser.add_argument(
        "--decode_noise_scale",
        type=float,
        default=0.025,
        help="Timestep-conditioned LTX decoders: noise mixed into the latent before decoding (recommended 0.025).",
    )
    parser.add_argument("--dct_block_size", type=int, default=8, help="DCT block size for spectra, CHF and penalty.")
    parser.add_argument(
        "--latent_sampling",
        type=str,
        default="sample",
        choices=["sample", "mode"],
        help="z for both terms: a posterior sample (default, as the authors' code) or the mean.",
    )
    # What trains
    parser.add_argument(
        "--num_frozen_up_blocks",
        type=int,
        default=0,
        help="Decoder up-blocks nearest the output to freeze (Table 5: flux 1, cosmos 3, video 0; default %(default)s).",
    )
    parser.add_argument(
        "--train_output_layers",
        action="store_true",
        help="Also train the decoder's last norm and output conv (frozen by default, App. B).",
    )
    parser.add_argument("--freeze_encoder", action="store_true", help="Freeze the encoder (decoder-only fine-tuning).")
    parser.add_argument("--use_lora", action="store_true", help="Train LoRA adapters instead of the full weights.")
    parser.add_argument("--lora_rank", type=int, default=16, help="LoRA rank.")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    parser.add_argument(
        "--lora_target_modules",
        type=str,
        nargs="*",
        default=None,
        help="Layer-name suffixes to adapt (e.g. conv1 conv2); default: every trainable conv/linear.",
    )
    # Optimisation (Appendix B)
    parser.add_argument(
        "--train_batch_size",
        "--image_batch_size",
        type=int,
        default=8,
        help="Images per process and micro-batch, as in diffusers' examples (global batch = this x processes x "
        "accumulation steps; default %(default)s). From --preset: Table 5's global 32 (image AEs) or 64 (video AEs) "
        "split over the processes.",
    )
    parser.add_argument(
        "--video_batch_size",
        type=int,
        default=None,
        help="Clips per process and micro-batch for video AEs, trained jointly with the images (default: half the "
        "image batch, Table 5's ratio). From --preset: Table 5's global 32 split over the processes.",
    )
    parser.add_argument("--max_train_steps", type=int, default=10_000, help="Optimizer steps (%(default)s).")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per step.")
    parser.add_argument("--learning_rate", type=float, default=1e-5, help="Peak learning rate (%(default)s).")
    parser.add_argument("--scale_lr", action="store_true", help="Multiply the lr by batch x accumulation x processes.")
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
        help="Learning-rate schedule (diffusers' get_scheduler).",
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="Warmup steps.")
    parser.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 (paper: 0.9).")
    parser.add_argument("--adam_beta2", type=float, default=0.99, help="AdamW beta2 (paper: 0.99).")
    parser.add_argument("--adam_weight_decay", type=float, default=0.01, help="AdamW weight decay (paper: 0.01).")
    parser.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    parser.add_argument("--max_grad_norm", type=float, default=50.0, help="Gradient clipping norm (%(default)s).")
    # Copied from train_scripts/train_dit_flow.py
    parser.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=10,
        help="A step whose loss is not finite is skipped (no optimizer or EMA update) and counted; after this many "
        "in a row the run stops with a checkpoint and says what to try (0: never stop). Default %(default)s, our "
        "choice: a transient spike passes, a diverged run stops early.",
    )
    # End copy
    parser.add_argument(
        "--ema_halflife_steps",
        type=float,
        default=5000.0,
        help="EMA half-life in steps (paper: 5000, for 10-20K-step runs); 0 disables the EMA.",
    )
    parser.add_argument(
        "--ema_rampup_ratio",
        type=float,
        default=0.05,
        help="Effective half-life min(half-life, ratio * step), as the authors' code, so short runs get an EMA that "
        "fits their length; 0 disables the ramp.",
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Autocast over fp32 weights (paper: bf16). Default: accelerate's config.",
    )
    parser.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")
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
    parser.add_argument("--seed", type=int, default=0, help="Seed for init, data order, noise and scale draws.")
    # Checkpoints, validation, logging, Hub
    parser.add_argument("--output_dir", type=str, default="ae-se-output", help="Where everything is written.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Reuse an --output_dir that holds another run's model or checkpoints (its checkpoints are deleted at "
        "the start, its model replaced at the end). Without it such a folder is refused.",
    )
    parser.add_argument(
        "--checkpointing_steps", type=int, default=1000, help="Save the training state every N steps (%(default)s)."
    )
    parser.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=3,
        help="Keep this many newest complete checkpoints (default: %(default)s; 0 keeps them all); older ones are "
        "deleted once a new one is complete.",
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' (the newest complete checkpoint in --output_dir) or a checkpoint folder: restores model, EMA, "
        "optimizer, scheduler, RNG, step.",
    )
    parser.add_argument("--validation_steps", type=int, default=500, help="Validate every N steps (%(default)s).")
    parser.add_argument(
        "--num_validation_images",
        type=int,
        default=8,
        help="Validation images: crops of photographs never trained on (embedded data), or images held out of "
        "--train_data_dir / --dataset_name at random (seeded) and removed from training.",
    )
    parser.add_argument(
        "--num_validation_videos", type=int, default=4, help="Validation clips (video AEs), held out the same way."
    )
    parser.add_argument(
        "--latent_stats_num_samples",
        type=int,
        default=256,
        help="Training images (clips for video AEs) whose posterior samples re-estimate the saved AE's latent "
        "normalisation (scaling_factor / shift_factor or latents_mean / latents_std) in its class's convention.",
    )
    parser.add_argument(
        "--keep_base_latent_scaling",
        action="store_true",
        help="Save the base's latent normalisation unchanged instead of re-estimating it (both are recorded).",
    )
    # The tracker and Hub flags of train_dit_flow.py, with this script's help texts
    parser.add_argument(
        "--report_to", type=str, default="tensorboard", help="'tensorboard', 'wandb', 'all' or 'none'."
    )
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder inside --output_dir.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id (default: output folder name).")
    parser.add_argument(
        "--hub_token",
        type=str,
        default=None,
        help="Refused: a token on the command line shows in process lists, shell history and the launcher's error "
        "messages. Log in with `hf auth login` or set HF_TOKEN instead.",
    )
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument(
        "--license",
        type=str,
        default=None,
        help="License of the model card (a Hub license id, e.g. 'apache-2.0'). Default: the base model's, read from "
        "its model card.",
    )
    args = parser.parse_args(input_args)
    hub.refuse_hub_token(parser, args)
    given = launch.given_flags(parser, input_args, args)
    if args.pretrained_model_name_or_path is not None and args.model_config_name_or_path is not None:
        parser.error("Give either --pretrained_model_name_or_path or --model_config_name_or_path, not both.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error("Give either --dataset_name or --train_data_dir, not both.")
    if args.video_data_dir is not None and args.video_dataset_name is not None:
        parser.error("Give either --video_data_dir or --video_dataset_name, not both.")
    args.embedded_model = args.pretrained_model_name_or_path is None and args.model_config_name_or_path is None
    args.embedded_data = args.dataset_name is None and args.train_data_dir is None and args.train_data_files is None
    args.embedded_video = (
        args.video_data_dir is None and args.video_dataset_name is None and args.video_data_files is None
    )
    if args.embedded_model:
        args.pretrained_model_name_or_path = ae.EMBEDDED_AE
    args.vae_config = read_vae_config(args)  # the one read of the model's config: main() uses it too
    video_ae = ae.get_row(args.vae_config).video
    vars(args).update(
        se_preset_settings(
            args.preset, args.se_weight, given, args.embedded_model, args.embedded_data, args.embedded_video, video_ae
        )
    )
    check_settings(parser, args)
    if args.report_to == "none":
        args.report_to = None
    return args


def check_settings(parser, args) -> None:
    """Refuse settings that cannot work together (argparse's ``error``: usage, then one line)."""
    if args.num_frames < 1 or args.frame_stride < 1:
        parser.error("--num_frames and --frame_stride must be positive.")
    if args.video_batch_size is not None and args.video_batch_size < 0:
        parser.error("--video_batch_size must be >= 0.")
    if args.se_temporal_scale_factors is not None and any(f < 1 for f in args.se_temporal_scale_factors):
        parser.error(f"--se_temporal_scale_factors must be integers >= 1, got {args.se_temporal_scale_factors}.")
    if not 0 <= args.decode_noise_scale <= 1:
        parser.error("--decode_noise_scale must be in [0, 1].")
    weights = {"se_weight": args.se_weight, "kl_weight": args.kl_weight, "chf_weight": args.chf_weight,
               "soft_penalty_weight": args.soft_penalty_weight, "mse_weight": args.mse_weight,
               "lpips_weight": args.lpips_weight}  # fmt: skip
    bad = [f"--{k} {v}" for k, v in weights.items() if not (math.isfinite(v) and v >= 0)]
    if bad:
        parser.error(f"Loss weights must be finite and non-negative, got {', '.join(bad)}.")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        parser.error(f"--learning_rate must be a positive number, got {args.learning_rate}.")
    if args.checkpointing_steps <= 0:
        parser.error(f"--checkpointing_steps must be positive, got {args.checkpointing_steps}.")
    if args.mse_weight <= 0 and args.lpips_weight <= 0:
        parser.error("--mse_weight and --lpips_weight are both 0: the reconstruction distance d is empty.")
    if any(f < 2 for f in args.se_scale_factors):
        parser.error(f"--se_scale_factors must be integers >= 2, got {args.se_scale_factors}.")
    if not 0 < args.chf_max_ratio <= 1:
        parser.error("--chf_max_ratio must be in (0, 1].")
    if args.resolution <= 0 or args.train_batch_size < 0 or args.max_train_steps <= 0:
        parser.error("--resolution and --max_train_steps must be positive, --train_batch_size at least 0.")
    if args.checkpoints_total_limit < 0:
        parser.error("--checkpoints_total_limit must be >= 0 (0 keeps every checkpoint).")
    if args.latent_stats_num_samples < 1 or args.num_validation_images < 1 or args.num_validation_videos < 1:
        parser.error("--latent_stats_num_samples, --num_validation_images and --num_validation_videos must be >= 1.")
    # Streams
    if args.train_data_files is not None and args.train_data_dir is not None:
        parser.error("Give either --train_data_dir or --train_data_files, not both.")
    if args.train_data_files is not None and args.dataset_name is not None and not args.streaming:
        parser.error(
            "--train_data_files with --dataset_name names that builder's data files, which are streamed: add "
            "--streaming (or drop --dataset_name to read --train_data_files as webdataset tar shards)."
        )
    if args.video_data_files is not None and (args.video_data_dir is not None or args.video_dataset_name is not None):
        parser.error("Give one of --video_data_dir, --video_dataset_name and --video_data_files, not several.")
    if args.streaming and args.embedded_data and args.embedded_video:
        parser.error(
            "--streaming needs data to stream: --dataset_name, --train_data_dir or --train_data_files (video AEs: "
            "--video_dataset_name, --video_data_dir or --video_data_files); the embedded photographs are not a stream."
        )
    if args.shuffle_buffer_size < 0 or args.decode_threads < 0:
        parser.error("--shuffle_buffer_size and --decode_threads must be >= 0.")
    if args.dataloader_num_workers and any(source.streamed for source in data_sources(args).values()):
        parser.error(
            f"A stream is read in the training process, where its position is checkpointed: drop "
            f"--dataloader_num_workers {args.dataloader_num_workers} and decode in parallel with --decode_threads."
        )


def data_sources(args) -> dict:
    """The training images and clips as the flags give them (:class:`DataSource`)."""
    return {
        "image": DataSource(args.dataset_name, args.train_data_dir, args.train_data_files, args.image_column,
                            args.dataset_config_name, args.streaming),
        "video": DataSource(args.video_dataset_name, args.video_data_dir, args.video_data_files, args.video_column,
                            args.video_dataset_config_name, args.streaming),
    }  # fmt: skip


def read_vae_config(args) -> dict:
    """The autoencoder's ``config.json`` (cheap; validates the class). Errors say what to fetch."""
    if args.model_config_name_or_path is not None:
        if not os.path.exists(args.model_config_name_or_path):
            raise FileNotFoundError(f"--model_config_name_or_path {args.model_config_name_or_path} does not exist.")
        config = ae.read_config(args.model_config_name_or_path)
    else:
        config = ae.pretrained_config(
            args.pretrained_model_name_or_path, args.subfolder, args.revision, args.cache_dir
        )
    ae.model_class(config)  # an unsupported class is refused here
    return config


def load_vae(args, config):
    """The pretrained weights, or a random init of ``--model_config_name_or_path``."""
    path = None if args.model_config_name_or_path is not None else args.pretrained_model_name_or_path
    return ae.load_autoencoder(config, path, args.subfolder, args.revision, args.variant, args.cache_dir)


def video_flags(args) -> list:
    """The video-only settings given, which an image AE refuses (``--video_batch_size`` may come from --preset)."""
    preset = f" (from --preset {args.preset})" if args.preset else ""
    values = (
        ("--video_data_dir", args.video_data_dir),
        ("--video_dataset_name", args.video_dataset_name),
        ("--video_data_files", args.video_data_files),
        ("--video_batch_size" + preset, args.video_batch_size),
        ("--se_temporal_scale_factors", args.se_temporal_scale_factors),
    )
    return [flag for flag, value in values if value]


def trainable_vae(args, config, train_output_layers: bool):
    """The autoencoder to fine-tune: ``(vae, base weights fingerprint, base latent normalisation)``, frozen as
    App. B says (the encoder too with --freeze_encoder), with LoRA adapters on the trainable layers for --use_lora."""
    vae = ae.prepare_for_training(load_vae(args, config))  # no slicing, tiling or frame-wise passes while training
    base_fingerprint = ae.weights_fingerprint(vae)
    base_normalization = current_latent_normalization(vae)
    frozen = ae.freeze_for_fine_tuning(vae, args.num_frozen_up_blocks, not train_output_layers, args.freeze_encoder)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    if args.use_lora:
        frozen_prefixes = [n for n, m in vae.named_modules() if n and not any(p.requires_grad for p in m.parameters())]
        add_lora(
            vae, lora_target_names(vae, args.lora_target_modules, frozen_prefixes), args.lora_rank, args.lora_alpha
        )
    n_train = sum(p.numel() for p in vae.parameters() if p.requires_grad)
    n_frozen = sum(p.numel() for p in vae.parameters()) - n_train
    logger.info(f"{type(vae).__name__}: {n_train:,} trainable / {n_frozen:,} frozen parameters; frozen: {frozen}")
    return vae, base_fingerprint, base_normalization


def measure_settings(args) -> dict:
    """The settings of every reconstruction measurement (before, during, after training and cross-decoding)."""
    return dict(
        dct_block_size=args.dct_block_size,
        decode_timestep=args.decode_timestep,
        decode_noise_scale=args.decode_noise_scale,
    )


def run_validation(accelerator, vae, ema, val, rgb, args, step):
    """Validate the EMA weights (the model that will be saved), then put the training weights back."""
    params = [p for p in vae.parameters() if p.requires_grad]
    with ema.swapped_in(params) if ema is not None else contextlib.nullcontext():
        results = {kind: reconstruction_metrics(vae, x, **measure_settings(args)) for kind, x in val.items()}
    log_reconstruction_metrics(accelerator, val, results, rgb, step)
    for kind, result in results.items():
        logger.info(f"step {step}: val {kind} PSNR {result['psnr']:.2f} dB, latent HF share {result['hf_share']:.4f}")


def shards_text(specs):
    """The model card's training-data line for --train_data_files / --video_data_files."""
    return f"webdataset tar shards ({len(specs)} spec{'s' * (len(specs) > 1)})" if specs else None


def write_outputs(args, settings, before, after, rgb, val, run):
    """metrics.json, spectrum.png and the model card README.md (``settings``: the flags as this launch trained)."""
    base = (
        "embedded (diffusability_hf/assets/embedded_ae)"
        if args.embedded_model
        else (args.pretrained_model_name_or_path or f"random init from {args.model_config_name_or_path}")
    )
    base = base + (f" (subfolder {args.subfolder})" if args.subfolder else "")
    metrics = {"base_model": base, "base_weights_fingerprint": run["base_fingerprint"]}
    metrics["weights_fingerprint"] = run["fingerprint"]
    metrics.update(before_after_record(before, after, rgb, val, run["validation"], run["cross_decoding"]))
    metrics.update(
        {
            "latent_normalization": {"base": run["base_normalization"], **run["normalization"]},
            "train_steps": run["steps"],
            "global_batch": {k: v for k, v in run["global_batch"].items() if k != "description"},
            "skipped_images": run["skips"]["unreadable_files"],  # unique unreadable files (not skip events)
            "unreadable_files": run["skips"],
            "train_seconds": round(run["seconds"], 1),
            "peak_memory_gb": round(run["peak_memory_gb"], 3),
            "throughput": run["throughput"],
            "nonfinite_steps": run["nonfinite_steps"],
            "rank_weight_checksums": run["checksums"],
        }
    )
    files.atomic_write_json(os.path.join(args.output_dir, "metrics.json"), metrics)
    save_png(plot_fine_tuning_spectra(rgb, before, after), os.path.join(args.output_dir, "spectrum.png"))
    # The model card: metrics.json's numbers, the run's settings
    hidden = ("hub_token", "embedded_model", "embedded_data", "preset_global_batch", "vae_config")
    hp = {k: v for k, v in settings.items() if k not in hidden}
    for key in ("se_scale_factors", "se_temporal_scale_factors"):
        hp[key] = " ".join(map(str, getattr(args, key) or [])) or None
    if args.embedded_model:
        hp["pretrained_model_name_or_path"] = "(embedded)"
    base_id = None if args.embedded_model or args.model_config_name_or_path else args.pretrained_model_name_or_path
    fields = hub.se_autoencoder_card_fields(
        metrics, hp, class_name=run["class_name"], se_weight=args.se_weight, scale_factors=hp["se_scale_factors"],
        num_frames=args.num_frames, decode_timestep=args.decode_timestep,
        timestep_conditioning=run["timestep_conditioning"], global_batch=run["global_batch"]["description"],
        trainable=run["trainable"], total=run["total"], base_id=base_id,
        dataset=hub.dataset_description(args.dataset_name or shards_text(args.train_data_files), args.train_data_dir,
                                    args.video_dataset_name or shards_text(args.video_data_files),
                                    args.video_data_dir, "video" in val, bool(settings["train_batch_size"])),
        license_fields=hub.card_license(args.license, base_id, args.cache_dir, online=args.push_to_hub),
    )  # fmt: skip
    card = hub.render_model_card("se_autoencoder", fields, template_dir=MODEL_CARDS)
    files.atomic_write_text(os.path.join(args.output_dir, "README.md"), card)


def main(args):
    use_all_cpu_cores()  # a plain `accelerate launch` runs one CPU process on one thread
    # Validate everything cheap before touching weights or data
    found = files.check_output_dir(
        args.output_dir, RESULT_FILES, args.overwrite_output_dir, args.resume_from_checkpoint
    )
    launch.check_launcher(args.compile, args.mixed_precision)
    if not os.path.isfile(os.path.join(MODEL_CARDS, "se_autoencoder.md")):
        raise FileNotFoundError(f"Model card template missing from {MODEL_CARDS}: run the script from a full clone.")
    config, pretrained = args.vae_config, args.model_config_name_or_path is None
    compression = ae.check_se_geometry(config, args.resolution, args.se_scale_factors, args.dct_block_size)
    video_batch_size = ae.check_se_video(
        config, args.train_batch_size, args.video_batch_size, args.num_frames, args.se_temporal_scale_factors,
        video_flags(args),
    )  # fmt: skip
    is_video = ae.get_row(config).video
    sources = data_sources(args)
    check_streamed(sources, {"image": args.train_batch_size, "video": video_batch_size})
    if args.gradient_checkpointing and not ae.model_class(config)._supports_gradient_checkpointing:
        raise ValueError(
            f"{config['_class_name']} does not support gradient checkpointing in diffusers: drop "
            "--gradient_checkpointing and save memory with a smaller --video_batch_size, --num_frames or --resolution."
        )
    resume_path = checkpoints.resolve_resume(args.output_dir, args.resume_from_checkpoint, found=found)

    # Accelerator; a preset's Table 5 batch is global: split over this launch's processes before any data loads
    accelerator = launch.make_accelerator(args)
    logger.info(accelerator.state, main_process_only=False)
    # The settings this launch trains with: the flags, with a preset's per-process batches, a random init's output
    # layers trained (nothing pretrained to protect) and --scale_lr applied; `args` stays as parsed
    settings = dict(vars(args), video_batch_size=video_batch_size)
    settings["train_output_layers"] = args.train_output_layers or not pretrained
    settings.update(launch.split_global_batch(args.preset_global_batch, accelerator.num_processes,
                                       args.gradient_accumulation_steps, args.preset))  # fmt: skip
    image_batch_size, video_batch_size = settings["train_batch_size"], settings["video_batch_size"]
    if args.scale_lr:
        settings["learning_rate"] *= image_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    learning_rate = settings["learning_rate"]
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    repo_id = None
    if accelerator.is_main_process:
        files.lock_output_dir(args.output_dir)  # one run at a time in a folder: a second one is refused here
        repo_id = hub.hub_repo(args)

    # Data: image batches, or joint image + clip batches for video AEs (Table 5); validation items held out
    data = TrainingData(
        sources, {"image": image_batch_size, "video": video_batch_size}, joint=is_video, resolution=args.resolution,
        num_frames=args.num_frames, frame_stride=args.frame_stride, seed=args.seed, cache_dir=args.cache_dir,
        num_validation={"image": args.num_validation_images, "video": args.num_validation_videos},
        center_crop=args.center_crop, random_flip=args.random_flip, shuffle_buffer_size=args.shuffle_buffer_size,
        decode_threads=args.decode_threads, num_workers=args.dataloader_num_workers,
        worker_init_fn=launch.ignore_stop_signals,  # a job-wide SIGTERM stops the loop, not the workers
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )  # fmt: skip
    val = {kind: v.to(accelerator.device) for kind, v in data.validation.items()}

    # Reconstruction distance d (after the data, so a wrong data path is reported before a missing LPIPS trunk)
    distance = ReconstructionDistance(args.mse_weight, args.lpips_weight, args.lpips_net, args.lpips_trunk_path)
    if args.lpips_weight == 0:
        logger.info("LPIPS is off (--lpips_weight 0): d = MSE only.")
    distance.to(accelerator.device)

    # Model: the base weights (fingerprinted), frozen as App. B says, LoRA adapters if asked
    vae, base_fingerprint, base_normalization = trainable_vae(args, config, settings["train_output_layers"])
    params = [p for p in vae.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in vae.parameters())
    vae.to(accelerator.device, dtype=torch.float32)  # trainable weights stay fp32; autocast does the rest

    # "Before" metrics on the base model (the EMA starts from the same weights, App. B)
    before = {kind: reconstruction_metrics(vae, pixels, **measure_settings(args)) for kind, pixels in val.items()}
    rgb = {kind: rgb_spectrum(pixels, compression, args.dct_block_size) for kind, pixels in val.items()}
    sharded = fsdp.fsdp_active(accelerator)  # FSDP2: the main process keeps an unsharded copy to validate and save
    plain = fsdp.plain_copy(vae, accelerator)

    # Optimizer, schedule and the SE objective (paper eq. 2 and App. C), prepared together
    optimizer = steps.ae_adamw(
        params, learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_weight_decay, args.adam_epsilon
    )
    from diffusers.optimization import get_scheduler

    n = accelerator.num_processes  # diffusers' examples: the schedule advances once per process and step
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * n,
                                 num_training_steps=args.max_train_steps * n)  # fmt: skip
    model = SEAutoencoderLoss(
        vae, distance, se_weight=args.se_weight, downsample_mode=args.se_downsample_mode, kl_weight=args.kl_weight,
        chf_weight=args.chf_weight, soft_penalty_weight=args.soft_penalty_weight, soft_penalty_p=args.soft_penalty_p,
        soft_penalty_normalization=args.soft_penalty_normalization, dct_block_size=args.dct_block_size,
        latent_sampling=args.latent_sampling, decode_timestep=args.decode_timestep,
        decode_noise_scale=args.decode_noise_scale,
    )  # fmt: skip
    blocks = fsdp.shard_blocks(accelerator, model)  # FSDP: each AE stage (and LPIPS layer) its own shard group
    if blocks:
        logger.info(f"FSDP2: {accelerator.num_processes} processes; each {', '.join(blocks)} sharded on its own")
    # DeepSpeed's config wants a batch size, which a stream does not give
    launch.configure_deepspeed(accelerator, data.stream_batch_size, args.max_grad_norm)
    model, optimizer, lr_scheduler = data.prepare(accelerator, model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model).vae
    if args.compile:  # encoder and decoder in place: the objective calls vae.encode / vae.decode, not forward
        unwrapped.encoder.compile(backend=args.compile_backend)
        unwrapped.decoder.compile(backend=args.compile_backend)
    # The EMA of the prepared trainable parameters (App. B: it starts from the base weights): whole tensors, or under
    # FSDP this process's shards (saved per process)
    ema = None
    if args.ema_halflife_steps > 0:
        trainable = [p for p in unwrapped.parameters() if p.requires_grad]
        ema = EMA(trainable, args.ema_halflife_steps, args.ema_rampup_ratio or None)

    def save_extras(folder):  # each process's stream positions and the EMA (under FSDP each process its shards)
        data.save_state(folder)
        fsdp.save_ema_state(ema, folder, accelerator)

    def checkpoint(step):  # every process saves its part; the newest --checkpoints_total_limit complete ones stay
        checkpoints.save_checkpoint(
            accelerator, args.output_dir, step, args.checkpoints_total_limit or None, save_extras
        )

    steps_per_epoch = data.steps_per_epoch(args.max_train_steps, args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_ae_se", config=launch.tracker_config(settings))
    per_process = {"images": image_batch_size, **({"clips": video_batch_size} if is_video else {})}
    global_batch = launch.describe_global_batch(
        per_process, accelerator.num_processes, args.gradient_accumulation_steps,
        args.preset if args.preset_global_batch else None, args.num_frames,
    )  # fmt: skip
    logger.info(
        f"***** SE fine-tuning: {args.max_train_steps} steps, global batch {global_batch['description']}, "
        f"alpha={args.se_weight}, scales={args.se_scale_factors}, KL={args.kl_weight} *****"
    )

    # Resume (from the newest complete checkpoint for 'latest'); an overwritten folder loses its old checkpoints
    if args.overwrite_output_dir and resume_path is None and accelerator.is_main_process:
        for name in checkpoints.remove_checkpoints(args.output_dir):
            logger.info(f"--overwrite_output_dir: removed the earlier run's {name}")
    accelerator.wait_for_everyone()
    global_step, first_epoch, skip_batches = checkpoints.resume_position(
        accelerator, resume_path, steps_per_epoch, args.gradient_accumulation_steps
    )
    if resume_path is not None:
        data.load_state(resume_path)  # streams continue from their saved positions
        fsdp.load_ema_state(ema, resume_path, accelerator)
        steps.use_learning_rate(lr_scheduler, learning_rate, logger.info)  # the command line wins over the checkpoint

    # Training loop
    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    skips, t_start, last, micro = SkipLog(), time.time(), {}, 0
    per_step = sum(per_process.values()) * accelerator.num_processes * args.gradient_accumulation_steps
    meter, guard = steps.StepMeter(per_step, accelerator.device), steps.NonFiniteGuard(args.max_nonfinite_steps)
    trainable = [p for p in unwrapped.parameters() if p.requires_grad]
    if global_step >= args.max_train_steps:  # resumed from the last step's checkpoint: only the final save is left
        logger.info(f"{resume_path} is at step {global_step} of {args.max_train_steps}: nothing left to train")
    stop = launch.GracefulStop()  # SIGTERM and Ctrl-C stop after the current step, with a checkpoint
    for epoch in range(first_epoch, num_epochs):
        if global_step >= args.max_train_steps:
            break
        for batch in meter.batches(data.epoch(accelerator, epoch, skip_batches if epoch == first_epoch else 0)):
            skips.update(batch["skipped"])  # warns once per unreadable file
            # One scale factor (and CHF ratio, temporal factor) per optimizer step, reproducible across resumes
            step_rng = random.Random(args.seed * 100_003 + global_step)
            scale = step_rng.choice(args.se_scale_factors)
            chf_ratio = step_rng.uniform(0.0, args.chf_max_ratio)
            temporal = step_rng.choice(args.se_temporal_scale_factors) if args.se_temporal_scale_factors else 1
            # Posterior samples from `gen`; dropout and decoder noise injection (LTX) from torch's RNG
            gen = steps.step_generator(accelerator.device, args.seed, global_step, accelerator.process_index, micro)
            micro += 1
            with accelerator.accumulate(model):
                loss, terms = model(batch["pixel_values"], batch.get("video_values"), scale, temporal, chf_ratio, gen)
                loss = loss.mean()  # (B_images + B_videos,) -> the batch mean: every image and clip counts once
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
            last = {f"train/{k}": accelerator.reduce(v, "mean").item() for k, v in terms.items()}
            last.update({"train/loss": accelerator.reduce(loss.detach(), "mean").item(),
                         "train/lr": lr_scheduler.get_last_lr()[0], "train/scale_factor": scale,
                         "train/nonfinite_steps": guard.skipped, **perf})  # fmt: skip
            if args.se_temporal_scale_factors:
                last["train/temporal_scale_factor"] = temporal
            if grad_norm is not None:
                last["train/grad_norm"] = float(grad_norm)
            accelerator.log(last, step=global_step)
            progress_bar.set_postfix(
                loss=f"{last['train/loss']:.4f}", se=f"{last.get('train/se', 0):.4f}", lr=f"{last['train/lr']:.2e}",
                samples_s=f"{perf['train/samples_per_second']:.1f}", data=f"{perf['train/data_wait_s']:.2f}s",
            )  # fmt: skip

            if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                checkpoint(global_step)
            if global_step % args.validation_steps == 0 and sharded:  # every process gathers the full EMA weights
                fsdp.gather_into(plain, unwrapped, ema, trainable_only=True)
            if global_step % args.validation_steps == 0 and accelerator.is_main_process:
                run_validation(
                    accelerator, plain if sharded else unwrapped, None if sharded else ema, val, rgb, args, global_step
                )
            if global_step >= args.max_train_steps:
                break
            # SIGTERM or Ctrl-C: a checkpoint of this step (unless just saved), one line
            if stop.requested(accelerator):
                if global_step % args.checkpointing_steps:
                    checkpoint(global_step)
                raise stop.stopped(global_step, os.path.join(args.output_dir, f"checkpoint-{global_step}"))
            meter.restart()  # logging, checkpoints and validation are not training time
        if global_step >= args.max_train_steps:
            break
    stop.close()

    # Save the EMA weights as the final model, in diffusers format
    accelerator.wait_for_everyone()
    peak = steps.peak_memory_gb(accelerator.device)
    logger.info(f"Peak memory: {peak:.2f} GiB ({'CUDA allocated' if accelerator.device.type == 'cuda' else 'RSS'})")
    if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
        checkpoint(global_step)
    skips = SkipLog().merge(gather_object([skips]))  # unique unreadable files over all processes
    # Every rank must hold the same weights after DDP training (under FSDP: its own shards): a checksum per rank
    checksum = fsdp.local_checksum(p for p in unwrapped.parameters() if p.requires_grad)
    rank_checksums = accelerator.gather(checksum).tolist()
    if sharded:  # the final weights, gathered by every process into the main process's unsharded copy
        unwrapped, ema = fsdp.gather_into(plain, unwrapped, ema, trainable_only=True), None
    if accelerator.is_main_process:
        final = unwrapped
        if ema is not None:
            ema.copy_to([p for p in final.parameters() if p.requires_grad])
        adapter = lora_adapter(final, args.lora_rank, args.lora_alpha) if args.use_lora else None
        if adapter is not None:
            merge_lora(final)
        # Latent normalisation re-estimated on training latents (clips for a video AE: what a video DiT would train
        # on; a stream's first training items, unshuffled), in the class's convention
        items = data.statistics_items(args.latent_stats_num_samples)
        z = training_latents(final, items, args.latent_stats_num_samples, args.seed, accelerator.device)
        normalization = reestimate_latent_normalization(final, z, data.statistics_kind, args.keep_base_latent_scaling)
        with files.atomic_save(args.output_dir) as tmp:
            final.save_pretrained(tmp, safe_serialization=True)
            if adapter is not None:
                save_lora_adapter(os.path.join(tmp, "lora"), *adapter)
        after = {kind: reconstruction_metrics(final, pixels, **measure_settings(args)) for kind, pixels in val.items()}
        # Cross-decoding: how far the fine-tuned latent space moved from the base's
        cross = None
        if pretrained:
            base = ae.prepare_for_training(load_vae(args, config)).to(accelerator.device)
            cross = cross_decoding(base, final, val, before, after, **measure_settings(args))
            del base

        # metrics.json, spectrum.png, the model card; the reconstructions to the trackers
        run = dict(
            steps=global_step, trainable=n_train, total=n_all, skips=skips.summary(), class_name=type(final).__name__,
            seconds=time.time() - t_start, checksums=rank_checksums, peak_memory_gb=peak,
            timestep_conditioning=bool(getattr(final.config, "timestep_conditioning", False)),
            base_fingerprint=base_fingerprint, fingerprint=ae.weights_fingerprint(final),
            base_normalization=base_normalization, normalization=normalization, cross_decoding=cross,
            validation=data.info, global_batch=global_batch, throughput=meter.summary(), nonfinite_steps=guard.skipped,
        )  # fmt: skip
        write_outputs(args, settings, before, after, rgb, val, run)
        if "image" in val:
            log_images(accelerator.trackers, val["image"], after["image"]["recon"], global_step)
        if "video" in val:
            gif = log_clips(accelerator.trackers, val["video"], after["video"]["recon"], global_step)
            files.atomic_write_text(os.path.join(args.output_dir, "reconstruction.gif"), gif)
        if args.push_to_hub:
            logger.info(f"Uploaded to {hub.push_folder(repo_id, args.output_dir, None, 'SE fine-tuned autoencoder')}")
        names = ["config.json", "diffusion_pytorch_model.safetensors", "lora", "README.md", "metrics.json"]
        names += ["spectrum.png", "reconstruction.gif"]
        names += [os.path.basename(p) for p in checkpoints.list_checkpoints(args.output_dir)]
        files.report_written(args.output_dir, names + [args.logging_dir] * bool(args.report_to))
    accelerator.wait_for_everyone()  # no process tears down the process group while another still works
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main, parse_args)
