#!/usr/bin/env python
"""Encode an image or video dataset into autoencoder latents for latent-DiT training (fast-DiT style pre-extraction).

For every image we store the posterior mean and std (so the DiT draws a fresh latent sample every step, as the paper
trains on posterior samples, App. B), optionally those of the horizontally flipped image too, and the class label,
as safetensors shards. ``metadata.json`` records the autoencoder (by a fingerprint of its *weights*: a vanilla AE and
its SE fine-tune share a config), the class names and the per-channel mean and std of the posterior samples the DiT
normalises with (the latents it sees, as the authors' code computes them; the std of the posterior means alone is
recorded too); every shard's header records the fingerprint and the extraction settings too (the format:
``diffusability_hf.data.latents``). With no arguments it encodes crops of the photographs that ship inside scikit-image
with the toolkit's embedded autoencoder (class = source photograph), offline:

    accelerate launch train_scripts/extract_latents.py --output_dir latents

A video autoencoder encodes random ``--num_frames`` clips (App. B: random 17-frame clips for CogVideoX-AE; the frame
rule of the AE is checked first) of ``--video_data_dir`` (one subfolder of videos per class) or of an HF video dataset
(``--video_dataset_name``, ``--label_column``); with no data at all, camera pans over the embedded photographs
(class = photograph). Its shards hold ``(N, C, T', h, w)`` posteriors; ``--per_position_statistics`` records the
statistics per latent element (the authors' per (t, c, h, w) option) instead of per channel.

Web-scale data streams (``diffusability_hf.data.streaming``): webdataset tar shards (``--train_data_files
'shards/{000000..000127}.tar'``, ``--video_data_files`` or a ``--train_data_dir`` / ``--video_data_dir`` of ``*.tar``;
labels from ``.cls``, ``.txt`` or ``.json`` members) and, with ``--streaming``, HF datasets read with
``load_dataset(..., streaming=True)``. Input shard ``j`` becomes latent shard ``j``, encoded whole by one process;
its rows' ``indices`` are stable sample ids (``shard * 10**9 + position``).

Resumable: each shard covers a fixed slice of the dataset (or one input shard) and is written atomically, so a rerun
(with any number of processes) encodes only the missing shards. A folder holding latents of other autoencoder weights or other settings
(resolution, flip, dataset, sample count, shard size, dtype) is refused before anything is encoded;
``--overwrite_output_dir`` deletes them and extracts again. Under ``accelerate launch`` every process writes its own
shards.
"""

import argparse
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusability_hf import autoencoders as ae
from diffusability_hf.cpu import use_all_cpu_cores
from diffusability_hf.data.extraction import ExtractionItems
from diffusability_hf.data.latents import (
    check_existing_latents,
    remove_latents,
    shard_name,
    write_metadata,
    write_shard,
)
from diffusability_hf.data.training import DataSource
from diffusability_hf.errors import MissingPathError, UsageError, run_script
from diffusability_hf.files import report_written
from diffusability_hf.training.launch import given_flags

logger = get_logger(__name__)

