"""The items of a stream (:mod:`.streaming`) are exactly those of the map-style datasets, made by the same transforms (:func:`~.images.resize_and_crop`,
:func:`~.images.open_image`, :func:`~.videos.read_clip`, :func:`~.videos.clip_to_tensor`):

- :func:`image_stream`: ``{"pixel_values": (3, R, R), "skipped": [(where, reason), ...]}`` as
  :class:`~.images.HFImageDataset`; a corrupt sample is skipped and named in the next item's ``skipped`` (the training
  loop's :class:`~.images.SkipLog` counts it as today), and so is the unread rest of a truncated shard.
- :func:`clip_stream`: the same with clips ``(3, T, R, R)``, as :class:`~.videos.VideoClips`.
- :func:`labelled_items` (extraction): ``(pixels, label, sample_id, ok)`` as :class:`~.images.LabelledImages` /
  :class:`~.videos.LabelledClips`, ``ok = False`` (zeros, label -1) for an unreadable sample.
"""

from __future__ import annotations

import logging
import random
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import UsageError
from .images import open_image, resize_and_crop, to_tensor
from .shards import sample_id
from .streaming import ShardStream, decode_in_order
from .videos import clip_to_tensor, read_clip, require_pyav

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Items: the map-style datasets' transforms


def _image_pixels(source, raw, where, rng, resolution, center_crop, random_flip) -> torch.Tensor:
    """``(3, R, R)`` in ``[-1, 1]``: :class:`~.images.HFImageDataset`'s decode, resize, crop and flip."""
    image = open_image(source.image_cell(raw, where))
    return to_tensor(resize_and_crop(image, resolution, center_crop, random_flip, rng))


def _clip_pixels(
    source, raw, where, rng, resolution, num_frames, frame_stride, center_crop, random_flip, random_start
):
    """``(3, T, R, R)``: :class:`~.videos.VideoClips`' read and transform of a video's bytes."""
    cell = source.video_cell(raw, where)
    frames = read_clip(cell.get("bytes") or cell.get("path"), num_frames, frame_stride, rng, random_start)
    return clip_to_tensor(frames, resolution, center_crop, random_flip, rng)


def _train_item(source, raw, where, sid, epoch, seed, pixels: Callable) -> Dict:
    rng = random.Random(hash((seed, epoch, sid)))  # as HFImageDataset: per (seed, epoch, item)
    return {"pixel_values": pixels(source, raw, where, rng), "skipped": []}


def image_stream(
    source,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    seed: int = 0,
    buffer_size: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    decode_threads: int = 0,
    shuffle: bool = True,
    exclude: Sequence[int] = (),
) -> ShardStream:
    """Autoencoder fine-tuning images from a stream: items ``{"pixel_values": (3, R, R), "skipped"}`` as
    :class:`~.images.HFImageDataset` (batch them with :func:`~.images.collate`)."""
    pixels = partial(_image_pixels, resolution=resolution, center_crop=center_crop, random_flip=random_flip)
    decode = partial(_train_item, seed=seed, pixels=pixels)
    return ShardStream(source, decode, seed, shuffle, buffer_size, rank, world_size, decode_threads, exclude)


def clip_stream(
    source,
    resolution: int,
    num_frames: int,
    frame_stride: int = 1,
    center_crop: bool = False,
    random_flip: bool = False,
    random_start: bool = True,
    seed: int = 0,
    buffer_size: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    decode_threads: int = 0,
    shuffle: bool = True,
    exclude: Sequence[int] = (),
) -> ShardStream:
    """Video autoencoder fine-tuning clips from a stream: items ``{"pixel_values": (3, T, R, R), "skipped"}`` as
    :class:`~.videos.VideoClips` (an unreadable or too short video is skipped)."""
    require_pyav()  # before any clip: a missing PyAV would otherwise read as corrupt videos
    pixels = partial(
        _clip_pixels, resolution=resolution, num_frames=num_frames, frame_stride=frame_stride,
        center_crop=center_crop, random_flip=random_flip, random_start=random_start,
    )  # fmt: skip
    decode = partial(_train_item, seed=seed, pixels=pixels)
    return ShardStream(source, decode, seed, shuffle, buffer_size, rank, world_size, decode_threads, exclude)


# ----------------------------------------------------------------------------------------------------------------
# Extraction: whole shards in order


def _labelled(source, raw, where, sid, seed, pixels: Callable, shape):
    """``(pixels, label, sample id, ok)``; ``ok = False`` with zeros and label -1 when unreadable (warned)."""
    try:
        rng = random.Random(hash((seed, sid)))  # as LabelledClips: the same clip start every run
        return pixels(source, raw, where, rng), source.label(raw, where), sid, True
    except Exception as err:  # corrupt, unreadable, too short or unlabelled: the caller drops and counts it
        logger.warning("Skipping unreadable sample %s: %s: %s", where, type(err).__name__, err)
        return torch.zeros(shape), -1, sid, False


