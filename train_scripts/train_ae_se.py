#!/usr/bin/env python
"""Fine-tune a diffusers autoencoder with scale-equivariance (SE) regularization.

Paper: "Improving the Diffusability of Autoencoders" (Skorokhodov et al., 2025), eq. 2:

    L(x) = d(x, Dec(z)) + alpha * d(down(x), Dec(down(z))) [+ beta * KL],   d = MSE + LPIPS,  alpha = 0.25

with ``down`` a x2 or x4 bilinear downsampling drawn once per step. ``--se_weight 0`` is the paper's "+FT"
baseline (the same fine-tuning without the regulariser). Run with no arguments to fine-tune the toolkit's own
small pretrained AutoencoderKL on crops of the photographs that ship inside scikit-image, offline, on a CPU:

    accelerate launch train_scripts/train_ae_se.py --output_dir ae-se

The result in ``--output_dir`` is a plain diffusers autoencoder (``AutoencoderKL.from_pretrained(output_dir)``),
plus ``README.md`` (model card), ``spectrum.png`` and ``metrics.json``.
"""

import argparse
import json
import logging
import math
import os
import random
import shutil
import time

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from diffusability_hf import __version__
from diffusability_hf import autoencoders as ae
from diffusability_hf.data import (
    EmbeddedPhotoCrops,
    HFImageDataset,
    collate,
    embedded_validation_batch,
    load_image_dataset,
)
from diffusability_hf.ema import EMA
from diffusability_hf.losses import (
    DOWNSAMPLE_MODES,
    ReconstructionDistance,
    chf_loss,
    downsample,
    kl_divergence,
    scale_equivariance_loss,
)
from diffusability_hf.spectral import (
    frequency_profile,
    high_frequency_share,
    plot_frequency_profiles,
    soft_frequency_penalty,
)

logger = get_logger(__name__)

EMBEDDED_AE = os.path.join(os.path.dirname(ae.__file__), "assets", "embedded_ae")
MODEL_CARDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards")

# Paper Table 5 (Appendix B). `kl_weight` is the baseline's KL beta: SE runs turn KL off (Section 3.3).
PRESETS = {
    "flux": dict(
        learning_rate=1e-5,
        train_batch_size=32,
        max_train_steps=10_000,
        kl_weight=1e-3,
        mse_weight=1.0,
        lpips_weight=1.0,
        max_grad_norm=50.0,
        num_frozen_up_blocks=1,
        resolution=256,
    ),
    "cosmos": dict(
        learning_rate=1e-4,
        train_batch_size=32,
        max_train_steps=10_000,
        kl_weight=0.0,
        mse_weight=1.0,
        lpips_weight=1.0,
        max_grad_norm=50.0,
        num_frozen_up_blocks=3,
        resolution=256,
    ),
    "cogvideox": dict(
        learning_rate=3e-4,
        train_batch_size=64,
        video_batch_size=32,
        max_train_steps=20_000,
        kl_weight=1e-3,
        mse_weight=1.0,
        lpips_weight=1.0,
        max_grad_norm=1.0,
        num_frozen_up_blocks=0,
        resolution=256,
        num_frames=17,
    ),
    "ltx": dict(
        learning_rate=5e-5,
        train_batch_size=64,
        video_batch_size=32,
        max_train_steps=20_000,
        kl_weight=1e-4,
        mse_weight=5.0,
        lpips_weight=1.0,
        max_grad_norm=50.0,
        num_frozen_up_blocks=0,
        resolution=256,
        num_frames=17,
    ),
}

# The no-argument run: the embedded AE on embedded photographs, sized for a few CPU minutes. LPIPS is off because
# its trunk is a download; the paper's MSE term stays.
EMBEDDED_DEFAULTS = dict(
    learning_rate=2e-4,
    train_batch_size=16,
    max_train_steps=300,
    lpips_weight=0.0,
    resolution=64,
    validation_steps=100,
    checkpointing_steps=300,
    num_frozen_up_blocks=0,
)

