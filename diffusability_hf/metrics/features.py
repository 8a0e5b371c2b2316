"""Feature extractors for Frechet distances, all loadable from local files (offline).

Also what the evaluation scripts share around them: the set-up of the scripts that evaluate several autoencoders on
the same samples (eval_ae.py, analyze_spectrum.py), each process's share of an evaluation set, and the extractors of
a ``--feature_extractor`` list (eval_ae.py, eval_dit.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import error_summary

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE
I3D_FILE = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
DINOV2_MODEL = "facebook/dinov2-large"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METRIC_NAMES = {"inception": "FID", "dinov2": "FDD", "i3d": "FVD"}


def is_offline() -> bool:
    """True when the Hugging Face offline switches are set (then nothing is downloaded)."""
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def torch_hub_checkpoint(filename: str) -> str:
    """Where torch (and torch-fidelity) cache a downloaded weights file: ``$TORCH_HOME/hub/checkpoints``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", filename)


def fetch_weights(path: Optional[str], filename: str, url: str, flag: str) -> str:
    """A weights file: ``path`` when given, else torch's checkpoint cache, else downloaded there (online only).

    Raises ``FileNotFoundError`` naming the file, the URL, the cache folder and ``flag`` when it cannot be had.
    """
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{flag} {path} does not exist (expected the file {filename}, from {url}).")
        return path
    cached = torch_hub_checkpoint(filename)
    if os.path.isfile(cached):
        return cached
    advice = (
        f"Download {url} on a machine with network access and put it at {cached} (the folder is torch's checkpoint "
        f"cache, $TORCH_HOME/hub/checkpoints), or pass its path with {flag}"
    )
    if is_offline():
        raise FileNotFoundError(f"{filename} is not in {os.path.dirname(cached)} and downloads are off. {advice}.")
    try:
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.hub.download_url_to_file(url, cached, progress=False)
    except Exception as err:  # no network, proxy, ...
        raise FileNotFoundError(f"Could not download {filename} ({err}). {advice}.") from err
    return cached


