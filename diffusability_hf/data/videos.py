"""Video data for autoencoder fine-tuning: video files, frame folders, HF video datasets, camera pans over the
embedded photographs, and the joint image + video batches of the paper's Table 5.

Clips are ``(3, T, R, R)`` float in ``[-1, 1]``; every dataset yields ``{"pixel_values", "skipped"}`` as the image
datasets of :mod:`diffusability_hf.data.images` do (an unreadable or too short video is skipped and named in ``skipped``).
:class:`JointBatches` yields whole per-process batches ``{"pixel_values": (B_i, 3, R, R) or None, "video_values":
(B_v, 3, T, R, R) or None, "skipped"}``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import random
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .images import (
    EMBEDDED_TRAIN_IMAGES,
    EMBEDDED_VALIDATION_IMAGES,
    IMAGE_EXTENSIONS,
    held_out_split,
    load_embedded_image,
    load_photograph,
    resize_and_crop,
    to_tensor,
)

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")


def embedded_gif_path() -> str:
    """The small animated GIF that ships inside scikit-image (24 frames)."""
    import skimage

    return os.path.join(os.path.dirname(skimage.__file__), "data", "no_time_for_that_tiny.gif")


def require_pyav():
    try:
        import av  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "Reading video files needs PyAV: `pip install 'diffusability-hf[video]'` (or `pip install av`). Folders "
            "of frame images need nothing more."
        ) from err


def _decode_gif(path: str) -> List[np.ndarray]:
    """Every frame of a GIF as ``(H, W, 3)`` uint8, with Pillow (composited, so partial frames are whole)."""
    from PIL import ImageSequence

    with Image.open(path) as gif:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]


def _decode_all(source) -> List[np.ndarray]:
    """Every frame of a video file (path or bytes) as ``(H, W, 3)`` uint8, with PyAV."""
    require_pyav()
    import av

    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _frame_files(folder: str) -> List[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))


def read_clip(source, num_frames: int, frame_stride: int, rng: random.Random, random_start: bool = True) -> np.ndarray:
    """``num_frames`` frames, ``frame_stride`` apart, from a video file, its bytes, or a folder of frame images.

    The start is random (a temporal crop) or the first frame. Returns ``(T, H, W, 3)`` uint8. Raises ``ValueError``
    when the video is shorter than ``1 + (num_frames - 1) * frame_stride`` frames.
    """
    span = 1 + (num_frames - 1) * frame_stride
    if isinstance(source, str) and os.path.isdir(source):
        files = _frame_files(source)
        total = len(files)
    else:
        frames = _decode_all(source)
        total = len(frames)
    if total < span:
        raise ValueError(f"has {total} frames, fewer than the {span} that --num_frames/--frame_stride need")
    start = rng.randint(0, total - span) if random_start else 0
    index = range(start, start + span, frame_stride)
    if isinstance(source, str) and os.path.isdir(source):
        return np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in index])
    return np.stack([frames[i] for i in index])


def clip_to_tensor(
    frames: np.ndarray, resolution: int, center_crop: bool, random_flip: bool, rng: random.Random
) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(3, T, R, R)`` in ``[-1, 1]``: the same resize, crop and flip for every frame."""
    state = rng.getstate()
    out = []
    for frame in frames:
        rng.setstate(state)  # one crop and one flip decision for the whole clip
        out.append(to_tensor(resize_and_crop(Image.fromarray(frame), resolution, center_crop, random_flip, rng)))
    return torch.stack(out, dim=1)  # (3, T, R, R)