# Everything else (the flags that the layers above may leave unset).
GENERIC_DEFAULTS = dict(
    learning_rate=1e-5,
    train_batch_size=8,
    max_train_steps=10_000,
    mse_weight=1.0,
    lpips_weight=1.0,
    max_grad_norm=50.0,
    num_frozen_up_blocks=0,
    resolution=256,
    validation_steps=500,
    checkpointing_steps=1000,
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        help="A diffusers config.json (file or folder): train from random init (paper App. C.5). The "
        "class comes from its '_class_name'.",
    )
    parser.add_argument(
        "--preset",
        type=str,
        default=None,
        choices=sorted(PRESETS),
        help="Fill Table 5's per-AE settings (lr, batch, steps, KL, MSE weight, grad clip, frozen "
        "up-blocks, resolution). Explicit flags win.",
    )
    # Data
    parser.add_argument("--dataset_name", type=str, default=None, help="HF datasets name (or local dataset script).")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="HF dataset config.")
    parser.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image one).")
    parser.add_argument("--train_data_dir", type=str, default=None, help="A folder of images (HF 'imagefolder').")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where datasets and models are cached.")
    parser.add_argument("--resolution", type=int, default=None, help="Square training crop side in pixels.")
    parser.add_argument("--center_crop", action="store_true", help="Center crops instead of random crops.")
    parser.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    # Loss (paper eq. 2 and Appendix C)
    parser.add_argument("--mse_weight", type=float, default=None, help="MSE weight in d (Table 5).")
    parser.add_argument("--lpips_weight", type=float, default=None, help="LPIPS weight in d (Table 5: 1.0).")
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
        help="'bilinear' (paper, no antialiasing), 'bilinear_antialias', or 'area' (box averaging, "
        "the authors' code default).",
    )
    parser.add_argument(
        "--kl_weight",
        type=float,
        default=None,
        help="KL beta, per-element mean. Default: 0 with SE (paper), the preset's value without.",
    )
    parser.add_argument("--chf_weight", type=float, default=0.0, help="Weight of the CHF term (App. C.1, eq. 4).")
    parser.add_argument(
        "--chf_max_ratio",
        type=float,
        default=0.9,
        help="CHF chops a ratio drawn uniformly in [0, this] per step (Table 6 uses 0.1-0.9).",
    )
    parser.add_argument(
        "--soft_penalty_weight",
        type=float,
        default=0.0,
        help="gamma of the soft high-frequency penalty (App. C.2, eq. 6-7; the paper tries ~0.01).",
    )
    parser.add_argument("--soft_penalty_p", type=float, default=2.0, help="Exponent p of eq. 6.")
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
        default=None,
        help="Decoder up-blocks nearest the output to freeze (Table 5: flux 1, cosmos 3, video 0).",
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
    parser.add_argument("--train_batch_size", type=int, default=None, help="Per-device batch size.")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps.")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per step.")
    parser.add_argument("--learning_rate", type=float, default=None, help="Peak learning rate (Table 5).")
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
    parser.add_argument("--max_grad_norm", type=float, default=None, help="Gradient clipping norm (Table 5).")
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
        help="Effective half-life min(half-life, ratio * step), as the authors' code, so short runs "
        "get an EMA that fits their length; 0 disables the ramp.",
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
    parser.add_argument("--seed", type=int, default=0, help="Seed for init, data order, noise and scale draws.")
    # Checkpoints, validation, logging, Hub
    parser.add_argument("--output_dir", type=str, default="ae-se-output", help="Where everything is written.")
    parser.add_argument("--checkpointing_steps", type=int, default=None, help="Save the training state every N steps.")
    parser.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints."
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' or a checkpoint folder: restores model, EMA, optimizer, scheduler, RNG, step.",
    )
    parser.add_argument("--validation_steps", type=int, default=None, help="Validate every N steps.")
    parser.add_argument("--num_validation_images", type=int, default=8, help="Size of the fixed validation batch.")
    parser.add_argument(
        "--report_to", type=str, default="tensorboard", help="'tensorboard', 'wandb', 'all' or 'none'."
    )
    parser.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder inside --output_dir.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hub.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id (default: output folder name).")
    parser.add_argument("--hub_token", type=str, default=None, help="Hub token (never written anywhere).")
    parser.add_argument("--private", action="store_true", help="Create the Hub repo as private.")
    args = parser.parse_args(input_args)
    return resolve_args(args, parser)