EMBEDDED_AE = ae.EMBEDDED_AE
# Without any data: crops of the embedded photographs, under any flag given explicitly; for a video AE, camera pans
# over them, sized for a few CPU minutes (9 frames fit 1 + 4k and 1 + 8k AEs; the paper's clips have 17)
EMBEDDED_DATA = dict(resolution=64, max_samples=1024)
EMBEDDED_VIDEO = dict(max_samples=256, num_frames=9)
EMBEDDED_DATASET = "embedded scikit-image photographs"


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
        "--train_data_dir",
        type=str,
        default=None,
        help="An image folder whose subfolders are the classes, or a folder (or URL) of webdataset tar shards.",
    )
    # Streaming (web-scale data: diffusability_hf.data.streaming)
    parser.add_argument(
        "--streaming",
        action="store_true",
        help="Read --dataset_name / --video_dataset_name (Hub, or a packaged builder such as 'parquet' with "
        "--train_data_files) or an image folder --train_data_dir with load_dataset(..., streaming=True): one latent "
        "shard per HF shard (usually a data file). Tar shards always stream.",
    )
    parser.add_argument(
        "--train_data_files",
        type=str,
        nargs="+",
        default=None,
        help="Webdataset tar shards of images (paths or URLs with brace expansion and globs, e.g. "
        "'shards/{000000..000127}.tar'; quoted), one latent shard each. With --streaming and --dataset_name, that "
        "builder's data files.",
    )
    parser.add_argument(
        "--video_data_files", type=str, nargs="+", default=None, help="Webdataset tar shards of videos, as above."
    )
    parser.add_argument(
        "--class_names",
        type=str,
        nargs="+",
        default=None,
        help="Tar shards: the class names in label order (needed for '.txt' labels that are names; default: the "
        "integer labels found, as '0', '1', ...).",
    )
    parser.add_argument(
        "--decode_threads", type=int, default=0, help="Streams: threads decoding samples ahead (default: none)."
    )
    parser.add_argument("--image_column", type=str, default=None, help="Image column (default: the first Image one).")
    parser.add_argument("--label_column", type=str, default="label", help="Class label column.")
    # Video data (video autoencoders)
    parser.add_argument(
        "--video_data_dir",
        type=str,
        default=None,
        help="A folder of videos (or frame folders), one subfolder per class.",
    )
    parser.add_argument("--video_dataset_name", type=str, default=None, help="HF dataset with a Video column.")
    # The video column and frame flags of train_ae_se.py
    # Copied from train_scripts/train_ae_se.py
    parser.add_argument("--video_column", type=str, default=None, help="Video column (default: the first Video one).")
    parser.add_argument(
        "--num_frames",
        type=int,
        default=17,
        help="Frames per clip (paper: %(default)s; must fit the AE, e.g. 1 + 8k).",
    )
    parser.add_argument("--frame_stride", type=int, default=1, help="Take every N-th frame of a video.")
    # End copy
    parser.add_argument("--seed", type=int, default=0, help="Seed of the clips' random start frames.")
    parser.add_argument(
        "--per_position_statistics",
        action="store_true",
        help="Record the latent statistics per element (c, [t,] h, w), the authors' code's option, not per channel.",
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where datasets and models are cached.")
    parser.add_argument(
        "--resolution",
        type=int,
        default=256,
        help="Centre-crop side (default: %(default)s; embedded photographs: 64).",
    )
    parser.add_argument(
        "--flip", action="store_true", help="Also store the latents of the horizontally flipped image."
    )
    parser.add_argument(
        "--max_samples", type=int, default=None, help="Encode at most this many images (default: all; embedded: 1024)."
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Images per encoder call.")
    parser.add_argument("--shard_size", type=int, default=1024, help="Images per shard file.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    parser.add_argument("--dtype", type=str, default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="Autocast for encoding."
    )
    parser.add_argument("--output_dir", type=str, default="latents", help="Where shards and metadata.json go.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Delete the shards and metadata.json already in --output_dir and extract again. Without it, a folder "
        "holding latents of other autoencoder weights or other settings is refused, and one of the same resumes.",
    )
    args = parser.parse_args(input_args)

    # Settings: an explicit flag, else the embedded photographs' preset (without a dataset), else the argparse default
    sources = [
        f
        for f in ("dataset_name", "train_data_dir", "video_data_dir", "video_dataset_name", "video_data_files")
        if getattr(args, f)
    ]
    if args.train_data_files and not args.dataset_name:  # tar shards; with --dataset_name, that builder's files
        sources.append("train_data_files")
    if not sources:
        parser.set_defaults(**EMBEDDED_DATA)
        args = parser.parse_args(input_args)
    args.embedded_data = not sources
    args.given = given_flags(parser, input_args, args)  # a video AE's embedded sizing applies under these (below)
    if len(sources) > 1:
        parser.error(f"Give one data source, not {' and '.join('--' + f for f in sources)}.")
    if args.num_frames < 1 or args.frame_stride < 1:
        parser.error("--num_frames and --frame_stride must be positive.")
    if args.train_data_files and args.dataset_name and not args.streaming:
        parser.error(
            "--train_data_files with --dataset_name names that builder's data files, which are streamed: add "
            "--streaming (or drop --dataset_name to read --train_data_files as webdataset tar shards)."
        )
    if args.streaming and not sources:
        parser.error(
            "--streaming needs data to stream: --dataset_name, --train_data_dir, --train_data_files, "
            "--video_dataset_name, --video_data_dir or --video_data_files."
        )
    if args.decode_threads < 0:
        parser.error("--decode_threads must be >= 0.")
    if is_stream(args):
        for flag in ("max_samples", "shard_size"):
            if flag in args.given:
                parser.error(
                    f"--{flag} does not apply to a stream, which is encoded whole, one latent shard per input shard: "
                    "name fewer shards with --train_data_files / --video_data_files instead."
                )
    if args.pretrained_model_name_or_path is None:
        args.pretrained_model_name_or_path = EMBEDDED_AE
    for flag in ("resolution", "batch_size", "shard_size"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive.")
    # The one read of the AE's config (main uses it too); a video AE on the embedded data encodes the camera pans,
    # sized for a CPU (the flags given win)
    args.vae_config = ae.pretrained_config(
        args.pretrained_model_name_or_path, args.subfolder, args.revision, args.cache_dir
    )
    if args.embedded_data and ae.get_row(args.vae_config).video:
        vars(args).update({k: v for k, v in EMBEDDED_VIDEO.items() if k not in args.given})
    return args


def data_source(args, video: bool) -> DataSource:
    """The images (clips for ``video``) as the flags give them: a stream for tar shards, or for an HF dataset or
    a folder with --streaming."""
    if video:
        return DataSource(args.video_dataset_name, args.video_data_dir, args.video_data_files, args.video_column,
                          args.dataset_config_name, args.streaming)  # fmt: skip
    return DataSource(args.dataset_name, args.train_data_dir, args.train_data_files, args.image_column,
                      args.dataset_config_name, args.streaming)  # fmt: skip


def is_stream(args) -> bool:
    """Whether the data is read as a stream: tar shards, or an HF dataset / folder with --streaming."""
    return data_source(args, False).streamed or data_source(args, True).streamed


def data_description(args) -> str:
    """The data for people (metadata.json's ``dataset``)."""
    if args.embedded_data:
        return EMBEDDED_DATASET
    files = " ".join(args.train_data_files or args.video_data_files or [])
    name = args.dataset_name or args.video_dataset_name
    if name and files:
        return f"{name} ({files})"
    return name or args.train_data_dir or args.video_data_dir or files


def extraction_settings(
    args, fingerprint: str, dataset_size: int, total: int, mixed_precision: str, is_video: bool = False
) -> dict:
    """Everything that decides the content of a shard: shards (and metadata.json) of one folder must agree on it.

    ``ae_weights_fingerprint`` names the autoencoder by its *weights* (a vanilla AE and its SE fine-tune share a
    config); the dataset is named by its absolute path or Hub id, its size and the columns read.
    """
    dataset = data_description(args)
    if (args.train_data_dir or args.video_data_dir) and "://" not in (args.train_data_dir or args.video_data_dir):
        dataset = os.path.abspath(args.train_data_dir or args.video_data_dir)
    video = {"num_frames": args.num_frames, "frame_stride": args.frame_stride, "seed": args.seed}
    return {
        **(video if is_video else {}),
        "ae_weights_fingerprint": fingerprint,
        "resolution": args.resolution,
        "flip": bool(args.flip),
        "dataset": dataset,
        "dataset_config_name": args.dataset_config_name,
        "split": args.split,
        "image_column": args.video_column if is_video else args.image_column,
        "label_column": args.label_column,
        "dataset_size": dataset_size,
        "requested_samples": total,
        "shard_size": args.shard_size,
        "dtype": args.dtype,
        "mixed_precision": mixed_precision,
    }


def main(args):
    use_all_cpu_cores()
    # Validate cheap things before any weights or data
    for flag in ("train_data_dir", "video_data_dir"):
        path = getattr(args, flag)
        if path is not None and "://" not in path and not os.path.isdir(path):
            raise MissingPathError(f"--{flag} {getattr(args, flag)} is not a folder.")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} is a file, not a folder.")
    config = args.vae_config
    f = ae.spatial_compression(config)
    if args.resolution % f:
        lo = args.resolution // f * f
        raise ValueError(
            f"--resolution {args.resolution} is not divisible by the AE's compression {f}: use {lo or f}."
        )
    # Clips for a video AE given video data or no data (camera pans); images (1-frame videos) for image data
    video_data = any(x is not None for x in (args.video_data_dir, args.video_dataset_name, args.video_data_files))
    is_video = ae.get_row(config).video and (video_data or args.embedded_data)
    if video_data and not ae.get_row(config).video:
        raise UsageError(
            f"{config['_class_name']} is an image autoencoder, but --video_data_dir / --video_dataset_name give "
            "clips: pass a video autoencoder, or images with --train_data_dir / --dataset_name."
        )
    if is_video:
        ae.check_num_frames(config, args.num_frames)  # before any weights: diffusers would drop or pad frames

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # The items, as the latent shards they become: a dataset cut into --shard_size rows, or a stream's input shards
    items = ExtractionItems(
        data_source(args, is_video), video=is_video, resolution=args.resolution, num_frames=args.num_frames,
        frame_stride=args.frame_stride, seed=args.seed, shard_size=args.shard_size, max_samples=args.max_samples,
        label_column=args.label_column, split=args.split, cache_dir=args.cache_dir, class_names=args.class_names,
        decode_threads=args.decode_threads,
    )  # fmt: skip
    total, num_shards = items.total, items.num_shards
    shard_path = [os.path.join(args.output_dir, shard_name(j)) for j in range(num_shards)]

    # The autoencoder, named by its weights; an existing folder must hold latents of these weights and settings
    vae = ae.prepare_for_training(
        ae.model_class(config).from_pretrained(
            args.pretrained_model_name_or_path, subfolder=args.subfolder, revision=args.revision,
            variant=args.variant, cache_dir=args.cache_dir,
        )
    ).eval().requires_grad_(False)  # fmt: skip
    fingerprint = ae.weights_fingerprint(vae)
    settings = extraction_settings(args, fingerprint, items.dataset_size, total, accelerator.mixed_precision, is_video)
    settings.update(items.identity())  # a stream: its input shards
    ae_name = args.pretrained_model_name_or_path + (f" (subfolder {args.subfolder})" if args.subfolder else "")
    if args.overwrite_output_dir:
        if accelerator.is_main_process and os.path.isdir(args.output_dir):
            remove_latents(args.output_dir)
    else:
        check_existing_latents(args.output_dir, settings, ae_name)
    accelerator.wait_for_everyone()  # every process has checked (or the old latents are gone) before any writes
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    todo = [j for j in range(num_shards) if not os.path.isfile(shard_path[j])]
    accelerator.wait_for_everyone()  # every process lists the missing shards before any writes one
    mine = todo[accelerator.process_index :: accelerator.num_processes]
    what = "clips" if is_video else "images"
    logger.info(
        f"{f'{total} {what}' if total is not None else f'A stream of {what}'} in {num_shards} shards; "
        f"{num_shards - len(todo)} already written, {len(mine)} for this process"
    )

    # Encode
    vae = vae.to(accelerator.device)
    # Channels-last convolutions are markedly faster for 2D AEs (oneDNN on CPU, tensor cores on GPU)
    channels_last = ae.get_row(config).layout == "image"
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last)
    dtype = getattr(torch, args.dtype)
    for j in tqdm(mine, desc="Shards", disable=not accelerator.is_local_main_process):
        loader = torch.utils.data.DataLoader(  # (pixels, label, sample id, ok)
            items.shard(j), batch_size=args.batch_size, num_workers=args.dataloader_num_workers
        )
        out = {k: [] for k in ("mean", "std", "mean_flip", "std_flip", "labels", "indices")}
        seen = 0
        for pixels, labels, idx, ok in loader:
            seen += len(ok)
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
        write_shard(shard_path[j], tensors, settings, skipped=seen - len(tensors["labels"]))
    accelerator.wait_for_everyone()

    # Statistics over every shard (also those of earlier runs), then metadata.json
    if accelerator.is_main_process:
        names = [os.path.basename(p) for p in shard_path]
        latent = args.resolution // f
        frames = [ae.latent_num_frames(config, args.num_frames)] if is_video else []  # T' of a clip
        class_names = items.class_names(shard_path)
        meta = write_metadata(
            args.output_dir, names, settings, ae=ae_name, ae_class=config["_class_name"],
            latent_shape=[ae.latent_channels(config), *frames, latent, latent], class_names=class_names,
            dataset=data_description(args), requested_samples=total, per_position=args.per_position_statistics,
            num_frames=args.num_frames if is_video else None,
        )  # fmt: skip
        logger.info(
            f"Wrote {meta['num_samples']} latents ({meta['skipped_images']} unreadable images skipped) to "
            f"{args.output_dir}"
        )
        more = f" and {len(names) - 3} more shards (to {names[-1]})" if len(names) > 3 else ""
        report_written(args.output_dir, ["metadata.json", *names[:3]], log=lambda text: logger.info(text + more))
    accelerator.wait_for_everyone()  # no process tears down the process group while another still works
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main, parse_args)
