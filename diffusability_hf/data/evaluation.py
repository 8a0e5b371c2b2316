"""Evaluation sets: the first N images or clips of a source, as deterministic centre crops (clips from their first
frame), the same every run; an unreadable item is skipped and counted, never counted twice (:class:`EvalSamples`)."""

from __future__ import annotations

import logging
import random
from typing import Optional, Sequence

import torch

from .images import (
    EMBEDDED_TRAIN_IMAGES,
    EMBEDDED_VALIDATION_IMAGES,
    EmbeddedPhotoCrops,
    load_image_dataset,
    open_and_crop,
)
from .videos import EmbeddedPanClips, clip_to_tensor, list_videos, load_video_dataset, read_clip

logger = logging.getLogger(__name__)


class EvalSamples(torch.utils.data.Dataset):
    """``(pixels, ok)`` for evaluation: ``(3, R, R)`` centre crops or ``(3, T, R, R)`` clips from frame 0, the same
    every run. An unreadable image or too short video gives ``ok = False`` (and zeros): the caller drops and counts
    it, so no sample is ever counted twice. ``description`` says what the samples are (for cards and JSON)."""

    def __init__(self, items: Sequence, resolution: int, num_frames: Optional[int] = None, frame_stride: int = 1):
        self.items, self.resolution, self.num_frames, self.frame_stride = (
            list(items),
            resolution,
            num_frames,
            frame_stride,
        )
        self.description = ""

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        if isinstance(item, torch.Tensor):
            return item, True
        if self.num_frames is None:
            pixels = open_and_crop(item, self.resolution)
            if pixels is None:
                return torch.zeros(3, self.resolution, self.resolution), False
            return pixels, True
        where = item.get("path") if isinstance(item, dict) else item
        try:
            data = (item.get("bytes") or item.get("path")) if isinstance(item, dict) else item
            frames = read_clip(data, self.num_frames, self.frame_stride, random.Random(0), random_start=False)
            return clip_to_tensor(frames, self.resolution, True, False, random.Random(0)), True
        except Exception as err:  # unreadable, corrupt or too short: the caller skips and counts it
            logger.warning("Skipping video %s: %s", where, err)
            return torch.zeros(3, self.num_frames, self.resolution, self.resolution), False


class _LazyItems:
    """A sequence whose item ``i`` is ``make(i)``, built on access (embedded crops and pans)."""

    def __init__(self, make, length: int):
        self.make, self.length = make, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.make(index)

    def __iter__(self):
        return (self.make(i) for i in range(self.length))


def evaluation_samples(
    resolution: int,
    num_samples: Optional[int],
    dataset_name: Optional[str] = None,
    data_dir: Optional[str] = None,
    image_column: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    split: Optional[str] = None,
    cache_dir: Optional[str] = None,
    video_data_dir: Optional[str] = None,
    video_dataset_name: Optional[str] = None,
    video_column: Optional[str] = None,
    num_frames: Optional[int] = None,
    frame_stride: int = 1,
    embedded_split: str = "validation",
) -> EvalSamples:
    """The first ``num_samples`` images (or clips, when a video source or ``num_frames`` is given) of a source.

    Sources: an HF image dataset or image folder, a folder of videos or an HF video dataset; with none, held-out
    crops of the embedded photographs (``chelsea``, ``coffee``: never seen in the embedded training), or camera
    pans over them for clips; ``embedded_split="train"`` gives instead the crops of the training photographs that
    the embedded DiT demo learns from (the reference set of a generator trained on them). ``split=None`` means
    "validation" for Hub datasets and "train" for local folders.
    """
    if embedded_split not in ("train", "validation"):
        raise ValueError(f"embedded_split must be 'train' or 'validation', got {embedded_split!r}.")
    names, seed = (EMBEDDED_TRAIN_IMAGES, 0) if embedded_split == "train" else (EMBEDDED_VALIDATION_IMAGES, 1)
    video = video_data_dir is not None or video_dataset_name is not None
    if video and num_frames is None:
        raise ValueError("Clips need --num_frames.")
    if video:
        sources = (
            list_videos(video_data_dir)
            if video_data_dir is not None
            else load_video_dataset(
                video_dataset_name, video_column, dataset_config_name, cache_dir, split or "validation"
            )
        )
        what = video_data_dir or video_dataset_name
    elif dataset_name is not None or data_dir is not None:
        ds, column = load_image_dataset(
            dataset_name, data_dir, image_column, dataset_config_name, cache_dir,
            split or ("train" if data_dir is not None else "validation"),
        )  # fmt: skip
        sources = _LazyItems(lambda i: ds[i][column], len(ds))
        what = dataset_name or data_dir
    elif num_frames is not None:
        pans = EmbeddedPanClips(resolution, num_frames, names, num_samples or 64, seed=seed)
        sources = _LazyItems(lambda i: pans[i]["pixel_values"], len(pans))
        what = f"embedded camera pans over {', '.join(names)} and the scikit-image GIF"
    else:
        crops = EmbeddedPhotoCrops(resolution, names, num_samples or 64, seed=seed, random_flip=False)
        sources = _LazyItems(lambda i: crops.crop(i)[0], len(crops))
        held_out = "held-out " if embedded_split == "validation" else ""
        what = f"crops of the embedded {held_out}photographs {', '.join(names)}"
    n = len(sources) if num_samples is None else min(num_samples, len(sources))
    out = EvalSamples(_LazyItems(sources.__getitem__, n), resolution, num_frames, frame_stride)
    out.description = f"{n} {'clips' if num_frames else 'images'} of {what}"
    return out
