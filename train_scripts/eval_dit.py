#!/usr/bin/env python
"""Sample a class-conditional pipeline and score it against real data: FID (Inception), FDD (DINOv2) and, for
clips, FVD (I3D), as in the paper's Tables 1-3.

    accelerate launch train_scripts/eval_dit.py --pipeline ./dit-flux-se \\
        --num_samples 50000 --batch_size 125 \\
        --reference_dataset_name ILSVRC/imagenet-1k --reference_split train --num_reference 50000 \\
        --output_dir eval_dit

1. Samples: ``--num_samples`` images from a saved :class:`DiTFlowMatchPipeline` (classes drawn at random, the
   paper's "no class balancing", or ``--class_sampling balanced``: ``i % K``), written as PNGs to
   ``<output_dir>/samples``. Sample ``i`` has its own noise generator (seed ``--seed`` and ``i``), so it starts from
   the same noise whatever the batch size, the number of processes or an interruption (other batch compositions
   change only float round-off: a rare pixel one level off), and a rerun only makes the missing files.
   ``samples/provenance.json`` records the pipeline's weights fingerprints (transformer and vae) and every sampling
   setting; samples made by another pipeline or with other settings are refused before any sampling
   (``--overwrite_output_dir`` deletes them and samples again).
   Or ``--samples_dir``: score images or clips made elsewhere (a video generator's clips for FVD).
2. Reference statistics: the features' mean and covariance over ``--num_reference`` real images or clips, cached in
   ``--stats_cache_dir`` under a key of the source, count, resolution, frames and extractor weights (or given as
   ``--reference_stats`` ``.npz`` files). With no reference given, the embedded training crops (the default DiT
   demo's data) are the reference.
3. Frechet distances in float64; ``metrics.json`` and ``metrics.md`` record every setting the number depends on
   (``metrics.json`` also the pipeline's fingerprints and, when the pipeline records it, the fingerprint of the
   autoencoder its training latents came from); ``samples_grid.png`` shows samples with one row per class.

An ``--output_dir`` that holds a finished run's results is refused unless ``--overwrite_output_dir``; to score its
samples again against another reference, pass ``--samples_dir <output_dir>/samples`` and a new ``--output_dir``.

Offline: ``--inception_weights``, ``--dinov2_model``, ``--i3d_model`` take local weights and ``--feature_extractor``
takes any small local model (a transformers folder or a TorchScript file).
"""

import argparse
import hashlib
import json
import logging
import os
import shutil

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from diffusability_hf import autoencoders as ae
from diffusability_hf.data import EvalSamples, evaluation_samples, read_clip
from diffusability_hf.figures import labelled_image_grid, save_png
from diffusability_hf.hub import markdown_table
from diffusability_hf.metrics import (
    FeatureStatistics,
    frechet_distance,
    load_feature_extractor,
    load_statistics,
    to_uint8,
)
from diffusability_hf.training_utils import (
    UsageError,
    atomic_write_json,
    atomic_write_text,
    check_output_dir,
    report_written,
    run_script,
    use_all_cpu_cores,
)

logger = get_logger(__name__)

# What a finished run leaves in --output_dir (a second run into it needs --overwrite_output_dir); samples/ is not one
# of them: an interrupted run resumes there (only the missing samples are made) when its provenance matches
RESULTS = ("metrics.json", "metrics.md", "samples_grid.png")
PROVENANCE = "provenance.json"  # in samples/: which pipeline weights and sampling settings made the samples