class VideoClips(torch.utils.data.Dataset):
    """Clips from a list of sources (video paths, frame folders, or HF ``{"bytes", "path"}`` cells).

    An unreadable or too short video is skipped (the next one is used) and named in ``skipped``.
    """

    def __init__(
        self,
        sources: Sequence,
        resolution: int,
        num_frames: int,
        frame_stride: int = 1,
        center_crop: bool = False,
        random_flip: bool = False,
        random_start: bool = True,
        seed: int = 0,
    ):
        self.sources, self.resolution, self.num_frames, self.frame_stride = (
            list(sources),
            resolution,
            num_frames,
            frame_stride,
        )
        self.center_crop, self.random_flip, self.random_start, self.seed = center_crop, random_flip, random_start, seed
        self.epoch = 0
        if not self.sources:
            raise ValueError("No videos found.")
        if not all(isinstance(src, str) and os.path.isdir(src) for src in self.sources):
            require_pyav()  # before any clip is read: an ImportError would otherwise count as unreadable videos

    def __len__(self) -> int:
        return len(self.sources)

    def _load(self, source, rng: random.Random) -> torch.Tensor:
        data = source.get("bytes") or source.get("path") if isinstance(source, dict) else source
        frames = read_clip(data, self.num_frames, self.frame_stride, rng, self.random_start)
        return clip_to_tensor(frames, self.resolution, self.center_crop, self.random_flip, rng)

    def read(self, index: int) -> Optional[torch.Tensor]:
        """Clip ``index`` itself, or ``None`` (and a warning) when it cannot be read: no fallback to the next one."""
        source = self.sources[index]
        try:
            return self._load(source, random.Random(hash((self.seed, self.epoch, index))))
        except Exception as err:
            logger.warning("Skipping video %s: %s", source.get("path") if isinstance(source, dict) else source, err)
            return None

    def __getitem__(self, index: int) -> Dict:
        rng = random.Random(hash((self.seed, self.epoch, index)))
        skipped = []
        for attempt in range(min(len(self), 100)):
            source = self.sources[(index + attempt) % len(self)]
            where = source.get("path") if isinstance(source, dict) else source
            try:
                return {"pixel_values": self._load(source, rng), "skipped": skipped}
            except Exception as err:  # unreadable, corrupt or too short: skip it, name it (the loop warns once)
                skipped.append((str(where), f"{type(err).__name__}: {err}"))
        raise RuntimeError("100 consecutive videos could not be read: check the dataset and --num_frames.")


def list_videos(video_data_dir: str) -> List[str]:
    """Video files (``VIDEO_EXTENSIONS``) and frame folders (subfolders holding images) under a folder, sorted."""
    if not os.path.isdir(video_data_dir):
        raise FileNotFoundError(f"--video_data_dir {video_data_dir} is not a folder.")
    found = []
    for root, dirs, files in os.walk(video_data_dir):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(VIDEO_EXTENSIONS)]
        if root != video_data_dir and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            found.append(root)  # a folder of frames is one video
    if not found:
        raise ValueError(
            f"--video_data_dir {video_data_dir} holds no videos ({', '.join(VIDEO_EXTENSIONS)}) and no frame folders."
        )
    return sorted(found)


def _video_dataset(dataset_name: str, video_column: Optional[str], dataset_config_name, cache_dir, split):
    """``(dataset, video column)`` of an HF dataset, its videos left undecoded (``{"bytes", "path"}`` cells)."""
    import datasets

    ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    columns = ds.column_names
    if video_column is None:
        video_column = next((c for c in columns if isinstance(ds.features[c], datasets.Video)), None)
        if video_column is None:
            raise ValueError(f"The dataset has no Video column; its columns are {columns}: pass --video_column.")
    if video_column not in columns:
        raise ValueError(f"--video_column '{video_column}' is not in the dataset; its columns are {columns}.")
    if isinstance(ds.features[video_column], datasets.Video):
        ds = ds.cast_column(video_column, datasets.Video(decode=False))
    return ds, video_column


def load_video_dataset(
    dataset_name: str, video_column: Optional[str], dataset_config_name=None, cache_dir=None, split="train"
):
    """An HF dataset with a video column, as a list of undecoded cells (``{"bytes", "path"}`` or paths)."""
    ds, video_column = _video_dataset(dataset_name, video_column, dataset_config_name, cache_dir, split)
    return list(ds[video_column])


