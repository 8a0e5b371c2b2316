#!/usr/bin/env python
"""Encode an image dataset into autoencoder latents for latent-DiT training (fast-DiT style pre-extraction).

For every image we store the posterior mean and std (so the DiT draws a fresh latent sample every step, as the paper
trains on posterior samples, App. B), optionally those of the horizontally flipped image too, and the class label,
as safetensors shards. ``metadata.json`` records the autoencoder, the class names and the per-channel latent mean and
std that the DiT normalises with. With no arguments it encodes crops of the photographs that ship inside
scikit-image with the toolkit's embedded autoencoder (class = source photograph), offline:

    accelerate launch train_scripts/extract_latents.py --output_dir latents

Resumable: each shard covers a fixed slice of the dataset and is written atomically, so a rerun (with any number of
processes) encodes only the missing shards. Under ``accelerate launch`` every process writes its own shards.
"""

import argparse
import json
import logging
import math
import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from diffusability_hf import autoencoders as ae
from diffusability_hf.data import LabelledImages

logger = get_logger(__name__)

EMBEDDED_AE = ae.EMBEDDED_AE


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Hub id or local folder of a diffusers autoencoder. Default: the toolkit's embedded AutoencoderKL.",
    )
    parser.add_argument("--subfolder", type=str, default=None, help="Subfolder of the model repo, e.g. 'vae'.")
    parser.add_argument("--revision", type=str, default=None, help="Model revision.")
    parser.add_argument("--variant", type=str, default=None, help="Weights variant, e.g. 'fp16'.")
    parser.add_argument("--dataset_name", type=str, default=None, help="HF dataset with an image and a label column.")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="HF dataset config.")
    parser.add_argument("--split", type=str, default="train", help="Dataset split.")
    parser.add_argument(
        "--train_data_dir", type=str, default=None, help="An image folder whose subfolders are the classes."
    )
    parser.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image one).")
    parser.add_argument("--label_column", type=str, default="label", help="Class label column.")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where datasets and models are cached.")
    parser.add_argument("--resolution", type=int, default=None, help="Centre-crop side (default 256; embedded: 64).")
    parser.add_argument(
        "--flip", action="store_true", help="Also store the latents of the horizontally flipped image."
    )
    parser.add_argument("--max_samples", type=int, default=None, help="Encode at most this many images.")
    parser.add_argument("--batch_size", type=int, default=32, help="Images per encoder call.")
    parser.add_argument("--shard_size", type=int, default=1024, help="Images per shard file.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    parser.add_argument("--dtype", type=str, default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="Autocast for encoding."
    )
    parser.add_argument("--output_dir", type=str, default="latents", help="Where shards and metadata.json go.")
    args = parser.parse_args(input_args)

    args.embedded_data = args.dataset_name is None and args.train_data_dir is None
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error("Give either --dataset_name or --train_data_dir, not both.")
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = EMBEDDED_AE
    if args.resolution is None:
        args.resolution = 64 if args.embedded_data else 256
    if args.max_samples is None and args.embedded_data:
        args.max_samples = 1024
    for flag in ("resolution", "batch_size", "shard_size"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive.")
    return args


def main(args):
    # Validate cheap things before any weights or data
    config = ae.pretrained_config(args.pretrained_model_name_or_path, args.subfolder, args.revision, args.cache_dir)
    f = ae.spatial_compression(config)
    if args.resolution % f:
        lo = args.resolution // f * f
        raise ValueError(
            f"--resolution {args.resolution} is not divisible by the AE's compression {f}: use {lo or f}."
        )

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    os.makedirs(args.output_dir, exist_ok=True)
    meta_path = os.path.join(args.output_dir, "metadata.json")
    fingerprint = ae.config_fingerprint(config)
    if os.path.isfile(meta_path):
        with open(meta_path) as fh:
            old = json.load(fh)
        if old.get("ae_fingerprint") != fingerprint or old.get("resolution") != args.resolution:
            raise ValueError(
                f"{args.output_dir} holds latents of another autoencoder or resolution ({old.get('ae')}, "
                f"{old.get('resolution')} px): use a new --output_dir."
            )

    dataset = LabelledImages(
        args.resolution, args.dataset_name, args.train_data_dir, args.image_column, args.label_column,
        args.dataset_config_name, args.cache_dir, args.split, embedded_samples=args.max_samples,
    )  # fmt: skip
    total = min(len(dataset), args.max_samples or len(dataset))
    num_shards = math.ceil(total / args.shard_size)
    shard_path = [os.path.join(args.output_dir, f"shard-{j:05d}.safetensors") for j in range(num_shards)]
    todo = [j for j in range(num_shards) if not os.path.isfile(shard_path[j])]
    accelerator.wait_for_everyone()  # every process lists the missing shards before any writes one
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    logger.info(
        f"{total} images in {num_shards} shards; {num_shards - len(todo)} already written, "
        f"{len(mine)} for this process"
    )

    # Encode
    vae = ae.prepare_for_training(
        ae.model_class(config).from_pretrained(
            args.pretrained_model_name_or_path, subfolder=args.subfolder, revision=args.revision,
            variant=args.variant, cache_dir=args.cache_dir,
        )
    ).to(accelerator.device).eval().requires_grad_(False)  # fmt: skip
    # Channels-last convolutions are markedly faster for 2D AEs (oneDNN on CPU, tensor cores on GPU)
    channels_last = ae.get_row(config).layout == "image"
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    dtype = getattr(torch, args.dtype)
    skipped = 0
    for j in tqdm(mine, desc="Shards", disable=not accelerator.is_local_main_process):
        indices = list(range(j * args.shard_size, min((j + 1) * args.shard_size, total)))
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, indices),
            batch_size=args.batch_size,
            num_workers=args.dataloader_num_workers,
        )
        out = {k: [] for k in ("mean", "std", "mean_flip", "std_flip", "labels", "indices")}
        for pixels, labels, idx, ok in loader:
            skipped += int((~ok).sum())
            pixels = pixels[ok].to(accelerator.device)
            if channels_last:
                pixels = pixels.contiguous(memory_format=torch.channels_last)
            if len(pixels) == 0:
                continue
            views = [("", pixels)] + ([("_flip", pixels.flip(-1))] if args.flip else [])
            with torch.no_grad(), accelerator.autocast():
                for suffix, x in views:
                    post = ae.encode(vae, x)
                    out["mean" + suffix].append(post.mean.to(dtype).cpu())
                    if post.std is not None:
                        out["std" + suffix].append(post.std.to(dtype).cpu())
            out["labels"].append(labels[ok])
            out["indices"].append(idx[ok])
        tensors = {k: torch.cat(v).contiguous() for k, v in out.items() if v}
        if "labels" not in tensors:  # every image of this shard was unreadable
            tensors = {"labels": torch.zeros(0, dtype=torch.int64), "indices": torch.zeros(0, dtype=torch.int64)}
        tmp = shard_path[j] + ".tmp"
        save_file(tensors, tmp, metadata={"skipped": str(len(indices) - len(tensors.get("labels", [])))})
        os.replace(tmp, shard_path[j])  # atomic: a killed run never leaves a half shard behind
    accelerator.wait_for_everyone()

    # Statistics over every shard (also those of earlier runs), then metadata.json
    if accelerator.is_main_process:
        write_metadata(args, config, fingerprint, dataset.names, shard_path, total, f)
    accelerator.end_training()