DEFAULT_STATS_CACHE = os.path.join(
    os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")),
    "diffusability_hf",
    "reference_stats",
)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # What to score
    parser.add_argument("--pipeline", type=str, default=None, help="A saved DiTFlowMatchPipeline folder to sample.")
    parser.add_argument(
        "--samples_dir", type=str, default=None, help="Score these images (a folder) or clips (with --num_frames)."
    )
    parser.add_argument(
        "--num_samples",
        type=int,
        default=None,
        help="Samples to make/score (default 50000; 256 with the embedded reference).",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="Samples per pipeline call and per feature batch.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=256,
        help="Euler steps per sample (default %(default)s: the paper's quantitative protocol, Sec. 4 'Inference "
        "details'; Table 3's ablations use 80).",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=1.0,
        help="Classifier-free guidance (default 1 = off: the paper's tables are without guidance, Sec. 4; its "
        "sample figures use 3.0).",
    )
    parser.add_argument(
        "--guidance_interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("SIGMA_MIN", "SIGMA_MAX"),
        help="Guide only the steps whose noise level sigma (1 = noise, 0 = data) is in [SIGMA_MIN, SIGMA_MAX] "
        "(Kynkanniemi et al., 2024; the authors' sampler's t_min/t_max). Default: every step.",
    )
    parser.add_argument("--shift", type=float, default=None, help="Time shift of eq. 3 (default: the scheduler's).")
    parser.add_argument(
        "--class_sampling",
        type=str,
        default="random",
        choices=["random", "balanced"],
        help="Labels drawn uniformly with --seed (the paper's protocol: 'without any optimization for class "
        "balancing', Sec. 4) or i %% K (balanced).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the noise (per sample) and random labels.")
    parser.add_argument(
        "--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="Autocast for sampling."
    )
    # Reference data
    parser.add_argument("--reference_dataset_name", type=str, default=None, help="HF image dataset of real images.")
    parser.add_argument("--reference_dataset_config_name", type=str, default=None, help="Its config.")
    parser.add_argument("--reference_split", type=str, default=None, help="Its split (default: validation).")
    parser.add_argument("--reference_data_dir", type=str, default=None, help="A local folder of real images.")
    parser.add_argument("--reference_image_column", type=str, default=None, help="Image column of the dataset.")
    parser.add_argument("--reference_video_dir", type=str, default=None, help="A folder of real videos (FVD).")
    parser.add_argument("--reference_video_dataset_name", type=str, default=None, help="HF dataset of real videos.")
    parser.add_argument("--reference_video_column", type=str, default=None, help="Its video column.")
    parser.add_argument(
        "--reference_stats",
        type=str,
        nargs="+",
        default=None,
        help="Precomputed reference statistics (.npz with mu and sigma), one per --feature_extractor, in order.",
    )
    parser.add_argument("--num_reference", type=int, default=None, help="Real images/clips (default: --num_samples).")
    parser.add_argument(
        "--resolution", type=int, default=None, help="Crop side of the reference (default: the samples')."
    )
    parser.add_argument("--num_frames", type=int, default=None, help="Frames per clip (clips are scored when given).")
    parser.add_argument("--frame_stride", type=int, default=1, help="Take every n-th frame of reference videos.")
    parser.add_argument(
        "--stats_cache_dir", type=str, default=DEFAULT_STATS_CACHE, help="Where reference statistics are cached."
    )
    parser.add_argument("--cache_dir", type=str, default=None, help="Where datasets and Hub models are cached.")
    # Feature extractors
    parser.add_argument(
        "--feature_extractor",
        type=str,
        nargs="+",
        default=None,
        help="'inception' (FID), 'dinov2' (FDD), 'i3d' (FVD) or local paths (transformers folder or TorchScript file). "
        "Default: inception dinov2 (+ i3d for clips), the paper's metrics.",
    )
    parser.add_argument("--inception_weights", type=str, default=None, help="Local torch-fidelity Inception weights.")
    parser.add_argument(
        "--dinov2_model", type=str, default="facebook/dinov2-large", help="DINOv2 for FDD: Hub id or local folder."
    )
    parser.add_argument("--i3d_model", type=str, default=None, help="Local StyleGAN-V i3d_torchscript.pt for FVD.")
    parser.add_argument("--output_dir", type=str, default="eval_dit", help="Where samples, tables and JSON go.")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace an earlier run's results in --output_dir and delete its samples (without it a finished run's "
        "folder, or samples of another pipeline or other sampling settings, are refused).",
    )
    args = parser.parse_args(input_args)

    if (args.pipeline is None) == (args.samples_dir is None):
        parser.error("Give --pipeline (to sample it) or --samples_dir (to score existing samples), one of them.")
    if args.samples_dir is not None and not os.path.isdir(args.samples_dir):
        parser.error(f"--samples_dir {args.samples_dir} is not a folder.")
    if args.pipeline is not None and not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        parser.error(f"--pipeline {args.pipeline} has no model_index.json: give the folder of a saved pipeline.")
    if args.pipeline is not None and args.num_frames is not None:
        parser.error("The DiT pipeline makes images: score clips with --samples_dir and --num_frames.")
    sources = [
        args.reference_dataset_name,
        args.reference_data_dir,
        args.reference_video_dir,
        args.reference_video_dataset_name,
    ]
    if sum(s is not None for s in sources) > 1:
        parser.error("Give one reference source.")
    args.reference_video = args.reference_video_dir is not None or args.reference_video_dataset_name is not None
    if args.reference_video and args.num_frames is None:
        parser.error("A video reference needs --num_frames (16 is the FVD convention).")
    args.embedded_reference = all(s is None for s in sources) and args.reference_stats is None
    if args.num_samples is None:
        args.num_samples = 256 if args.embedded_reference else 50000
    if args.num_reference is None:
        args.num_reference = args.num_samples
    if args.feature_extractor is None:
        args.feature_extractor = (["i3d"] if args.num_frames else []) + ["inception", "dinov2"]
    if "i3d" in args.feature_extractor and not args.num_frames:
        parser.error("--feature_extractor i3d (FVD) needs clips: score a folder of clips with --num_frames.")
    if args.reference_stats is not None and len(args.reference_stats) != len(args.feature_extractor):
        parser.error("Give one --reference_stats file per --feature_extractor, in the same order.")
    if args.guidance_interval is not None:
        if args.guidance_scale <= 1:
            parser.error("--guidance_interval needs --guidance_scale > 1 (1 = no guidance).")
        if not 0 <= args.guidance_interval[0] <= args.guidance_interval[1] <= 1:
            parser.error("--guidance_interval SIGMA_MIN SIGMA_MAX needs 0 <= SIGMA_MIN <= SIGMA_MAX <= 1.")
    for flag in ("num_samples", "num_reference", "batch_size", "num_inference_steps", "frame_stride"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive.")
    if min(args.num_samples, args.num_reference) < 2:
        parser.error("A covariance needs at least 2 samples and 2 reference items.")
    return args


def load_extractors(args, device):
    extractors = {}
    for spec in args.feature_extractor:
        ext = load_feature_extractor(
            spec,
            args.inception_weights,
            args.dinov2_model,
            args.i3d_model,
            args.cache_dir,
        ).to(device)
        if ext.video and not args.num_frames:
            raise ValueError(f"--feature_extractor {spec} scores clips ({ext.metric}): give clips and --num_frames.")
        extractors[ext.metric] = ext
    return extractors


@torch.no_grad()
def feature_statistics(dataset, extractors, args, accelerator, desc):
    """Statistics of every extractor over a dataset of ``(pixels, ok)``, split between processes and merged."""
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=args.batch_size, num_workers=args.dataloader_num_workers
    )
    stats = {name: FeatureStatistics() for name in extractors}
    skipped = 0
    for pixels, ok in tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        skipped += int((~ok).sum())
        pixels = to_uint8(pixels[ok])
        if len(pixels):
            for name, ext in extractors.items():
                stats[name].update(ext(pixels))
    merged = {name: FeatureStatistics.merge(gather_object([stats[name]])) for name in extractors}
    return merged, sum(gather_object([skipped]))