class EmbeddedPanClips(torch.utils.data.Dataset):
    """Camera-pan clips over the scikit-image photographs (plus the animated GIF it ships), offline.

    Clip ``i`` moves a square window of side ``resolution * s`` (``s`` uniform in ``scale_range``) along a straight
    line with sub-pixel steps and a slight zoom, and resizes every frame to ``resolution``. Every
    ``len(names) + 1``-th clip is a temporal crop of the GIF instead (real motion, upscaled).
    """

    def __init__(
        self,
        resolution: int,
        num_frames: int,
        names: Sequence[str] = EMBEDDED_TRAIN_IMAGES,
        num_samples: int = 1024,
        seed: int = 0,
        scale_range=(1.0, 3.0),
        max_travel: float = 0.5,
        include_gif: bool = True,
    ):
        self.resolution, self.num_frames, self.num_samples, self.seed = resolution, num_frames, num_samples, seed
        self.scale_range, self.max_travel = scale_range, max_travel
        self.images = [Image.fromarray(load_photograph(n)) for n in names]
        self.gif = _decode_gif(embedded_gif_path()) if include_gif else None  # Pillow: no video extra needed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict:
        rng = random.Random(self.seed * 1_000_003 + index)
        k = index % (len(self.images) + (self.gif is not None))
        if k == len(self.images):
            start = rng.randrange(len(self.gif))
            frames = [self.gif[(start + t) % len(self.gif)] for t in range(self.num_frames)]
            clip = clip_to_tensor(np.stack(frames), self.resolution, False, True, rng)  # the GIF loops
        else:
            clip = pan_clip(self.images[k], self.resolution, self.num_frames, rng, self.scale_range, self.max_travel)
        return {"pixel_values": clip, "skipped": []}


def pan_clip(
    image: Image.Image,
    resolution: int,
    num_frames: int,
    rng: random.Random,
    scale_range=(1.0, 3.0),
    travel: float = 0.5,
    side: Optional[float] = None,
    angle: Optional[float] = None,
) -> torch.Tensor:
    """A ``(3, T, R, R)`` camera pan over ``image``: a window of side ``side`` (random by default) moving in a
    straight line by up to ``travel`` of its side over the clip, with a slight zoom; sub-pixel steps."""
    w, h = image.size
    side = min(side or resolution * rng.uniform(*scale_range), 0.8 * min(w, h))
    zoom = rng.uniform(0.9, 1.1)
    angle = rng.uniform(0, 2 * math.pi) if angle is None else angle
    dist = travel * side * rng.uniform(0.3, 1.0)
    biggest = side * max(1.0, zoom)
    dx = float(np.clip(dist * math.cos(angle), biggest - w, w - biggest))
    dy = float(np.clip(dist * math.sin(angle), biggest - h, h - biggest))
    # Start centre: anywhere that keeps the whole path inside the photograph
    x0 = rng.uniform(biggest / 2 - min(0.0, dx), w - biggest / 2 - max(0.0, dx))
    y0 = rng.uniform(biggest / 2 - min(0.0, dy), h - biggest / 2 - max(0.0, dy))
    frames = []
    for t in range(num_frames):
        f = t / max(num_frames - 1, 1)
        s, cx, cy = side * (1 + (zoom - 1) * f), x0 + f * dx, y0 + f * dy
        box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
        frames.append(to_tensor(image.resize((resolution, resolution), Image.BICUBIC, box=box)))
    return torch.stack(frames, dim=1)  # (3, T, R, R)


def embedded_validation_clips(resolution: int, num_frames: int, num_clips: int = 4) -> torch.Tensor:
    """Fixed ``(N, 3, T, R, R)`` validation pans over the held-out photographs (seeded, the same every call)."""
    clips = []
    for i in range(num_clips):
        image = Image.fromarray(load_embedded_image(EMBEDDED_VALIDATION_IMAGES[i % len(EMBEDDED_VALIDATION_IMAGES)]))
        rng = random.Random(i)
        clips.append(pan_clip(image, resolution, num_frames, rng, side=min(image.size) / 2, angle=i * math.pi / 2))
    return torch.stack(clips)