def resolve_args(args, parser):
    """Fill unset flags from the preset, the embedded default and the generic defaults; validate combinations."""
    args.embedded_model = args.pretrained_model_name_or_path is None and args.model_config_name_or_path is None
    args.embedded_data = args.dataset_name is None and args.train_data_dir is None
    layers = [PRESETS.get(args.preset, {})]
    if args.embedded_model and args.embedded_data:
        layers.append(EMBEDDED_DEFAULTS)
    elif args.embedded_data:
        layers.append({"resolution": EMBEDDED_DEFAULTS["resolution"]})
    layers.append(GENERIC_DEFAULTS)
    for key in GENERIC_DEFAULTS:
        if getattr(args, key) is None:
            setattr(args, key, next(layer[key] for layer in layers if key in layer))
    if args.kl_weight is None:  # not in GENERIC_DEFAULTS on purpose: SE switches it off
        args.kl_weight = 0.0 if args.se_weight > 0 else PRESETS.get(args.preset, {}).get("kl_weight", 0.0)
    if args.embedded_model:
        args.pretrained_model_name_or_path = EMBEDDED_AE

    if args.pretrained_model_name_or_path is not None and args.model_config_name_or_path is not None:
        parser.error("Give either --pretrained_model_name_or_path or --model_config_name_or_path, not both.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error("Give either --dataset_name or --train_data_dir, not both.")
    if args.se_weight < 0 or args.kl_weight < 0 or args.chf_weight < 0 or args.soft_penalty_weight < 0:
        parser.error("Loss weights must be non-negative.")
    if args.mse_weight <= 0 and args.lpips_weight <= 0:
        parser.error("--mse_weight and --lpips_weight are both 0: the reconstruction distance d is empty.")
    if any(f < 2 for f in args.se_scale_factors):
        parser.error(f"--se_scale_factors must be integers >= 2, got {args.se_scale_factors}.")
    if not 0 < args.chf_max_ratio <= 1:
        parser.error("--chf_max_ratio must be in (0, 1].")
    if args.resolution <= 0 or args.train_batch_size <= 0 or args.max_train_steps <= 0:
        parser.error("--resolution, --train_batch_size and --max_train_steps must be positive.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error("--checkpoints_total_limit must be at least 1.")
    if args.push_to_hub and args.hub_token is not None and args.report_to in ("wandb", "all"):
        parser.error(
            "--hub_token with --report_to wandb would expose the token in the run config; use `hf auth login`."
        )
    if args.report_to == "none":
        args.report_to = None
    return args


def load_autoencoder(args):
    """Read the config (cheap, validates the class), then build or load the weights. Errors say what to fetch."""
    if args.model_config_name_or_path is not None:
        if not os.path.exists(args.model_config_name_or_path):
            raise FileNotFoundError(f"--model_config_name_or_path {args.model_config_name_or_path} does not exist.")
        config = ae.read_config(args.model_config_name_or_path)
        cls = ae.model_class(config)
        return config, lambda: cls.from_config(config), False
    from diffusers import AutoencoderKL

    path, sub = args.pretrained_model_name_or_path, args.subfolder
    try:
        config = AutoencoderKL.load_config(
            path,  # any ConfigMixin model class reads config.json
            subfolder=sub,
            revision=args.revision,
            cache_dir=args.cache_dir,
        )
    except (OSError, ValueError) as err:
        where = f"{path}" + (f" (subfolder '{sub}')" if sub else "")
        raise FileNotFoundError(
            f"Could not find the autoencoder {where}: it is not a local folder with a config.json and not in the "
            "Hugging Face cache. Download it where there is network access, e.g. "
            f"`hf download {path}{f' --include {sub}/*' if sub else ''} --local-dir LOCAL_DIR`, then pass "
            f"--pretrained_model_name_or_path LOCAL_DIR. ({err})"
        ) from err
    cls = ae.model_class(config)

    def build():
        return cls.from_pretrained(
            path, subfolder=sub, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir
        )

    return config, build, True


def check_geometry(args, config):
    """Fail before any heavy work when the resolution, scale factors or DCT block do not fit the AE."""
    f = ae.spatial_compression(config)
    if args.resolution % f:
        lo = args.resolution // f * f
        raise ValueError(
            f"--resolution {args.resolution} is not divisible by the autoencoder's spatial compression {f}; "
            f"use {lo or f} or {lo + f}."
        )
    latent = args.resolution // f
    for s in args.se_scale_factors:
        if latent % s:
            ok = [r for r in range(f, 4 * args.resolution, f) if (r // f) % math.lcm(*args.se_scale_factors) == 0]
            near = sorted(ok, key=lambda r: abs(r - args.resolution))[:2]
            raise ValueError(
                f"SE scale factor {s} does not divide the latent size {latent}x{latent} (resolution "
                f"{args.resolution} / compression {f}). Use --resolution {' or '.join(map(str, sorted(near)))}, "
                f"or change --se_scale_factors."
            )
    if latent % args.dct_block_size:
        raise ValueError(
            f"The latent size {latent} is not divisible by --dct_block_size {args.dct_block_size} (spectra, CHF and "
            "the soft penalty use block DCTs): pick a block size that divides it."
        )
    return f


class SEAutoencoderLoss(nn.Module):
    """Encode, decode and the SE branch in one ``forward`` (so DDP/FSDP and autocast see all of it).

    Returns the batch-mean loss and a dict of detached per-term means. Paper eq. 2, plus App. C terms.
    """

    def __init__(self, vae, distance, args):
        super().__init__()
        self.vae = vae
        object.__setattr__(self, "distance", distance)  # frozen LPIPS: not part of the trained state
        self.args = args

    def decode(self, z):
        return ae.decode(self.vae, z)

    def forward(self, x, scale_factor, chf_ratio=None, generator=None):
        a = self.args
        posterior = ae.encode(self.vae, x)
        z = posterior.sample(generator) if a.latent_sampling == "sample" else posterior.mode()
        recon = self.decode(z)
        terms = {"rec": self.distance(recon, x)}  # (B,)
        loss = terms["rec"]
        if a.se_weight > 0:
            terms["se"] = scale_equivariance_loss(x, z, self.decode, scale_factor, a.se_downsample_mode, self.distance)
            loss = loss + a.se_weight * terms["se"]
        if a.kl_weight > 0 and posterior.logvar is not None:
            terms["kl"] = kl_divergence(posterior.mean, posterior.logvar)
            loss = loss + a.kl_weight * terms["kl"]
        if a.chf_weight > 0:
            terms["chf"] = chf_loss(x, z, self.decode, chf_ratio, a.dct_block_size, distance=self.distance)
            loss = loss + a.chf_weight * terms["chf"]
        if a.soft_penalty_weight > 0:
            terms["soft"] = soft_frequency_penalty(z, a.dct_block_size, a.soft_penalty_p)
            loss = loss + a.soft_penalty_weight * terms["soft"]
        return loss.mean(), {k: v.detach().float().mean() for k, v in terms.items()}


def psnr(x, y):
    """Per-image PSNR in dB for [-1, 1] images: ``(B,)``."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


@torch.no_grad()
def evaluate(vae, pixels, args, batch_size=8):
    """Reconstruction PSNR (posterior mean), latent profile and high-frequency share on a fixed batch."""
    was_training = vae.training
    vae.eval()
    recons, latents = [], []
    for chunk in pixels.split(batch_size):
        z = ae.encode(vae, chunk).mode()
        latents.append(z.float())
        recons.append(ae.decode(vae, z).float().clamp(-1, 1))
    vae.train(was_training)
    recon, z = torch.cat(recons), torch.cat(latents)
    b = args.dct_block_size
    return {
        "psnr": psnr(recon, pixels).mean().item(),
        "hf_share": high_frequency_share(z, b).item(),
        "profile": frequency_profile(z, b).tolist(),
        "recon": recon,
    }


def rgb_profile(pixels, compression, block_size):
    """RGB profile at the latent's spatial size, as the paper's Fig. 2 ("RGB of the same spatial dimension")."""
    return frequency_profile(downsample(pixels, compression, "area"), block_size).tolist()


def trainable_split(vae, args):
    """Freeze what the paper freezes (App. B); return the frozen module names."""
    frozen = ae.frozen_module_names(vae, args.num_frozen_up_blocks, not args.train_output_layers)
    if args.freeze_encoder:
        frozen += [n for n in ("encoder", "quant_conv") if getattr(vae, n, None) is not None]
    vae.requires_grad_(True)
    for name in frozen:
        vae.get_submodule(name).requires_grad_(False)
    return frozen


def log_images(accelerator, pixels, recon, step):
    grid = torch.cat([pixels, recon]).clamp(-1, 1).add(1).div(2).cpu()  # (2N, 3, H, W): originals, then recons
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation/reconstruction", grid, step, dataformats="NCHW")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation/reconstruction": [wandb.Image(img) for img in grid]}, step=step)


def save_spectrum_plot(path, profiles):
    fig = plot_frequency_profiles(profiles, title="Latent frequency profile (paper Fig. 2/4)")
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def main(args):
    # Validate everything cheap before touching weights or data
    if not os.path.isfile(os.path.join(MODEL_CARDS, "se_autoencoder.md")):
        raise FileNotFoundError(f"Model card template missing from {MODEL_CARDS}: run the script from a full clone.")
    config, build_vae, pretrained = load_autoencoder(args)
    compression = check_geometry(args, config)
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a folder.")
    if not pretrained and not args.train_output_layers:
        args.train_output_layers = True  # random init: nothing pretrained to protect

    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    repo_id = None
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.push_to_hub:
            from diffusability_hf.hub import check_hub_access

            repo_id = check_hub_access(
                args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), args.hub_token, args.private
            )

    # Reconstruction distance d (loads LPIPS before the AE so a missing trunk fails fast)
    distance = ReconstructionDistance(args.mse_weight, args.lpips_weight, args.lpips_net, args.lpips_trunk_path)
    if args.lpips_weight == 0:
        logger.info("LPIPS is off (--lpips_weight 0): d = MSE only.")
    distance.to(accelerator.device)

    # Data
    if args.embedded_data:
        logger.info("No dataset given: training on crops of the photographs that ship inside scikit-image.")
        train_dataset = EmbeddedPhotoCrops(args.resolution, seed=args.seed, random_flip=True)
        val_pixels = embedded_validation_batch(args.resolution, args.num_validation_images)
    else:
        ds, column = load_image_dataset(
            args.dataset_name, args.train_data_dir, args.image_column, args.dataset_config_name, args.cache_dir
        )
        train_dataset = HFImageDataset(ds, column, args.resolution, args.center_crop, args.random_flip, args.seed)
        val_set = HFImageDataset(ds, column, args.resolution, center_crop=True, random_flip=False)
        val_pixels = torch.stack([val_set[i]["pixel_values"] for i in range(min(len(ds), args.num_validation_images))])
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        drop_last=len(train_dataset) >= args.train_batch_size,
    )

    # Model
    vae = build_vae()
    frozen = trainable_split(vae, args)
    if args.gradient_checkpointing:
        if not getattr(vae, "_supports_gradient_checkpointing", False):
            raise ValueError(f"{type(vae).__name__} does not support gradient checkpointing.")
        vae.enable_gradient_checkpointing()
    if hasattr(vae, "disable_slicing"):
        vae.disable_slicing()
    if hasattr(vae, "disable_tiling"):
        vae.disable_tiling()
    if args.use_lora:
        from diffusability_hf.lora import add_lora, lora_target_names

        frozen_prefixes = [n for n, m in vae.named_modules() if n and not any(p.requires_grad for p in m.parameters())]
        add_lora(
            vae, lora_target_names(vae, args.lora_target_modules, frozen_prefixes), args.lora_rank, args.lora_alpha
        )
    params = [p for p in vae.parameters() if p.requires_grad]
    n_train, n_all = sum(p.numel() for p in params), sum(p.numel() for p in vae.parameters())
    logger.info(
        f"{type(vae).__name__}: {n_train:,} trainable / {n_all - n_train:,} frozen parameters; frozen: {frozen}"
    )
    vae.to(accelerator.device, dtype=torch.float32)  # trainable weights stay fp32; autocast does the rest

    # "Before" metrics on the base model (the EMA starts from the same weights, App. B)
    val_pixels = val_pixels.to(accelerator.device)
    before = evaluate(vae, val_pixels, args)
    rgb = rgb_profile(val_pixels, compression, args.dct_block_size)
    ema = EMA(params, args.ema_halflife_steps, args.ema_rampup_ratio or None) if args.ema_halflife_steps > 0 else None

    if args.scale_lr:
        args.learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model = SEAutoencoderLoss(vae, distance, args)
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if k != "hub_token"}
        tracker_config["se_scale_factors"] = " ".join(map(str, args.se_scale_factors))
        tracker_config = {k: v for k, v in tracker_config.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("train_ae_se", config=tracker_config)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"***** SE fine-tuning: {args.max_train_steps} steps, total batch {total_batch}, "
        f"alpha={args.se_weight}, scales={args.se_scale_factors}, KL={args.kl_weight} *****"
    )

    # Resume
    global_step, first_epoch, skip_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            ckpts = [d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")]
            path = os.path.join(args.output_dir, max(ckpts, key=lambda d: int(d.split("-")[1]))) if ckpts else None
        if path is None:
            logger.info("No checkpoint found in --output_dir: starting a new run.")
        else:
            logger.info(f"Resuming from {path}")
            accelerator.load_state(path)
            global_step = int(os.path.basename(os.path.normpath(path)).split("-")[1])
            first_epoch = global_step // steps_per_epoch
            skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    progress_bar = tqdm(
        range(args.max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    skipped_images, t_start, last = 0, time.time(), {}
    unwrapped = accelerator.unwrap_model(model).vae
    for epoch in range(first_epoch, num_epochs):
        if hasattr(train_dataset, "epoch"):
            train_dataset.epoch = epoch
        train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
        for batch in loader:
            skipped_images += batch["num_skipped"]
            # One scale factor (and CHF ratio) per optimizer step, reproducible across resumes
            step_rng = random.Random(args.seed * 100_003 + global_step)
            scale = step_rng.choice(args.se_scale_factors)
            chf_ratio = step_rng.uniform(0.0, args.chf_max_ratio)
            gen = torch.Generator(accelerator.device).manual_seed(
                args.seed * 1_000_003 + global_step * 64 + accelerator.process_index
            )
            with accelerator.accumulate(model):
                loss, terms = model(batch["pixel_values"], scale, chf_ratio, gen)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress_bar.update(1)
            if ema is not None:
                ema.update([p for p in unwrapped.parameters() if p.requires_grad], global_step)
            last = {f"train/{k}": accelerator.reduce(v, "mean").item() for k, v in terms.items()}
            last.update(
                {
                    "train/loss": accelerator.reduce(loss.detach(), "mean").item(),
                    "train/lr": lr_scheduler.get_last_lr()[0],
                    "train/scale_factor": scale,
                }
            )
            if grad_norm is not None:
                last["train/grad_norm"] = float(grad_norm)
            accelerator.log(last, step=global_step)
            progress_bar.set_postfix(
                loss=f"{last['train/loss']:.4f}", se=f"{last.get('train/se', 0):.4f}", lr=f"{last['train/lr']:.2e}"
            )

            if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
                save_checkpoint(accelerator, args, global_step)
            if global_step % args.validation_steps == 0 and accelerator.is_main_process:
                run_validation(accelerator, unwrapped, ema, val_pixels, rgb, args, global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break

    # Save the EMA weights as the final model, in diffusers format
    accelerator.wait_for_everyone()
    if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
        save_checkpoint(accelerator, args, global_step)
    skipped_images = int(accelerator.reduce(torch.tensor(skipped_images, device=accelerator.device), "sum").item())
    # Every rank must hold the same weights after DDP training: record one checksum per rank
    checksum = torch.stack([p.detach().double().sum() for p in unwrapped.parameters() if p.requires_grad]).sum()
    rank_checksums = accelerator.gather(checksum.reshape(1)).tolist()
    if accelerator.is_main_process:
        final = unwrapped
        if ema is not None:
            ema.copy_to([p for p in final.parameters() if p.requires_grad])
        if args.use_lora:
            from safetensors.torch import save_file

            from diffusability_hf.lora import lora_state_dict, merge_lora

            os.makedirs(os.path.join(args.output_dir, "lora"), exist_ok=True)
            save_file(
                {k: v.contiguous() for k, v in lora_state_dict(final).items()},
                os.path.join(args.output_dir, "lora", "adapter_model.safetensors"),
            )
            with open(os.path.join(args.output_dir, "lora", "adapter_config.json"), "w") as f:
                json.dump(
                    {
                        "r": args.lora_rank,
                        "lora_alpha": args.lora_alpha or args.lora_rank,
                        "target_modules": sorted(final.peft_config["default"].target_modules),
                    },
                    f,
                    indent=2,
                )
            merge_lora(final)
        final.save_pretrained(args.output_dir, safe_serialization=True)
        after = evaluate(final, val_pixels, args)
        write_outputs(
            args,
            before,
            after,
            rgb,
            val_pixels,
            global_step,
            n_train,
            n_all,
            skipped_images,
            type(final).__name__,
            time.time() - t_start,
            rank_checksums,
        )
        log_images(accelerator, val_pixels, after["recon"], global_step)
        if args.push_to_hub:
            from diffusability_hf.hub import push_folder

            url = push_folder(repo_id, args.output_dir, args.hub_token, "SE fine-tuned autoencoder")
            logger.info(f"Uploaded to {url}")
    accelerator.end_training()


def save_checkpoint(accelerator, args, step):
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        ckpts = sorted(
            (d for d in os.listdir(args.output_dir) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1])
        )
        for old in ckpts[: max(0, len(ckpts) - args.checkpoints_total_limit + 1)]:
            shutil.rmtree(os.path.join(args.output_dir, old))
    path = os.path.join(args.output_dir, f"checkpoint-{step}")
    accelerator.save_state(path)
    logger.info(f"Saved state to {path}")


def run_validation(accelerator, vae, ema, val_pixels, rgb, args, step):
    """Validate the EMA weights (the model that will be saved), then put the training weights back."""
    params = [p for p in vae.parameters() if p.requires_grad]
    backup = [p.detach().clone() for p in params]
    if ema is not None:
        ema.copy_to(params)
    result = evaluate(vae, val_pixels, args)
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)
    accelerator.log({"val/psnr": result["psnr"], "val/hf_share": result["hf_share"]}, step=step)
    log_images(accelerator, val_pixels, result["recon"], step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            fig = plot_frequency_profiles({"RGB": rgb, f"latents (step {step})": result["profile"]})
            tracker.writer.add_figure("validation/spectrum", fig, step)
    logger.info(f"step {step}: val PSNR {result['psnr']:.2f} dB, latent HF share {result['hf_share']:.4f}")


def write_outputs(
    args, before, after, rgb, val_pixels, steps, n_train, n_all, skipped, class_name, seconds, checksums
):
    """metrics.json, spectrum.png and the model card README.md."""
    from diffusability_hf.hub import markdown_table, render_model_card

    base = (
        "embedded (diffusability_hf/assets/embedded_ae)"
        if args.embedded_model
        else (args.pretrained_model_name_or_path or f"random init from {args.model_config_name_or_path}")
    )
    base = base + (f" (subfolder {args.subfolder})" if args.subfolder else "")
    keep = ("psnr", "hf_share", "profile")
    metrics = {
        "base_model": base,
        "before": {k: before[k] for k in keep},
        "after": {k: after[k] for k in keep},
        "rgb_profile": rgb,
        "num_validation_images": int(val_pixels.shape[0]),
        "train_steps": steps,
        "skipped_images": skipped,
        "train_seconds": round(seconds, 1),
        "rank_weight_checksums": checksums,
    }
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    save_spectrum_plot(
        os.path.join(args.output_dir, "spectrum.png"),
        {"RGB": rgb, "latents before": before["profile"], "latents after": after["profile"]},
    )
    hp = {k: v for k, v in vars(args).items() if k not in ("hub_token", "embedded_model", "embedded_data")}
    hp["se_scale_factors"] = " ".join(map(str, args.se_scale_factors))
    if args.embedded_model:
        hp["pretrained_model_name_or_path"] = "(embedded)"
    hp_rows = [
        (f"`{k}`", f"`{v}`") for k, v in sorted(hp.items()) if v is not None and not isinstance(v, (list, dict))
    ]
    results = markdown_table(
        [
            ("PSNR (dB)", f"{before['psnr']:.2f}", f"{after['psnr']:.2f}"),
            ("latent high-frequency share", f"{before['hf_share']:.4f}", f"{after['hf_share']:.4f}"),
        ],
        ["metric", "before", "after"],
    )
    card = render_model_card(
        "se_autoencoder",
        {
            "base_model": base,
            "base_model_yaml": ""
            if args.embedded_model or args.model_config_name_or_path
            else f"base_model: {args.pretrained_model_name_or_path}\n",
            "class_name": class_name,
            "se_weight": args.se_weight,
            "scale_factors": hp["se_scale_factors"],
            "steps": steps,
            "trainable": f"{n_train:,}",
            "total": f"{n_all:,}",
            "results_table": results,
            "num_validation_images": int(val_pixels.shape[0]),
            "hyperparameters_table": markdown_table(hp_rows, ["flag", "value"]),
            "version": __version__,
            "dataset": "scikit-image sample photographs (embedded)"
            if args.embedded_data
            else (args.dataset_name or "local image folder"),
        },
        template_dir=MODEL_CARDS,
    )
    with open(os.path.join(args.output_dir, "README.md"), "w") as f:
        f.write(card)


if __name__ == "__main__":
    main(parse_args())