def file_fingerprint(path: str) -> str:
    """Short hash of a weights file or folder (name, sizes and the first MiB of each file): a cache key."""
    h = hashlib.sha256()
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if not f.startswith("."))
    )
    for f in files:
        h.update(os.path.relpath(f, os.path.dirname(path)).encode())
        h.update(str(os.path.getsize(f)).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` float pixels -> uint8 (round to nearest, as when saving a PNG)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FeatureExtractor(nn.Module):
    """Base: ``forward(uint8 (B, 3, H, W) or (B, 3, T, H, W)) -> (B, D)`` float features.

    Attributes: ``name`` (cache key part), ``metric`` (``"FID"``, ``"FDD"``, ``"FVD"`` or ``"FD-<name>"``),
    ``video`` (takes clips as clips), ``fingerprint`` (hash of the weights).
    """

    name: str = ""
    metric: str = ""
    video: bool = False
    fingerprint: str = ""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"{self.metric} features take uint8 pixels (use to_uint8), got {x.dtype}.")
        if x.ndim == 5 and not self.video:
            x = x.transpose(1, 2).flatten(0, 1)  # (B*T, 3, H, W): every frame is an image
        elif x.ndim == 4 and self.video:
            raise ValueError(f"{self.metric} is a video metric: it needs clips (B, 3, T, H, W), got images.")
        if x.shape[1] != 3:
            raise ValueError(f"Expected RGB pixels with 3 channels on dim 1, got shape {tuple(x.shape)}.")
        device = next(self.parameters(), torch.empty(0)).device
        return self.features(x.to(device)).float().flatten(1)


class InceptionFeatures(FeatureExtractor):
    """FID's InceptionV3 pool3 features (torch-fidelity's ``inception-v3-compat``)."""

    name, metric = "inception", "FID"

    def __init__(self, weights_path: str):
        super().__init__()
        from unittest import mock

        import torch_fidelity.feature_extractor_inceptionv3 as fidelity

        # torch-fidelity unpickles the weights file with weights_only=False (a crafted file runs code): read it here
        # as plain tensors, and hand torch-fidelity's constructor that state dict instead of its own torch.load
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"--inception_weights {weights_path} is not a plain state dict of tensors ({error_summary(err)}): use torch-fidelity's {INCEPTION_FILE} from {INCEPTION_URL}."
            ) from None
        with mock.patch.object(fidelity.torch, "load", lambda *args, **kwargs: state):
            self.net = fidelity.FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path
            )
        self.fingerprint = file_fingerprint(weights_path)

    def features(self, x):
        return self.net(x)[0]


class TransformersFeatures(FeatureExtractor):
    """A transformers vision model (DINOv2 for FDD): resize (bicubic), ImageNet normalisation, pooled/CLS output."""

    def __init__(self, model, image_size: int, name: str, metric: str, fingerprint: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size, self.name, self.metric, self.fingerprint = image_size, name, metric, fingerprint
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def features(self, x):
        x = x.float() / 255
        size = (self.image_size, self.image_size)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        out = self.model(pixel_values=(x - self.mean) / self.std)
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]


# I3D halves time three times and then averages over 2 steps: shorter clips do not fit its last pooling
I3D_MIN_FRAMES = 9


class I3DFeatures(FeatureExtractor):
    """FVD's I3D (StyleGAN-V TorchScript): 400-d features of ``(B, 3, T, H, W)`` clips (>= ``I3D_MIN_FRAMES`` = 9
    frames; 16 by convention)."""

    name, metric, video = "i3d", "FVD", True

    def __init__(self, path: str):
        super().__init__()
        self.net = torch.jit.load(path, map_location="cpu").eval()
        self.fingerprint = file_fingerprint(path)

    def features(self, x):
        return self.net(x.float(), rescale=True, resize=True, return_features=True)


class TorchScriptFeatures(FeatureExtractor):
    """A local TorchScript image feature model called on float ``[0, 1]`` images ``(B, 3, H, W)`` (clips: every
    frame). A local clip model with I3D's calling convention goes in as ``i3d`` with its path."""

    def __init__(self, path: str):
        super().__init__()
        self.net = torch.jit.load(path, map_location="cpu").eval()
        self.fingerprint = file_fingerprint(path)
        self.name = os.path.splitext(os.path.basename(path))[0]
        self.metric = f"FD-{self.name}"

    def features(self, x):
        return self.net(x.float() / 255)


def _transformers_model(name_or_path: str, cache_dir: Optional[str], flag: str):
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name_or_path, cache_dir=cache_dir, local_files_only=is_offline())
    except OSError as err:
        raise FileNotFoundError(
            f"Could not load the feature model {name_or_path}: it is not a local folder and not in the Hugging Face "
            f"cache. Download it where there is network access (`hf download {name_or_path} --local-dir DIR`) and "
            f"pass {flag} DIR. ({err})"
        ) from err


def load_feature_extractor(
    spec: str,
    inception_weights: Optional[str] = None,
    dinov2_model: str = DINOV2_MODEL,
    i3d_model: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> FeatureExtractor:
    """Build one extractor: ``"inception"``, ``"dinov2"``, ``"i3d"``, or a local path (the table below).

    Args:
        inception_weights / dinov2_model / i3d_model: local weights (file, folder or Hub id for DINOv2); ``None``
            looks in torch's checkpoint cache and downloads when online.

    ===========  ======  ====================================================================================
    name         metric  network and convention
    ===========  ======  ====================================================================================
    inception    FID     torch-fidelity's InceptionV3 (TF-ported "inception-v3-compat", pool3 2048-d); uint8
                         input, its own TF1-style bilinear resize to 299.
    dinov2       FDD     DINOv2 ViT-L/14 through transformers (``facebook/dinov2-large``); dgm-eval preprocessing:
                         bicubic resize to 224x224, ImageNet mean/std, the final-LayerNorm CLS token (pooler_output).
    i3d          FVD     StyleGAN-V's I3D TorchScript (Kinetics-400, 400-d logits before the softmax),
                         ``detector(x, rescale=True, resize=True, return_features=True)`` on float
                         ``(B, 3, T, H, W)`` in ``[0, 255]``.
    a path       FD      a small local model: a transformers folder (CLS/pooled output, ImageNet mean/std, resized to
                         its ``image_size``) or a TorchScript file called on float ``[0, 1]`` images ``(B, 3, H, W)``
                         that returns ``(B, D)``. A local clip model with I3D's convention: ``i3d`` + its path.
    ===========  ======  ====================================================================================

    Image extractors score clips frame by frame (all frames as images). Weights that are not found locally are
    downloaded when online; offline, the error names the file, where it goes and the flag that takes a path.
    """
    if spec == "inception":
        path = fetch_weights(inception_weights, INCEPTION_FILE, INCEPTION_URL, "--inception_weights")
        return InceptionFeatures(path)
    if spec == "i3d":
        return I3DFeatures(fetch_weights(i3d_model, I3D_FILE, I3D_URL, "--i3d_model"))
    if spec == "dinov2":
        model = _transformers_model(dinov2_model, cache_dir, "--dinov2_model")
        key = file_fingerprint(dinov2_model) if os.path.isdir(dinov2_model) else dinov2_model
        return TransformersFeatures(model, 224, "dinov2", "FDD", key)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ValueError(f"--feature_extractor {spec} is a folder without a transformers config.json.")
        model = _transformers_model(spec, cache_dir, "--feature_extractor")
        size = getattr(model.config, "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        name = os.path.basename(os.path.normpath(spec))
        return TransformersFeatures(model, int(size), name, f"FD-{name}", file_fingerprint(spec))
    if os.path.isfile(spec):
        return TorchScriptFeatures(spec)
    raise ValueError(
        f"Unknown feature extractor {spec!r}: use 'inception' (FID), 'dinov2' (FDD), 'i3d' (FVD) or the path of a "
        "local transformers folder or TorchScript file."
    )


def extract_features(extractor: FeatureExtractor, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Features of ``[-1, 1]`` images or clips, in batches (clips for image extractors: every frame)."""
    return torch.cat([extractor(to_uint8(chunk)).cpu() for chunk in pixels.split(batch_size)])


def load_feature_extractors(
    specs: Sequence[str],
    inception_weights: Optional[str] = None,
    dinov2_model: str = DINOV2_MODEL,
    i3d_model: Optional[str] = None,
    cache_dir: Optional[str] = None,
    device=None,
    clips: bool = False,
    advice: str = "give clips and --num_frames",
) -> Dict[str, FeatureExtractor]:
    """The extractors of a ``--feature_extractor`` list (:func:`load_feature_extractor`), by metric (``"FID"``, ...),
    on ``device``. Unless the data are ``clips``, a clip extractor (I3D) is refused with a ``ValueError`` that ends
    with ``advice``."""
    extractors = {}
    for spec in specs:
        ext = load_feature_extractor(spec, inception_weights, dinov2_model, i3d_model, cache_dir).to(device)
        if ext.video and not clips:
            raise ValueError(f"--feature_extractor {spec} scores clips ({ext.metric}): {advice}.")
        extractors[ext.metric] = ext
    return extractors


# ----------------------------------------------------------------------------------------------------------------
# The evaluation scripts' set-up


def start_evaluation(args, results: Sequence[str], check_models: Callable):
    """The start of ``main`` in the scripts that evaluate several autoencoders on the same samples (eval_ae.py,
    analyze_spectrum.py), in this order: every CPU core for a single CPU process; ``--output_dir`` (against the
    names a finished run leaves, ``results``) and the models (``check_models(args)``, configs only) checked before any
    weights or data load; accelerate (``--mixed_precision``) and logging; then the samples of the scripts' data flags
    (:func:`diffusability_hf.data.evaluation_samples`). Returns ``(check_models(args), accelerator, samples)``."""
    from accelerate import Accelerator

    from ..cpu import use_all_cpu_cores
    from ..data.evaluation import evaluation_samples
    from ..files import check_output_dir

    use_all_cpu_cores()
    # Validate everything cheap before any weights or data load
    check_output_dir(args.output_dir, results, args.overwrite_output_dir)
    models = check_models(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    samples = evaluation_samples(
        args.resolution, args.num_samples, args.dataset_name, args.data_dir, args.image_column,
        args.dataset_config_name, args.split, args.cache_dir, args.video_data_dir, args.video_dataset_name,
        args.video_column, args.num_frames, args.frame_stride,
    )  # fmt: skip
    return models, accelerator, samples


def process_share(dataset, accelerator, batch_size: int, num_workers: int = 0):
    """This process's share of an evaluation set: the indices ``process_index, process_index + num_processes, ...``
    (each item on exactly one process) and a DataLoader over those items in that order (no shuffling). Returns
    ``(indices, loader)``."""
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers
    )
    return indices, loader