def reference_source(args):
    """What the reference is, as kwargs of :func:`evaluation_samples` and a description for the cache key."""
    kwargs = dict(
        dataset_name=args.reference_dataset_name,
        data_dir=args.reference_data_dir,
        image_column=args.reference_image_column,
        dataset_config_name=args.reference_dataset_config_name,
        split=args.reference_split,
        cache_dir=args.cache_dir,
        video_data_dir=args.reference_video_dir,
        video_dataset_name=args.reference_video_dataset_name,
        video_column=args.reference_video_column,
        num_frames=args.num_frames,
        frame_stride=args.frame_stride,
        embedded_split="train",
    )
    key = {k: v for k, v in kwargs.items() if k != "cache_dir"}
    if args.reference_data_dir or args.reference_video_dir:  # a local folder: its absolute path
        key["path"] = os.path.abspath(args.reference_data_dir or args.reference_video_dir)
    return kwargs, key


def reference_statistics(args, extractors, accelerator):
    """Per extractor ``(mu, sigma, n, statistics file, description)``: from ``--reference_stats``, the cache, or computed and cached."""
    if args.reference_stats is not None:
        out = {}
        for (name, _), path in zip(extractors.items(), args.reference_stats):
            s = load_statistics(path)
            out[name] = (s["mu"], s["sigma"], s["n"], path, s["meta"].get("description", path))
        return out
    kwargs, key = reference_source(args)
    key.update(num=args.num_reference, resolution=args.resolution)
    out, todo = {}, {}
    for name, ext in extractors.items():
        digest = hashlib.sha256(
            json.dumps({**key, "extractor": ext.fingerprint}, sort_keys=True, default=str).encode()
        )
        path = os.path.join(args.stats_cache_dir, f"{name}-{digest.hexdigest()[:20]}.npz")
        if os.path.isfile(path):
            s = load_statistics(path)
            logger.info(f"{name}: cached reference statistics {path}")
            out[name] = (s["mu"], s["sigma"], s["n"], path, s["meta"].get("description", ""))
        else:
            todo[name] = (ext, path)
    if todo:
        dataset = evaluation_samples(args.resolution, args.num_reference, **kwargs)
        stats, skipped = feature_statistics(
            dataset, {k: v[0] for k, v in todo.items()}, args, accelerator, "Reference"
        )
        for name, (_, path) in todo.items():
            if stats[name].n < 2:
                raise ValueError(f"The reference source gave {stats[name].n} readable items: check it.")
            if accelerator.is_main_process:
                os.makedirs(args.stats_cache_dir, exist_ok=True)
                stats[name].save(path, {**key, "description": dataset.description, "skipped": skipped})
            out[name] = (stats[name].mu, stats[name].sigma, stats[name].n, path, dataset.description)
        accelerator.wait_for_everyone()
    return out