def training_clips(
    resolution: int,
    num_frames: int,
    num_validation: int,
    seed: int,
    video_data_dir: Optional[str] = None,
    video_dataset_name: Optional[str] = None,
    video_column: Optional[str] = None,
    video_dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    frame_stride: int = 1,
    center_crop: bool = False,
    random_flip: bool = False,
):
    """Video autoencoder fine-tuning clips: ``(train dataset, validation clips (N, 3, T, R, R), info)``.

    With a folder or HF dataset, ``num_validation`` readable videos are held out at random (seeded) and never trained
    on, read as first frames and centre crops; with neither, :class:`EmbeddedPanClips` trains and
    :func:`embedded_validation_clips` (pans over other photographs) validates.
    """
    if video_data_dir is None and video_dataset_name is None:
        logger.info("No video dataset given: training on camera pans over the embedded photographs and the GIF.")
        info = {
            "source": f"camera pans over {' and '.join(EMBEDDED_VALIDATION_IMAGES)}, never trained on",
            "num_held_out": num_validation,
        }
        train = EmbeddedPanClips(resolution, num_frames, seed=seed)
        return train, embedded_validation_clips(resolution, num_frames, num_validation), info
    if video_data_dir is not None:
        sources = list_videos(video_data_dir)
    else:
        sources = load_video_dataset(video_dataset_name, video_column, video_dataset_config_name, cache_dir)
    clip = dict(resolution=resolution, num_frames=num_frames, frame_stride=frame_stride)
    val_set = VideoClips(sources, **clip, center_crop=True, random_start=False)
    val, train_indices, info = held_out_split(
        len(sources), num_validation, val_set.read, "videos", "--num_validation_videos", seed
    )
    train = VideoClips(
        [sources[i] for i in train_indices], **clip, center_crop=center_crop, random_flip=random_flip, seed=seed
    )
    return train, val, info