def write_metadata(args, config, fingerprint, names, shard_paths, total, compression):
    """Per-channel mean/std of the posterior means (float64 sums over all shards) and the dataset description."""
    count, s1, s2, skipped, stored = 0, None, None, 0, 0
    has_std = False
    for path in shard_paths:
        with safe_open(path, "pt") as fh:  # reads only the means, not the stds and flips
            skipped += int((fh.metadata() or {}).get("skipped", 0))
            if "mean" not in fh.keys():  # an all-unreadable shard
                continue
            has_std = "std" in fh.keys()
            mean = fh.get_tensor("mean").double()  # (N, C, h, w)
        dims = [0] + list(range(2, mean.ndim))
        s1 = mean.sum(dims) if s1 is None else s1 + mean.sum(dims)
        s2 = mean.square().sum(dims) if s2 is None else s2 + mean.square().sum(dims)
        count += mean.numel() // mean.shape[1]
        stored += mean.shape[0]
    channel_mean = s1 / count
    channel_std = (s2 / count - channel_mean.square()).clamp_min(1e-12).sqrt()
    latent = args.resolution // compression
    meta = {
        "ae": args.pretrained_model_name_or_path + (f" (subfolder {args.subfolder})" if args.subfolder else ""),
        "ae_class": config["_class_name"],
        "ae_fingerprint": fingerprint,
        "resolution": args.resolution,
        "latent_shape": [ae.latent_channels(config), latent, latent],
        "num_samples": stored,
        "skipped_images": skipped,
        "num_classes": len(names),
        "id2label": {str(i): n for i, n in enumerate(names)},
        "latents_mean": channel_mean.tolist(),
        "latents_std": channel_std.tolist(),
        "has_std": has_std,
        "flip": bool(args.flip),
        "shards": [os.path.basename(p) for p in shard_paths],
        "dataset": "embedded scikit-image photographs"
        if args.embedded_data
        else (args.dataset_name or args.train_data_dir),
        "requested_samples": total,
    }
    with open(os.path.join(args.output_dir, "metadata.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    logger.info(f"Wrote {stored} latents ({skipped} unreadable images skipped) to {args.output_dir}")


if __name__ == "__main__":
    main(parse_args())