def sample_labels(args, num_classes):
    """Class of every sample: ``i % K`` (balanced) or uniform draws seeded by ``--seed``."""
    if args.class_sampling == "balanced":
        return [i % num_classes for i in range(args.num_samples)]
    return np.random.default_rng(args.seed).integers(0, num_classes, size=args.num_samples).tolist()


def pipeline_provenance(pipe) -> dict:
    """The pipeline's weights (``weights_fingerprint`` of its transformer and vae) and, when the pipeline records it,
    the fingerprint of the autoencoder whose latents the transformer was trained on."""
    recorded = dict(pipe.config.get("provenance") or {})
    out = {
        "transformer": ae.weights_fingerprint(pipe.transformer),
        "vae": ae.weights_fingerprint(pipe.vae),
        "latents_autoencoder": recorded.get("latents_ae_weights_fingerprint"),
    }
    if recorded.get("vae_weights_fingerprint") not in (None, out["vae"]):
        logger.warning(
            f"The pipeline records vae weights {recorded['vae_weights_fingerprint']} but its vae has {out['vae']}: it "
            "does not decode with the autoencoder it was saved with."
        )
    return out


def sample_names(folder):
    """The sample PNGs already in ``folder`` (not the temporary files of an interrupted write)."""
    if not os.path.isdir(folder):
        return []
    return sorted(n for n in os.listdir(folder) if n.endswith(".png") and not n.endswith(".tmp.png"))