class JointBatches(torch.utils.data.Dataset):
    """Item ``i`` is one whole per-process batch: ``image_batch_size`` images and ``video_batch_size`` clips.

    The paper trains video AEs on joint image+video batches (Table 5: 64 images and 32 clips). Each modality walks
    through its own dataset in a seeded random order that depends only on the batch position, so a resumed run
    sees the same batches. Use with ``DataLoader(batch_size=1, collate_fn=unwrap_batch)``.
    """

    def __init__(self, images, videos, image_batch_size: int, video_batch_size: int, seed: int = 0):
        self.images, self.videos, self.seed = images, videos, seed
        self.image_batch_size, self.video_batch_size = image_batch_size, video_batch_size
        if image_batch_size and images is None or video_batch_size and videos is None:
            raise ValueError("A batch size is set for a modality without a dataset.")
        sizes = [len(d) // b for d, b in ((images, image_batch_size), (videos, video_batch_size)) if b]
        self.num_batches = max(1, max(sizes, default=1))
        self.epoch, self._orders = 0, {}

    def __len__(self) -> int:
        return self.num_batches

    def _order(self, n: int, salt: int, cycle: int) -> torch.Tensor:
        """The seeded permutation of one pass (``cycle``) over a dataset of ``n`` items."""
        key = (salt, cycle)
        if key not in self._orders:
            if len(self._orders) > 8:
                self._orders.clear()
            gen = torch.Generator().manual_seed(self.seed * 7919 + salt * 104_729 + cycle)
            self._orders[key] = torch.randperm(n, generator=gen)
        return self._orders[key]

    def _take(self, dataset, batch_size: int, index: int, salt: int):
        out, skipped, n = [], [], len(dataset)
        for j in range(batch_size):
            pos = (self.epoch * self.num_batches + index) * batch_size + j
            item = dataset[int(self._order(n, salt, pos // n)[pos % n])]
            out.append(item["pixel_values"])
            skipped += item["skipped"]
        return torch.stack(out), skipped

    def __getitem__(self, index: int) -> Dict:
        images, skipped_images = (
            self._take(self.images, self.image_batch_size, index, 1) if self.image_batch_size else (None, [])
        )
        videos, skipped_videos = (
            self._take(self.videos, self.video_batch_size, index, 2) if self.video_batch_size else (None, [])
        )
        return {"pixel_values": images, "video_values": videos, "skipped": skipped_images + skipped_videos}


def unwrap_batch(items: List[Dict]) -> Dict:
    """``collate_fn`` for :class:`JointBatches`: the loader's batch of one is the batch."""
    return items[0]


class LabelledClips(torch.utils.data.Dataset):
    """``(clip (3, T, R, R), label, index, ok)`` for class-conditional video DiT latents, as
    :class:`~diffusability_hf.data.images.LabelledImages` is for images.

    Sources: a folder whose subfolders are the classes (each holding video files or frame folders, see
    :func:`list_videos`), an HF dataset with a Video column and a label column, or, with neither, camera pans over
    the embedded photographs (:class:`EmbeddedPanClips`, labelled by source photograph; the GIF is a class of its
    own). Clip ``index`` is ``num_frames`` frames, ``frame_stride`` apart, from a start drawn from ``(seed, index)``
    (random clips, as the paper pre-extracts random 17-frame clips for CogVideoX-AE, App. B: the same ones every
    run), centre-cropped to ``resolution``. ``ok`` is False for an unreadable or too short video (zeros are
    returned; the caller skips and counts it). ``names`` lists the class names in label order.
    """

    def __init__(
        self,
        resolution: int,
        num_frames: int,
        video_data_dir: Optional[str] = None,
        dataset_name: Optional[str] = None,
        video_column: Optional[str] = None,
        label_column: str = "label",
        dataset_config_name: Optional[str] = None,
        cache_dir: Optional[str] = None,
        split: str = "train",
        frame_stride: int = 1,
        embedded_samples: Optional[int] = 1024,
        seed: int = 0,
    ):
        self.resolution, self.num_frames, self.frame_stride, self.seed = resolution, num_frames, frame_stride, seed
        self.embedded = None
        if video_data_dir is None and dataset_name is None:
            self.embedded = EmbeddedPanClips(resolution, num_frames, num_samples=embedded_samples or 1024, seed=seed)
            self.names = list(EMBEDDED_TRAIN_IMAGES) + ["animated GIF"]
            return
        if video_data_dir is not None:
            if not os.path.isdir(video_data_dir):
                raise FileNotFoundError(f"--video_data_dir {video_data_dir} is not a folder.")
            self.names = sorted(
                d for d in os.listdir(video_data_dir) if os.path.isdir(os.path.join(video_data_dir, d))
            )
            if not self.names:
                raise ValueError(
                    f"--video_data_dir {video_data_dir} has no subfolders: put the videos of each class in a subfolder "
                    "named after the class."
                )
            self.sources, self.labels = [], []
            for label, name in enumerate(self.names):
                videos = list_videos(os.path.join(video_data_dir, name))
                self.sources += videos
                self.labels += [label] * len(videos)
        else:
            ds, column = _video_dataset(dataset_name, video_column, dataset_config_name, cache_dir, split)
            if label_column not in ds.column_names:
                raise ValueError(
                    f"--label_column '{label_column}' is not in the dataset; its columns are {ds.column_names}."
                )
            feature = ds.features[label_column]
            values = list(ds[label_column])
            self.names = list(feature.names) if hasattr(feature, "names") else [str(v) for v in sorted(set(values))]
            self.sources = list(ds[column])
            self.labels = [v if hasattr(feature, "names") else self.names.index(str(v)) for v in values]
        # Reads and centre-crops the clips (pyav checked before any clip is read)
        self.clips = VideoClips(self.sources, resolution, num_frames, frame_stride, center_crop=True, seed=seed)

    def __len__(self) -> int:
        return len(self.embedded) if self.embedded is not None else len(self.sources)

    def __getitem__(self, index: int):
        if self.embedded is not None:
            return self.embedded[index]["pixel_values"], index % len(self.names), index, True
        source, rng = self.sources[index], random.Random(hash((self.seed, index)))
        try:
            return self.clips._load(source, rng), self.labels[index], index, True
        except Exception as err:  # unreadable, corrupt or too short: counted by the caller
            where = source.get("path") if isinstance(source, dict) else source
            logger.warning("Skipping video %s: %s", where, err)
            zeros = torch.zeros(3, self.num_frames, self.resolution, self.resolution)
            return zeros, self.labels[index], index, False