class ShardItems(torch.utils.data.IterableDataset):
    """One pass over ``shards`` in order, every sample of each as ``decode(source, raw, where, sid)``. With
    ``DataLoader`` workers, worker ``w`` of ``W`` decodes the samples at positions ``w`` modulo ``W`` (each sample
    once). ``errors`` lists the shards that broke off (``(where, reason)``, with ``num_workers=0``)."""

    def __init__(self, source, shards: Sequence[int], decode: Callable, decode_threads: int = 0):
        self.source, self.shards, self.decode, self.decode_threads = source, list(shards), decode, decode_threads
        self.errors: List[Tuple[str, str]] = []

    def _raw(self):
        info = torch.utils.data.get_worker_info()
        for shard in self.shards:
            try:
                for p, (where, raw) in enumerate(self.source.iter_shard(shard)):
                    if info is None or p % info.num_workers == info.id:
                        yield sample_id(shard, p), where, raw
            except Exception as err:
                if isinstance(err, UsageError):  # a shard that cannot be opened: a wrong URL
                    raise
                # Truncated or corrupt: what was read is kept
                url = self.source.shard_name(shard)
                logger.warning("Shard %s broke off (%s): its remaining samples are missing", url, err)
                self.errors.append((str(url), f"{type(err).__name__}: {err}"))

    def __iter__(self):
        def decode(entry):
            sid, where, raw = entry
            return self.decode(self.source, raw, where, sid)

        for _, (item, error) in decode_in_order(self._raw(), decode, self.decode_threads):
            if error is not None:  # decoders of this class flag instead of raising; a bug is not data
                raise RuntimeError(error)
            yield item


def labelled_items(
    source,
    shards: Sequence[int],
    resolution: int,
    num_frames: Optional[int] = None,
    frame_stride: int = 1,
    seed: int = 0,
    decode_threads: int = 0,
) -> ShardItems:
    """Extraction items ``(pixels, label, sample_id, ok)`` of ``shards`` (e.g. :func:`shards_for_rank`): centre
    crops ``(3, R, R)``, or with ``num_frames`` clips ``(3, T, R, R)`` from a start seeded by ``(seed, sample id)``,
    as :class:`~.images.LabelledImages` / :class:`~.videos.LabelledClips`. Batch with the default collate."""
    if num_frames is None:
        pixels = partial(_image_pixels, resolution=resolution, center_crop=True, random_flip=False)
        shape = (3, resolution, resolution)
    else:
        require_pyav()
        pixels = partial(
            _clip_pixels, resolution=resolution, num_frames=num_frames, frame_stride=frame_stride, center_crop=True,
            random_flip=False, random_start=True,
        )  # fmt: skip
        shape = (3, num_frames, resolution, resolution)
    return ShardItems(source, shards, partial(_labelled, seed=seed, pixels=pixels, shape=shape), decode_threads)


# ----------------------------------------------------------------------------------------------------------------
# Validation held out of a stream, and resume files


def hold_out_first(source, num_held_out: int, read: Callable) -> Tuple[Optional[torch.Tensor], List[int], Dict]:
    """A validation set held out of a stream: the first ``num_held_out`` readable samples in shard order.

    ``read(source, raw, where)`` returns a tensor or raises. Returns ``(pixels or None, ids to exclude from
    training, info)``: every sample examined is excluded (readable or not); pass them as the stream's ``exclude``.
    Every process computes the same set (it reads the start of shard 0, then shard 1, ...).
    """
    items, examined, unreadable = [], [], []
    for shard in range(source.num_shards):
        try:
            for p, (where, raw) in enumerate(source.iter_shard(shard)):
                if len(items) == num_held_out:
                    break
                examined.append(sample_id(shard, p))
                try:
                    items.append(read(source, raw, where))
                except Exception as err:  # unreadable: examined (so never trained on) but not held out
                    logger.warning("Skipping unreadable sample %s: %s", where, err)
                    unreadable.append(sample_id(shard, p))
        except Exception as err:
            if isinstance(err, UsageError):
                raise
            logger.warning("Shard %s broke off (%s): holding out from the next one", source.shard_name(shard), err)
        if len(items) == num_held_out:
            break
    info = {
        "source": "the first readable samples of the shards, never trained on",
        "num_held_out": len(items),
        "held_out_sample_ids": examined,
        "unreadable_held_out_sample_ids": unreadable,
    }
    return (torch.stack(items) if items else None), examined, info


def image_reader(resolution: int) -> Callable:
    """``read(source, raw, where)`` for :func:`hold_out_first`: a centre crop ``(3, R, R)``, no flip."""
    return partial(_image_pixels, rng=random.Random(0), resolution=resolution, center_crop=True, random_flip=False)


def clip_reader(resolution: int, num_frames: int, frame_stride: int = 1) -> Callable:
    """``read(source, raw, where)`` for :func:`hold_out_first`: a centre-cropped clip from the first frame."""
    return partial(
        _clip_pixels, rng=random.Random(0), resolution=resolution, num_frames=num_frames, frame_stride=frame_stride,
        center_crop=True, random_flip=False, random_start=False,
    )  # fmt: skip