def check_samples(folder, provenance, labels, overwrite):
    """Refuse, before any sampling, samples in ``folder`` that another pipeline or other settings made.

    Samples are reused (only the missing ones are made) when ``samples/provenance.json`` names the same pipeline
    weights and sampling settings and every existing sample has the class this run gives it; with ``overwrite``
    they are deleted by the caller instead.
    """
    existing = sample_names(folder)
    if not existing or overwrite:
        return
    again = "choose a new --output_dir, or pass --overwrite_output_dir to delete them and sample again."
    path = os.path.join(folder, PROVENANCE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, "labels.json")):
        raise UsageError(
            f"{folder} holds {len(existing)} samples of unknown origin (no {PROVENANCE} and labels.json: made by "
            f"hand or by an earlier version of this script), which this run would score as its own: {again}"
        )
    with open(path) as fh:
        old = json.load(fh)
    with open(os.path.join(folder, "labels.json")) as fh:
        old_labels = json.load(fh)
    differ = [f"{k} weights" for k in ("transformer", "vae") if old["pipeline"].get(k) != provenance["pipeline"][k]]
    settings = provenance["settings"]
    differ += [
        f"{k} {old['settings'].get(k)} -> {settings.get(k)}"
        for k in sorted(set(old["settings"]) | set(settings))
        if old["settings"].get(k) != settings.get(k)
    ]
    relabelled = [
        n
        for n in existing
        if n[:-4].isdigit() and int(n[:-4]) < len(labels) and old_labels.get(n) != labels[int(n[:-4])]
    ]
    if relabelled:
        differ.append(f"the classes of {len(relabelled)} samples (e.g. {relabelled[0]})")
    if differ:
        raise UsageError(
            f"{folder} holds {len(existing)} samples made by another pipeline or with other sampling settings "
            f"({', '.join(differ)}); reusing them would score the wrong samples: {again}"
        )


def make_samples(args, accelerator):
    """Write the missing ``samples/{i:06d}.png``; returns ``(samples folder, provenance, image size)``."""
    from diffusability_hf.pipelines import DiTFlowMatchPipeline

    folder = os.path.join(args.output_dir, "samples")
    pipe = DiTFlowMatchPipeline.from_pretrained(args.pipeline).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    labels = sample_labels(args, pipe.num_classes)
    size = pipe.transformer.config.sample_size * ae.spatial_compression(pipe.vae)
    # Everything the pixels of sample i depend on (not the batch size or the process count: float round-off only)
    provenance = {
        "pipeline_path": args.pipeline,
        "pipeline": pipeline_provenance(pipe),
        "settings": {
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": float(args.guidance_scale),
            "guidance_interval": args.guidance_interval,
            "shift": float(pipe.scheduler.config.shift if args.shift is None else args.shift),
            "class_sampling": args.class_sampling,
            "seed": args.seed,
            "num_classes": pipe.num_classes,
            "resolution": size,
            "mixed_precision": accelerator.mixed_precision,
        },
        "id2label": pipe.config.get("id2label"),
    }
    check_samples(folder, provenance, labels, args.overwrite_output_dir)  # every process: the same files, read only
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.overwrite_output_dir:  # start over: no sample, table or grid of the earlier run stays
            shutil.rmtree(folder, ignore_errors=True)
            for name in RESULTS:
                if os.path.isfile(os.path.join(args.output_dir, name)):
                    os.remove(os.path.join(args.output_dir, name))
        os.makedirs(folder, exist_ok=True)
        for name in os.listdir(folder):
            if name.endswith(".tmp.png"):  # a write interrupted by a kill
                os.remove(os.path.join(folder, name))
        # Before any sample is written: an interrupted run's samples are attributable on the next run
        old_labels = {}
        if os.path.isfile(os.path.join(folder, "labels.json")):
            with open(os.path.join(folder, "labels.json")) as fh:
                old_labels = json.load(fh)
        atomic_write_json(os.path.join(folder, PROVENANCE), provenance)
        atomic_write_json(
            os.path.join(folder, "labels.json"),
            {**old_labels, **{f"{i:06d}.png": labels[i] for i in range(args.num_samples)}},
            indent=None,
        )
    accelerator.wait_for_everyone()
    paths = [os.path.join(folder, f"{i:06d}.png") for i in range(args.num_samples)]
    missing = [i for i in range(args.num_samples) if not os.path.isfile(paths[i])]
    accelerator.wait_for_everyone()  # every process lists the missing files before any writes one
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    logger.info(f"{args.num_samples - len(missing)} samples already in {folder}; {len(mine)} to make on this process")
    for start in tqdm(
        range(0, len(mine), args.batch_size), desc="Sampling", disable=not accelerator.is_local_main_process
    ):
        batch = mine[start : start + args.batch_size]
        gens = [torch.Generator(accelerator.device).manual_seed(args.seed * 1_000_003 + i) for i in batch]
        with accelerator.autocast():
            images = pipe(
                [labels[i] for i in batch], num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, guidance_interval=args.guidance_interval, shift=args.shift,
                generator=gens, output_type="pt",
            ).images  # fmt: skip
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for i, image in zip(batch, images):
            tmp = paths[i] + ".tmp.png"
            Image.fromarray(image).save(tmp)
            os.replace(tmp, paths[i])  # atomic: an interrupted run leaves no half-written sample
    accelerator.wait_for_everyone()
    del pipe
    return folder, provenance, size


