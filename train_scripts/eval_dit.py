#!/usr/bin/env python
"""Sample a class-conditional pipeline and score it against real data: FID (Inception), FDD (DINOv2) and, for
clips, FVD (I3D), as in the paper's Tables 1-3.

    accelerate launch train_scripts/eval_dit.py --pipeline ./dit-flux-se \\
        --num_samples 50000 --batch_size 125 \\
        --reference_dataset_name ILSVRC/imagenet-1k --reference_split train --num_reference 50000 \\
        --output_dir eval_dit

1. Samples: ``--num_samples`` images from a saved :class:`DiTFlowMatchPipeline` (classes drawn at random, the
   paper's "no class balancing", or ``--class_sampling balanced``: ``i % K``), written as PNGs to
   ``<output_dir>/samples``; or clips from a saved :class:`DiTFlowMatchVideoPipeline` (detected from its
   ``model_index.json``), each written losslessly as a folder of PNG frames ``samples/{i:06d}/{t:03d}.png`` and
   scored with FVD (I3D) and, frame by frame, FID and FDD: the columns of the paper's Table 2 (``--num_frames``
   scores the first frames of each clip; default: all the frames the pipeline makes). Sample ``i`` has its own noise generator (seed ``--seed`` and ``i``), so it starts from
   the same noise whatever the batch size, the number of processes or an interruption (other batch compositions
   change only float round-off: a rare pixel one level off; an LTX decoder that injects noise draws it from the
   batch's first generator), and a rerun only makes the missing files.
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

Diagnostics of a ``--pipeline`` (optional, on the main process, after sampling):

- ``--trajectory_steps K``: the model's prediction of the clean latent, ``x0 = x_t - sigma * v``, at ``K`` evenly
  spaced steps of the denoising trajectories of samples ``0..--trajectory_samples - 1`` (their own noise and
  class), decoded: ``trajectory.png`` (one row per sample, one column per step, labelled with sigma) and
  ``trajectory.json``, the paper's Fig. 6.
- ``--loss_latents_dir DIR``: the flow-matching loss of the transformer at ``--loss_noise_levels`` fixed noise levels
  on held-out latents (an extract_latents.py folder of the autoencoder the DiT was trained on: refused otherwise,
  before anything loads), in ``metrics.json`` (``loss_per_noise_level``) and ``metrics.md``.

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
from diffusability_hf.cpu import use_all_cpu_cores
from diffusability_hf.data.evaluation import EvalSamples, evaluation_samples
from diffusability_hf.data.latents import normalization_tensors, read_latent_rows, read_latents_metadata
from diffusability_hf.data.videos import read_clip
from diffusability_hf.errors import UsageError, run_script
from diffusability_hf.figures import labelled_image_grid, save_png
from diffusability_hf.files import atomic_write_json, atomic_write_text, check_output_dir, report_written
from diffusability_hf.flow import held_out_flow_loss
from diffusability_hf.hub import markdown_table
from diffusability_hf.metrics import FeatureStatistics, frechet_distance, load_statistics, to_uint8
from diffusability_hf.metrics.features import I3D_MIN_FRAMES, load_feature_extractors, process_share

logger = get_logger(__name__)

# What a finished run leaves in --output_dir (a second run into it needs --overwrite_output_dir); samples/ is not one
# of them: an interrupted run resumes there (only the missing samples are made) when its provenance matches
RESULTS = ("metrics.json", "metrics.md", "samples_grid.png", "trajectory.png", "trajectory.json")
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
    parser.add_argument(
        "--decode_timestep",
        type=float,
        default=0.05,
        help="A video pipeline with a timestep-conditioned LTX decoder: its decode timestep (default %(default)s, as "
        "the pipeline's; ignored otherwise).",
    )
    parser.add_argument(
        "--decode_noise_scale",
        type=float,
        default=0.025,
        help="The noise such a decode mixes into the latents (default %(default)s, as the pipeline's).",
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
    parser.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="Frames per clip: clips are scored when given (with --samples_dir), or the first frames of each clip a "
        "video --pipeline makes (default: all of them).",
    )
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
    # Diagnostics of the pipeline
    parser.add_argument(
        "--trajectory_steps",
        type=int,
        default=0,
        help="Decode the model's prediction of the clean latent, x0 = x_t - sigma * v, at this many evenly spaced "
        "steps (the first and the last included) of the denoising trajectory of each of the first "
        "--trajectory_samples samples, into trajectory.png and trajectory.json: the paper's Fig. 6. 0 (default): off.",
    )
    parser.add_argument(
        "--trajectory_samples",
        type=int,
        default=1,
        help="Trajectories to show with --trajectory_steps (rows of trajectory.png): samples 0..N-1, with the noise "
        "and class of the sample files of the same index.",
    )
    parser.add_argument(
        "--loss_latents_dir",
        type=str,
        default=None,
        help="Held-out latents (an extract_latents.py folder of the autoencoder whose latents the DiT was trained on, "
        "checked by weights fingerprint): report the DiT's flow-matching loss (Sec. 4, App. B: MSE of the velocity "
        "noise - x0 on posterior samples) at --loss_noise_levels fixed noise levels, in metrics.json and metrics.md.",
    )
    parser.add_argument(
        "--loss_noise_levels",
        type=int,
        default=10,
        help="Noise levels of --loss_latents_dir: sigma = (k + 0.5) / K for k = 0..K-1 (default %(default)s).",
    )
    parser.add_argument(
        "--loss_max_samples",
        type=int,
        default=512,
        help="Latents of --loss_latents_dir to use, the first in shard order (default %(default)s).",
    )
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
    args.pipeline_frames = pipeline_num_frames(args.pipeline) if args.pipeline is not None else None
    if args.pipeline is not None and args.num_frames is not None:
        if args.pipeline_frames is None:
            parser.error(
                f"--pipeline {args.pipeline} makes images (its transformer has no num_frames): --num_frames is for a "
                "video pipeline, or for clips in --samples_dir."
            )
        if not 1 <= args.num_frames <= args.pipeline_frames:
            parser.error(
                f"--num_frames {args.num_frames} does not fit the {args.pipeline_frames} frames per clip that "
                f"--pipeline {args.pipeline} makes: score 1 to {args.pipeline_frames} (the first frames of each clip), "
                "or leave --num_frames out to score them all."
            )
    if args.num_frames is None:
        args.num_frames = args.pipeline_frames  # a video pipeline: score every frame it makes
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
        parser.error(
            "--feature_extractor i3d (FVD) needs clips: sample a video pipeline, or score a folder of clips with "
            "--num_frames."
        )
    if "i3d" in args.feature_extractor and args.num_frames < I3D_MIN_FRAMES:
        parser.error(
            f"--feature_extractor i3d (FVD) needs clips of at least {I3D_MIN_FRAMES} frames, not {args.num_frames}: "
            "score more frames (16 is the FVD convention), or leave i3d out of --feature_extractor."
        )
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
    for flag in ("trajectory_samples", "loss_noise_levels", "loss_max_samples"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag} must be positive.")
    if args.trajectory_steps < 0:
        parser.error("--trajectory_steps must be 0 (off) or positive.")
    if args.trajectory_steps and args.pipeline is None:
        parser.error("--trajectory_steps needs --pipeline: the trajectory is sampled from it.")
    if args.trajectory_steps:
        low = min(2, args.num_inference_steps)  # the first and the last step
        if not low <= args.trajectory_steps <= args.num_inference_steps:
            parser.error(
                f"--trajectory_steps must be between {low} (the first and the last step) and --num_inference_steps "
                f"{args.num_inference_steps}."
            )
        if args.trajectory_samples > args.num_samples:
            parser.error("--trajectory_samples must be at most --num_samples (trajectory i is sample i's).")
    if args.loss_latents_dir is not None and args.pipeline is None:
        parser.error("--loss_latents_dir needs --pipeline: the loss is the pipeline's transformer's.")
    if min(args.num_samples, args.num_reference) < 2:
        parser.error("A covariance needs at least 2 samples and 2 reference items.")
    return args


def pipeline_num_frames(path):
    """Frames per clip of a saved video pipeline, from its JSON files (the transformer's latent frames through its
    autoencoder's frame rule; no weights load); ``None`` for an image pipeline."""
    config = os.path.join(path, "transformer", "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as fh:
        latent_frames = json.load(fh).get("num_frames")
    if latent_frames is None:
        return None
    return ae.decoded_num_frames(ae.read_config(path, "vae"), int(latent_frames))


def load_extractors(args, device):
    """The ``--feature_extractor`` networks by metric (FID, FDD, FVD, ...), on ``device``."""
    return load_feature_extractors(
        args.feature_extractor, args.inception_weights, args.dinov2_model, args.i3d_model, args.cache_dir, device,
        clips=bool(args.num_frames), advice="give clips and --num_frames",
    )  # fmt: skip


@torch.no_grad()
def feature_statistics(dataset, extractors, args, accelerator, desc):
    """Statistics of every extractor over a dataset of ``(pixels, ok)``, split between processes and merged."""
    _, loader = process_share(dataset, accelerator, args.batch_size, args.dataloader_num_workers)
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


def sample_name(index, video):
    """The file (image) or frame folder (clip) of sample ``index``."""
    return f"{index:06d}" if video else f"{index:06d}.png"


def sample_names(folder):
    """The finished samples in ``folder``: PNGs, or frame folders of clips (not the temporary files or folders of
    an interrupted write, ``*.tmp.png`` and ``*.tmp``)."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        n
        for n in os.listdir(folder)
        if (n.endswith(".png") and not n.endswith(".tmp.png"))
        or (n.isdigit() and os.path.isdir(os.path.join(folder, n)))
    )


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
        if n.split(".")[0].isdigit()
        and int(n.split(".")[0]) < len(labels)
        and old_labels.get(n) != labels[int(n.split(".")[0])]
    ]
    if relabelled:
        differ.append(f"the classes of {len(relabelled)} samples (e.g. {relabelled[0]})")
    if differ:
        raise UsageError(
            f"{folder} holds {len(existing)} samples made by another pipeline or with other sampling settings "
            f"({', '.join(differ)}); reusing them would score the wrong samples: {again}"
        )


def load_pipeline(args, accelerator):
    """The ``--pipeline`` (an image or a video one) on this process's device, its progress bar off."""
    from diffusability_hf.pipelines import DiTFlowMatchPipeline, DiTFlowMatchVideoPipeline

    cls = DiTFlowMatchVideoPipeline if args.pipeline_frames else DiTFlowMatchPipeline
    pipe = cls.from_pretrained(args.pipeline).to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_generators(args, indices, device):
    """One noise generator per sample index (seed ``--seed`` and the index): the noise of sample ``i`` whatever the
    batch it is in."""
    return [torch.Generator(device).manual_seed(args.seed * 1_000_003 + i) for i in indices]


def sampling_kwargs(args, pipe) -> dict:
    """The pipeline call's settings besides the classes and generators (a video pipeline's decode settings too)."""
    kwargs = dict(
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval, shift=args.shift,
    )  # fmt: skip
    if args.pipeline_frames:
        kwargs.update(decode_timestep=args.decode_timestep, decode_noise_scale=args.decode_noise_scale)
    return kwargs


def write_sample(path, pixels):
    """One sample, atomically (an interrupted run leaves no half-written sample): an ``(H, W, 3)`` uint8 image as a
    PNG, or a ``(T, H, W, 3)`` clip as a folder of PNG frames ``000.png, 001.png, ...`` (lossless, unlike a GIF or
    MP4, and read back as a clip by the scoring)."""
    if pixels.ndim == 3:
        tmp = path + ".tmp.png"
        Image.fromarray(pixels).save(tmp)
        os.replace(tmp, path)
        return
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for t, frame in enumerate(pixels):
        Image.fromarray(frame).save(os.path.join(tmp, f"{t:03d}.png"))
    os.replace(tmp, path)


def make_samples(args, accelerator, pipe):
    """Write the missing ``samples/{i:06d}.png`` (images) or ``samples/{i:06d}/`` (clips); returns
    ``(samples folder, provenance, image size)``."""
    folder = os.path.join(args.output_dir, "samples")
    labels = sample_labels(args, pipe.num_classes)
    size = pipe.transformer.config.sample_size * ae.spatial_compression(pipe.vae)
    video = bool(args.pipeline_frames)
    # Everything the pixels of sample i depend on (not the batch size or the process count: float round-off only)
    settings = {
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": float(args.guidance_scale),
        "guidance_interval": args.guidance_interval,
        "shift": float(pipe.scheduler.config.shift if args.shift is None else args.shift),
        "class_sampling": args.class_sampling,
        "seed": args.seed,
        "num_classes": pipe.num_classes,
        "resolution": size,
        "mixed_precision": accelerator.mixed_precision,
    }
    if video:
        settings["num_frames"] = args.pipeline_frames
        if getattr(pipe.vae.config, "timestep_conditioning", False):
            settings.update(decode_timestep=args.decode_timestep, decode_noise_scale=args.decode_noise_scale)
    provenance = {
        "pipeline_path": args.pipeline,
        "pipeline": pipeline_provenance(pipe),
        "settings": settings,
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
            elif name.endswith(".tmp") and os.path.isdir(os.path.join(folder, name)):
                shutil.rmtree(os.path.join(folder, name))
        # Before any sample is written: an interrupted run's samples are attributable on the next run
        old_labels = {}
        if os.path.isfile(os.path.join(folder, "labels.json")):
            with open(os.path.join(folder, "labels.json")) as fh:
                old_labels = json.load(fh)
        atomic_write_json(os.path.join(folder, PROVENANCE), provenance)
        atomic_write_json(
            os.path.join(folder, "labels.json"),
            {**old_labels, **{sample_name(i, video): labels[i] for i in range(args.num_samples)}},
            indent=None,
        )
    accelerator.wait_for_everyone()
    paths = [os.path.join(folder, sample_name(i, video)) for i in range(args.num_samples)]
    missing = [i for i in range(args.num_samples) if not os.path.exists(paths[i])]
    accelerator.wait_for_everyone()  # every process lists the missing files before any writes one
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    logger.info(f"{args.num_samples - len(missing)} samples already in {folder}; {len(mine)} to make on this process")
    for start in tqdm(
        range(0, len(mine), args.batch_size), desc="Sampling", disable=not accelerator.is_local_main_process
    ):
        batch = mine[start : start + args.batch_size]
        gens = sample_generators(args, batch, accelerator.device)
        with accelerator.autocast():
            out = pipe([labels[i] for i in batch], generator=gens, output_type="pt", **sampling_kwargs(args, pipe))
        pixels = out.frames if video else out.images  # (B, T, 3, H, W) or (B, 3, H, W) in [0, 1]
        if video and pixels.shape[1] != args.pipeline_frames:
            raise RuntimeError(
                f"The pipeline decoded {pixels.shape[1]} frames per clip, not the {args.pipeline_frames} that its "
                "transformer's num_frames and its autoencoder's frame rule give: check the saved pipeline's configs."
            )
        pixels = (pixels.float().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).cpu().numpy()
        for i, sample in zip(batch, pixels):
            write_sample(paths[i], sample)
    accelerator.wait_for_everyone()
    return folder, provenance, size


# ------------------------------------------------------------------------------------------------- diagnostics


def trajectory_step_indices(num_inference_steps: int, count: int) -> list:
    """``count`` evenly spaced step indices of ``0..num_inference_steps - 1``, the first and the last included."""
    if count == 1:
        return [num_inference_steps - 1]
    spaced = np.floor(np.linspace(0, num_inference_steps - 1, count) + 0.5).astype(int)
    return sorted(set(spaced.tolist()))


def class_names(id2label):
    """Class id -> short name (``"tench, Tinca tinca"`` -> ``"tench"``)."""
    return {int(k): v.split(",")[0] for k, v in (id2label or {}).items()}


@torch.no_grad()
def make_trajectory(args, accelerator, pipe):
    """The paper's Fig. 6: decoded ``x0`` predictions along the denoising trajectories of samples ``0..N-1``.

    Each sample starts from the noise of its sample file (its own generator) with its class; the pipeline's
    ``callback_on_step_end`` hands over ``x0_pred = x_t - sigma * v`` (guided velocity, before the step) at the kept
    steps, which the pipeline's own ``decode_latents`` decodes (denormalised with its ``latents_mean``/``latents_std``).
    A clip shows its middle frame; a decoder that mixes in or injects noise (LTX) draws it at every step from the
    sample's generator in the state that sampling leaves it in, so the last column is the sample's frame.
    Returns ``(grid image, description)``.
    """
    steps = trajectory_step_indices(args.num_inference_steps, args.trajectory_steps)
    indices = list(range(args.trajectory_samples))
    labels = sample_labels(args, pipe.num_classes)[: len(indices)]
    sigmas, timesteps, rows = {}, {}, [[] for _ in indices]

    for start in range(0, len(indices), args.batch_size):
        batch = indices[start : start + args.batch_size]
        kept = {}

        def keep(pipeline, step_index, timestep, callback_kwargs, kept=kept):
            if step_index in steps:
                kept[step_index] = callback_kwargs["x0_pred"]
                sigmas[step_index] = float(pipeline.scheduler.sigmas[step_index])
                timesteps[step_index] = float(timestep)
            return {}

        generators = sample_generators(args, batch, accelerator.device)
        with accelerator.autocast():
            pipe(
                [labels[i] for i in batch], generator=generators, output_type="latent", callback_on_step_end=keep,
                callback_on_step_end_tensor_inputs=["x0_pred"], **sampling_kwargs(args, pipe),
            )  # fmt: skip
        after_sampling = [g.get_state() for g in generators]  # where sampling's decode draws its noise from
        was_training = pipe.vae.training
        pipe.vae.eval()
        decode_kwargs = {}
        if args.pipeline_frames:  # (b, 3, T, H, W) clips, decoded with the sampling's decode settings and noise
            decode_kwargs = dict(
                generator=generators, decode_timestep=args.decode_timestep, decode_noise_scale=args.decode_noise_scale
            )
        try:
            decoded = []
            for step in steps:
                for g, state in zip(generators, after_sampling):
                    g.set_state(state)
                with accelerator.autocast():
                    pixels = pipe.decode_latents(kept[step], **decode_kwargs).float().clamp(-1, 1).cpu()
                if pixels.ndim == 5:  # a clip: its middle frame
                    frame = pixels.shape[2] // 2
                    pixels = pixels[:, :, frame]
                decoded.append(pixels)
        finally:
            pipe.vae.train(was_training)
        for j, i in enumerate(batch):
            rows[i] = torch.stack([images[j] for images in decoded])  # (K, 3, H, W)

    names = class_names(pipe.config.get("id2label"))
    row_labels = [f"{names.get(int(k), 'class')} ({k})" for k in labels]
    column_labels = [f"sigma={sigmas[s]:.2f}" for s in steps]
    grid = labelled_image_grid(rows, row_labels, column_labels, padding=1)
    description = {
        "image": "trajectory.png",
        "prediction": "x0 = x_t - sigma * v (guided velocity, before the step), decoded"
        + (f"; frame {frame} of each clip's {args.pipeline_frames}" if args.pipeline_frames else ""),
        "sample_indices": indices,
        "class_labels": labels,
        "row_labels": row_labels,
        "step_indices": steps,
        "sigmas": [sigmas[s] for s in steps],
        "timesteps": [timesteps[s] for s in steps],
        "labels": column_labels,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": float(args.guidance_scale),
        "guidance_interval": args.guidance_interval,
        "shift": float(pipe.scheduler.config.shift if args.shift is None else args.shift),
        "seed": args.seed,
    }
    return grid, description


def check_loss_autoencoder(meta: dict, expected: str, source: str, args) -> None:
    """Refuse held-out latents that other autoencoder weights encoded than the DiT's training latents."""
    if meta["ae_weights_fingerprint"] != expected:
        raise UsageError(
            f"--loss_latents_dir {args.loss_latents_dir} holds latents of other autoencoder weights ({meta['ae']}, "
            f"fingerprint {meta['ae_weights_fingerprint']}) than {source} (fingerprint {expected}): the loss would "
            "measure the DiT on latents it was not trained on; extract the held-out latents with that autoencoder "
            "(extract_latents.py --pretrained_model_name_or_path), or evaluate the pipeline trained on these latents."
        )


def check_loss_latent_shape(meta: dict, transformer_config: dict, args) -> None:
    """Refuse held-out latents of another shape than the transformer takes: channels x [latent frames x] size x size."""
    shape = tuple(meta["latent_shape"])
    size, frames = transformer_config["sample_size"], transformer_config.get("num_frames")
    want = (transformer_config["in_channels"], *([frames] if frames is not None else []), size, size)
    if shape == want:
        return
    if len(shape) != len(want):
        kind = "video" if frames is not None else "image"
        fix = f"use held-out {kind} latents, of the kind the DiT was trained on"
    elif shape[0] != want[0]:
        fix = "extract them with the autoencoder the DiT was trained on"
    elif frames is not None and shape[1] != frames:
        fix = "extract them with the DiT's training --num_frames (its latents have the frames of the transformer)"
    else:
        factor = meta["resolution"] // shape[-1] if shape[-1] else 0
        fix = f"extract them at the DiT's training resolution (extract_latents.py --resolution {size * factor})"
    raise UsageError(
        f"--loss_latents_dir {args.loss_latents_dir} holds {'x'.join(map(str, shape))} latents, but the pipeline's "
        f"transformer takes {'x'.join(map(str, want))} ones: {fix}."
    )


def check_loss_latents(args):
    """Before anything loads: ``--loss_latents_dir``'s metadata against the pipeline's JSON files (the autoencoder
    its training latents came from, ``model_index.json`` provenance, and the transformer's latent shape). Returns
    the metadata, or ``None`` without ``--loss_latents_dir``."""
    if args.loss_latents_dir is None:
        return None
    meta = read_latents_metadata(args.loss_latents_dir, "--loss_latents_dir")
    with open(os.path.join(args.pipeline, "model_index.json")) as fh:
        recorded = (json.load(fh).get("provenance") or {}).get("latents_ae_weights_fingerprint")
    if recorded is not None:
        check_loss_autoencoder(meta, recorded, f"the pipeline's training latents ({args.pipeline} provenance)", args)
    config = os.path.join(args.pipeline, "transformer", "config.json")
    if os.path.isfile(config):
        with open(config) as fh:
            check_loss_latent_shape(meta, json.load(fh), args)
    return meta


def read_loss_latents(args, meta: dict, pipe) -> dict:
    """The first ``--loss_max_samples`` rows (shard order, not flipped) of ``--loss_latents_dir``: posterior
    ``mean``, ``std`` (zeros for a deterministic encoder) and ``labels``, checked against the loaded pipeline."""
    if (pipe.config.get("provenance") or {}).get("latents_ae_weights_fingerprint") is None:
        # No recorded provenance: the pipeline's vae is the autoencoder its latents are decoded with
        check_loss_autoencoder(meta, ae.weights_fingerprint(pipe.vae), f"the pipeline's vae ({args.pipeline})", args)
    check_loss_latent_shape(meta, pipe.transformer.config, args)
    rows = read_latent_rows(args.loss_latents_dir, meta, args.loss_max_samples, "--loss_latents_dir")
    bad = rows["labels"][(rows["labels"] < 0) | (rows["labels"] >= pipe.num_classes)]
    if len(bad):
        raise UsageError(
            f"--loss_latents_dir {args.loss_latents_dir} has class {int(bad[0])}, outside the pipeline's "
            f"{pipe.num_classes} classes: use held-out latents of the DiT's classes."
        )
    if meta.get("id2label") and pipe.config.get("id2label") and meta["id2label"] != pipe.config.get("id2label"):
        logger.warning(f"{args.loss_latents_dir} names its classes differently from the pipeline's id2label.")
    return rows


@torch.no_grad()
def loss_per_noise_level(args, accelerator, pipe, rows: dict) -> dict:
    """The transformer's flow-matching loss at the noise levels ``sigma_k = (k + 0.5) / K`` on held-out latents.

    As in training (train_dit_flow.py): ``x0 = (mean + std * eps - latents_mean) / latents_std``, a posterior sample
    normalised with the *pipeline's* statistics; ``x_t = (1 - sigma) x0 + sigma noise``; target ``noise - x0``; the
    latents' own classes (no label dropout); per-sample MSE, averaged per level. A self-conditioned transformer gets
    an auxiliary pass whose ``last_hidden_state`` feeds the main pass (self-conditioning with probability 1, as at
    inference). ``eps`` (all rows), then one ``noise`` per level (all rows), come from one CPU generator seeded with
    ``--seed``: the numbers do not depend on the batch size or the device's random number generator.

    The same inputs with the null class give ``loss_null_class``; ``class_gain = loss_null_class - loss`` per level
    is what the label is worth to the model (about 0 for a class-blind generator).
    """
    mean, std, labels = rows["mean"], rows["std"], rows["labels"]
    channels = mean.shape[1]
    stat_mean, stat_std = normalization_tensors(
        {
            "latents_mean": pipe.config.latents_mean or [0.0] * channels,
            "latents_std": pipe.config.latents_std or [1.0] * channels,
            "latent_shape": list(mean.shape[1:]),
        }
    )  # per channel (1, C, 1, ...) or per position (1, C, [T',] h, w)
    generator = torch.Generator().manual_seed(args.seed)
    eps = torch.randn(mean.shape, generator=generator)
    x0 = (mean + std * eps - stat_mean) / stat_std  # (n, C, [T',] h, w)
    levels = [(k + 0.5) / args.loss_noise_levels for k in range(args.loss_noise_levels)]
    result = held_out_flow_loss(
        pipe.transformer, x0, labels, pipe.num_classes, levels, generator, args.batch_size, accelerator.autocast,
        pipe.scheduler.config.num_train_timesteps,
        progress=lambda xs: tqdm(xs, desc="Loss per noise level", disable=not accelerator.is_local_main_process),
    )  # fmt: skip
    gain = [b - a for a, b in zip(result["loss"], result["loss_null_class"])]
    return {
        "sigma": levels, "loss": result["loss"], "loss_null_class": result["loss_null_class"], "class_gain": gain,
        "num_samples": result["num_samples"], "latents_dir": args.loss_latents_dir,
    }  # fmt: skip


def sample_files(folder, num_samples, video):
    """The first ``num_samples`` images (sorted) or videos/frame folders of a folder."""
    from diffusability_hf.data.images import IMAGE_EXTENSIONS
    from diffusability_hf.data.videos import list_videos

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
        names = class_names(id2label)
        groups = [(f"{names.get(int(k), 'class')} ({k})", paths) for k, paths in by_class.items()]
    tiles = [torch.stack([EvalSamples(paths, resolution)[i][0] for i in range(len(paths))]) for _, paths in groups]
    return labelled_image_grid(tiles, [name for name, _ in groups], padding=1)


def clips_grid(files, resolution, num_frames, labels=None, id2label=None, rows=8, cols=8):
    """One clip per row (the first clip of each of the first ``rows`` classes to appear, labelled with the class
    name; without labels, the first ``rows`` clips), ``cols`` evenly spaced frames (the first and the last
    included) as columns, labelled with the frame index."""
    if labels is None:
        picked = [("", path) for path in files[:rows]]
    else:
        first = {}
        for path, label in zip(files, labels):
            if label not in first and len(first) < rows:
                first[label] = path
        names = class_names(id2label)
        picked = [(f"{names.get(int(k), 'class')} ({k})", path) for k, path in first.items()]
    frames = trajectory_step_indices(num_frames, min(cols, num_frames))
    clips = EvalSamples([path for _, path in picked], resolution, num_frames, 1)
    tiles = [clips[i][0][:, frames].transpose(0, 1) for i in range(len(picked))]  # (K, 3, R, R)
    return labelled_image_grid(tiles, [name for name, _ in picked], [f"t={t}" for t in frames], padding=1)


def main(args):
    use_all_cpu_cores()
    check_results(args)
    loss_meta = check_loss_latents(args)  # other autoencoder's latents are refused before anything loads
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)

    # Feature networks first: missing weights fail before any sampling
    extractors = load_extractors(args, accelerator.device)

    # Samples (made here, or a folder made elsewhere: its provenance is reported when this script made it)
    diagnostics = {}
    if args.pipeline is not None:
        pipe = load_pipeline(args, accelerator)
        loss_rows = read_loss_latents(args, loss_meta, pipe) if loss_meta is not None else None  # before sampling
        folder, provenance, size = make_samples(args, accelerator, pipe)
        if accelerator.is_main_process:
            if args.trajectory_steps:
                diagnostics["trajectory"] = make_trajectory(args, accelerator, pipe)
            if loss_rows is not None:
                diagnostics["loss_per_noise_level"] = loss_per_noise_level(args, accelerator, pipe, loss_rows)
        accelerator.wait_for_everyone()
        del pipe
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
        written = write_outputs(args, results, provenance, folder, files, skipped, diagnostics)
        for name in set(RESULTS) - set(written):  # --overwrite_output_dir: no stale grid of the earlier run stays
            if os.path.isfile(os.path.join(args.output_dir, name)):
                os.remove(os.path.join(args.output_dir, name))
        report_written(args.output_dir, written + (["samples"] if args.pipeline is not None else []))
    accelerator.wait_for_everyone()  # no process tears down the process group while another still works
    accelerator.end_training()


def write_outputs(args, results, provenance, folder, files, skipped, diagnostics=None):
    """metrics.json, metrics.md, samples_grid.png and, when asked for, trajectory.png and trajectory.json, each
    written atomically; returns the names written."""
    diagnostics = diagnostics or {}
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
    if "trajectory" in diagnostics:
        out["trajectory"] = diagnostics["trajectory"][1]
    if "loss_per_noise_level" in diagnostics:
        out["loss_per_noise_level"] = diagnostics["loss_per_noise_level"]
    atomic_write_json(os.path.join(args.output_dir, "metrics.json"), out, default=str)
    header = ["metric", "value", "samples", "reference"]
    rows = [[k, f"{r['value']:.4f}", r["num_samples"], r["num_reference"]] for k, r in results.items()]
    table = markdown_table(rows, header)
    lines = ["# Generation metrics", "", table, ""]
    if settings:
        lines += ["Sampling: " + ", ".join(f"{k} {v}" for k, v in settings.items()), ""]
    if pipeline:
        lines += [f"Pipeline weights: transformer `{pipeline['transformer']}`, vae `{pipeline['vae']}`.", ""]
    labels = None
    if os.path.isfile(os.path.join(folder, "labels.json")):
        with open(os.path.join(folder, "labels.json")) as fh:
            by_name = json.load(fh)
        if all(os.path.basename(f) in by_name for f in files):
            labels = [by_name[os.path.basename(f)] for f in files]
    id2label = (provenance or {}).get("id2label")
    if args.num_frames:
        grid = clips_grid(files, args.resolution, args.num_frames, labels, id2label)
    else:
        grid = samples_grid(files, args.resolution, labels, id2label)
    save_png(grid, os.path.join(args.output_dir, "samples_grid.png"))
    written.append("samples_grid.png")
    lines += ["![samples](samples_grid.png)", ""]
    if "loss_per_noise_level" in diagnostics:
        loss = diagnostics["loss_per_noise_level"]
        lines += [
            f"## Flow-matching loss per noise level ({loss['num_samples']} held-out latents of "
            f"`{loss['latents_dir']}`, seed {args.seed})",
            "",
            markdown_table(
                [
                    [f"{s:.3f}", f"{v:.5f}", f"{g:+.5f}"]
                    for s, v, g in zip(loss["sigma"], loss["loss"], loss["class_gain"])
                ],
                ["sigma", "loss", "class gain (null-class loss - loss)"],
            ),
            "",
        ]
    if "trajectory" in diagnostics:
        grid, description = diagnostics["trajectory"]
        save_png(grid, os.path.join(args.output_dir, "trajectory.png"))
        atomic_write_json(os.path.join(args.output_dir, "trajectory.json"), description)
        written += ["trajectory.png", "trajectory.json"]
        lines += [
            "## Denoising trajectory (x0 predictions, decoded; the paper's Fig. 6)",
            "",
            "Steps " + ", ".join(map(str, description["step_indices"])) + f" of {description['num_inference_steps']}.",
            "",
            "![trajectory](trajectory.png)",
            "",
        ]
    atomic_write_text(os.path.join(args.output_dir, "metrics.md"), "\n".join(lines))
    print(table)
    return written


if __name__ == "__main__":
    run_script(main, parse_args)