def sample_files(folder, num_samples, video):
    """The first ``num_samples`` images (sorted) or videos/frame folders of a folder."""
    from diffusability_hf.data import IMAGE_EXTENSIONS, list_videos

    if video:
        files = list_videos(folder)
    else:
        files = sorted(
            os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    if len(files) < num_samples:
        raise ValueError(f"{folder} holds {len(files)} samples, fewer than --num_samples {num_samples}.")
    return files[:num_samples]


def check_results(args):
    """Refuse, before anything loads, an ``--output_dir`` that holds a finished run's results."""
    try:
        check_output_dir(args.output_dir, RESULTS, args.overwrite_output_dir)
    except UsageError as err:
        samples = os.path.join(args.output_dir, "samples")
        hint = (
            f" To score its samples again, pass --samples_dir {samples} with a new --output_dir."
            if sample_names(samples)
            else ""
        )
        raise UsageError(str(err) + hint) from None


def samples_grid(files, resolution, labels=None, id2label=None, rows=8, cols=8):
    """Samples with one row per class (the first ``rows`` classes to appear, up to ``cols`` samples each), labelled
    with the class names; without labels, the first ``rows * cols`` files in rows."""
    if labels is None:
        groups = [("", files[i : i + cols]) for i in range(0, min(len(files), rows * cols), cols)]
    else:
        by_class = {}
        for path, label in zip(files, labels):
            if label in by_class or len(by_class) < rows:
                by_class.setdefault(label, [])
                if len(by_class[label]) < cols:
                    by_class[label].append(path)
        names = {int(k): v.split(",")[0] for k, v in (id2label or {}).items()}  # "tench, Tinca tinca" -> "tench"
        groups = [(f"{names.get(int(k), 'class')} ({k})", paths) for k, paths in by_class.items()]
    tiles = [torch.stack([EvalSamples(paths, resolution)[i][0] for i in range(len(paths))]) for _, paths in groups]
    return labelled_image_grid(tiles, [name for name, _ in groups], padding=1)


def main(args):
    use_all_cpu_cores()
    check_results(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)

    # Feature networks first: missing weights fail before any sampling
    extractors = load_extractors(args, accelerator.device)

    # Samples (made here, or a folder made elsewhere: its provenance is reported when this script made it)
    if args.pipeline is not None:
        folder, provenance, size = make_samples(args, accelerator)
    else:
        folder, size = args.samples_dir, None
        provenance = None
        if os.path.isfile(os.path.join(folder, PROVENANCE)):
            with open(os.path.join(folder, PROVENANCE)) as fh:
                provenance = json.load(fh)
    files = sample_files(folder, args.num_samples, bool(args.num_frames))
    if args.resolution is None:  # the samples' own size: nothing is resized
        if size is None and args.num_frames:
            size = min(read_clip(files[0], 1, 1, None, random_start=False).shape[1:3])
        elif size is None:
            with Image.open(files[0]) as im:
                size = min(im.size)
        args.resolution = size
    generated = EvalSamples(files, args.resolution, args.num_frames, 1)
    fake, skipped = feature_statistics(generated, extractors, args, accelerator, "Sample features")

    # Reference statistics (cached) and Frechet distances
    reference = reference_statistics(args, extractors, accelerator)
    results = {}
    for name in extractors:
        mu, sigma, n, source, description = reference[name]
        if fake[name].n < 2:
            raise ValueError(f"Only {fake[name].n} samples could be read from {folder}.")
        results[name] = {
            "value": frechet_distance(fake[name].mu, fake[name].sigma, mu, sigma),
            "num_samples": fake[name].n,
            "num_reference": n,
            "reference_stats": source,
            "reference": description,
        }
    if accelerator.is_main_process:
        written = write_outputs(args, results, provenance, folder, files, skipped)
        for name in set(RESULTS) - set(written):  # --overwrite_output_dir: no stale grid of the earlier run stays
            if os.path.isfile(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
        report_written(args.output_dir, written + (["samples"] if args.pipeline is not None else []))
    accelerator.end_training()


def write_outputs(args, results, provenance, folder, files, skipped):
    """metrics.json, metrics.md and samples_grid.png, each written atomically; returns the names written."""
    os.makedirs(args.output_dir, exist_ok=True)
    settings = (provenance or {}).get("settings", {})
    pipeline = (provenance or {}).get("pipeline", {})
    out = {
        "pipeline": args.pipeline or (provenance or {}).get("pipeline_path"),
        # Provenance: the weights that made the samples and the autoencoder of the DiT's training latents
        "pipeline_fingerprint": {k: pipeline[k] for k in ("transformer", "vae")} if pipeline else None,
        "latents_autoencoder_fingerprint": pipeline.get("latents_autoencoder"),
        "samples_dir": folder,
        "resolution": args.resolution,
        "num_frames": args.num_frames,
        "unreadable_samples": skipped,
        "sampling": settings,
        "reference": reference_source(args)[1] if args.reference_stats is None else args.reference_stats,
        "metrics": results,
    }
    written = ["metrics.json", "metrics.md"]
    atomic_write_json(os.path.join(args.output_dir, "metrics.json"), out, default=str)
    header = ["metric", "value", "samples", "reference"]
    rows = [[k, f"{r['value']:.4f}", r["num_samples"], r["num_reference"]] for k, r in results.items()]
    table = markdown_table(rows, header)
    lines = ["# Generation metrics", "", table, ""]
    if settings:
        lines += ["Sampling: " + ", ".join(f"{k} {v}" for k, v in settings.items()), ""]
    if pipeline:
        lines += [f"Pipeline weights: transformer `{pipeline['transformer']}`, vae `{pipeline['vae']}`.", ""]
    if not args.num_frames:
        labels = None
        if os.path.isfile(os.path.join(folder, "labels.json")):
            with open(os.path.join(folder, "labels.json")) as fh:
                by_name = json.load(fh)
            if all(os.path.basename(f) in by_name for f in files):
                labels = [by_name[os.path.basename(f)] for f in files]
        grid = samples_grid(files, args.resolution, labels, (provenance or {}).get("id2label"))
        save_png(grid, os.path.join(args.output_dir, "samples_grid.png"))
        written.append("samples_grid.png")
        lines += ["![samples](samples_grid.png)", ""]
    atomic_write_text(os.path.join(args.output_dir, "metrics.md"), "\n".join(lines))
    print(table)
    return written


if __name__ == "__main__":
    run_script(main, parse_args)
