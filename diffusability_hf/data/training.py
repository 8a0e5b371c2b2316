"""The training data of ``train_ae_se.py`` behind one object, so that the script never asks "dataset or stream":
map-style datasets read through a ``DataLoader`` that accelerate prepares, or streams (tar shards, HF datasets and
folders with ``--streaming``) of which each process reads its own share, with their positions in every checkpoint.
"""

import logging
import math
import os
import signal
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..errors import UsageError
from .images import collate, training_images
from .shards import is_shard_folder, open_streaming_source
from .stream_items import clip_reader, clip_stream, hold_out_first, image_reader, image_stream
from .streaming import load_stream_state, save_stream_state
from .videos import JointBatches, training_clips, unwrap_batch

logger = logging.getLogger(__name__)

KINDS = ("image", "video")


@dataclass(frozen=True)
class DataSource:
    """One kind of training data as the flags give it: an HF dataset (``dataset_name``), a folder (``data_dir``),
    webdataset tar shards (``data_files``) or none of them (the embedded photographs or clips). Tar shards, and a
    folder of them, are always streamed; a dataset or a folder of files with ``streaming``."""

    dataset_name: Optional[str] = None
    data_dir: Optional[str] = None
    data_files: Optional[Sequence[str]] = None
    column: Optional[str] = None
    dataset_config_name: Optional[str] = None
    streaming: bool = False

    @property
    def embedded(self) -> bool:
        return self.dataset_name is None and self.data_dir is None and self.data_files is None

    @property
    def streamed(self) -> bool:
        return self.data_files is not None or is_shard_folder(self.data_dir) or (self.streaming and not self.embedded)


def check_streamed(sources: Dict[str, DataSource], batch_sizes: Dict[str, int]) -> bool:
    """Whether the kinds trained on (``batch_sizes[kind] > 0``) are streamed; a joint batch is read one way, so a
    mix is refused with one line."""
    used = [kind for kind in KINDS if batch_sizes.get(kind)]
    streams = {kind: sources[kind].streamed for kind in KINDS}
    streaming = any(streams[kind] for kind in used)
    if streaming and not all(streams[kind] for kind in used):
        raise UsageError(
            f"The {'images' if streams['image'] else 'clips'} are streamed but the "
            f"{'clips' if streams['image'] else 'images'} are not: joint batches are read one way. Stream both (tar "
            "shards: --train_data_files / --video_data_files or a folder of *.tar; HF datasets and folders: "
            "--streaming), or train on one kind (--video_batch_size 0 or --image_batch_size 0)."
        )
    return streaming


class TrainingData:
    """Training batches ``{"pixel_values": (B, 3, R, R) or None, "video_values": (B', 3, T, R, R) or None,
    "skipped": [...]}`` and held-out validation pixels, from map-style datasets or streams alike.

    Map-style: images (an image AE) or :class:`JointBatches` of images and clips (a video AE, Table 5), shuffled by a
    ``DataLoader`` that :meth:`prepare` hands to accelerate; a resume skips the batches of the interrupted epoch.
    Streams: each process reads its share of the shards in the training process (no workers), one endless epoch;
    :meth:`save_state` and :meth:`load_state` keep the positions in the checkpoints. Validation items are held out
    of the training data in both (never trained on).
    """

    def __init__(
        self,
        sources: Dict[str, DataSource],
        batch_sizes: Dict[str, int],
        *,
        joint: bool,
        resolution: int,
        num_frames: int,
        frame_stride: int,
        num_validation: Dict[str, int],
        seed: int,
        cache_dir: Optional[str] = None,
        center_crop: bool = False,
        random_flip: bool = False,
        shuffle_buffer_size: int = 1000,
        decode_threads: int = 0,
        num_workers: int = 0,
        worker_init_fn: Optional[Callable] = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.batch_sizes = {kind: batch_sizes.get(kind) or 0 for kind in KINDS}
        self.streaming = check_streamed(sources, self.batch_sizes)
        self.joint, self.rank = joint, rank
        self.train, self.validation, self.info, self._heads = {}, {}, {}, {}
        for kind in KINDS:
            if not self.batch_sizes[kind]:
                continue
            source, video = sources[kind], kind == "video"
            if self.streaming:  # validation items held out of the stream
                self.train[kind], self.validation[kind], self.info[kind], self._heads[kind] = _training_stream(
                    source, video, resolution, num_frames, frame_stride, num_validation[kind], seed, cache_dir,
                    center_crop, random_flip, shuffle_buffer_size, decode_threads, rank, world_size,
                )  # fmt: skip
            elif video:
                self.train[kind], self.validation[kind], self.info[kind] = training_clips(
                    resolution, num_frames, num_validation[kind], seed, source.data_dir, source.dataset_name,
                    source.column, source.dataset_config_name, cache_dir, frame_stride, center_crop, random_flip,
                )  # fmt: skip
            else:
                self.train[kind], self.validation[kind], self.info[kind] = training_images(
                    resolution, num_validation[kind], seed, source.dataset_name, source.data_dir, source.column,
                    source.dataset_config_name, cache_dir, center_crop, random_flip,
                )  # fmt: skip
        images, videos = self.train.get("image"), self.train.get("video")
        self._block_stop_signals = bool(num_workers) and hasattr(signal, "pthread_sigmask")
        if self._block_stop_signals:  # a worker unblocks them once its worker_init_fn has run (see epoch())
            worker_init_fn = partial(_init_then_unblock_stop_signals, worker_init_fn)
        if self.streaming:  # endless; not prepared by accelerate (each process reads its own share of the shards)
            self.dataset, self.loader = None, None
        elif joint:
            self.dataset = JointBatches(images, videos, self.batch_sizes["image"], self.batch_sizes["video"], seed)
            self.loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=1, collate_fn=unwrap_batch, num_workers=num_workers,
                worker_init_fn=worker_init_fn,  # a job-wide SIGTERM stops the loop, not the workers
            )  # fmt: skip
        else:
            self.dataset = images
            self.loader = torch.utils.data.DataLoader(
                images, batch_size=self.batch_sizes["image"], shuffle=True, collate_fn=collate,
                num_workers=num_workers, drop_last=len(images) >= self.batch_sizes["image"],
                worker_init_fn=worker_init_fn,
            )  # fmt: skip

    @property
    def stream_batch_size(self) -> Optional[int]:
        """The per-process batch DeepSpeed must be told when nothing prepared gives it (streams); else None."""
        return (self.batch_sizes["image"] or self.batch_sizes["video"]) if self.streaming else None

    def prepare(self, accelerator, model, optimizer, lr_scheduler):
        """``accelerator.prepare`` of the training objects, with the ``DataLoader`` of map-style data (a stream is
        already split across the processes: accelerate must not dispatch or re-shard it)."""
        if self.streaming:
            return accelerator.prepare(model, optimizer, lr_scheduler)
        model, optimizer, self.loader, lr_scheduler = accelerator.prepare(model, optimizer, self.loader, lr_scheduler)
        return model, optimizer, lr_scheduler

    def steps_per_epoch(self, max_train_steps: int, accumulation: int) -> int:
        """Optimizer steps per epoch; a stream has no length: one endless "epoch", ended by ``max_train_steps``."""
        if self.streaming:
            return max_train_steps
        return math.ceil(len(self.loader) / accumulation)

    def epoch(self, accelerator, epoch: int, skip_batches: int = 0):
        """The batches of ``epoch`` on ``accelerator.device`` (a map-style epoch after a resume without its first
        ``skip_batches``; a stream counts its own epochs and resumes from its saved position)."""
        if self.streaming:
            return _stream_batches(self.train, self.batch_sizes, accelerator.device)
        for dataset in (self.dataset, getattr(self.dataset, "images", None), getattr(self.dataset, "videos", None)):
            if hasattr(dataset, "epoch"):
                dataset.epoch = epoch
        self.loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(self.loader, skip_batches) if skip_batches else self.loader
        return _first_batch_without_stop_signals(batches) if self._block_stop_signals else batches

    def save_state(self, folder: str) -> None:
        """This process's stream positions into checkpoint ``folder`` (``{kind}_stream``); nothing for map-style."""
        for kind, path in self._state_folders(folder).items():
            os.makedirs(path, exist_ok=True)
            save_stream_state(self.train[kind], path)

    def load_state(self, folder: str) -> None:
        """The stream positions of checkpoint ``folder``; a stream the checkpoint lacks starts from its beginning."""
        for kind, path in self._state_folders(folder).items():
            if not load_stream_state(self.train[kind], path):
                logger.warning(
                    f"{folder} holds no {kind} stream position for process {self.rank} (saved by a run that did "
                    "not stream, or with fewer processes): that stream starts from its beginning."
                )

    def _state_folders(self, folder: str) -> Dict[str, str]:
        return {kind: os.path.join(folder, f"{kind}_stream") for kind in self.train} if self.streaming else {}

    @property
    def statistics_kind(self) -> str:
        """What the latent statistics are estimated on: clips for a video AE that trains on them (what a video DiT
        would train on), else images."""
        return "clips" if "video" in self.train else "images"

    def statistics_items(self, num_samples: int):
        """The items of the latent statistics: the dataset (sampled by the caller), or a stream's first
        ``num_samples`` training items of one unshuffled pass."""
        kind = "video" if "video" in self.train else "image"
        return self._heads[kind](num_samples) if self.streaming else self.train[kind]


def _training_stream(source: DataSource, video: bool, resolution: int, num_frames: int, frame_stride: int,
                     num_val: int, seed: int, cache_dir, center_crop: bool, random_flip: bool, buffer_size: int,
                     decode_threads: int, rank: int, world_size: int):  # fmt: skip
    """Streamed training images (clips for ``video``): ``(stream, validation pixels, info, head)``.

    The validation items are the first readable samples in shard order (the same on every process), excluded from
    the stream: never trained on. ``stream`` is this process's share (``rank`` of ``world_size``), shuffled through
    the buffer; ``head(n)`` gives the first ``n`` training items of one unshuffled pass (the latent statistics).
    """
    stream_source = open_streaming_source(
        source.dataset_name, source.data_dir, source.data_files, source.column,
        dataset_config_name=source.dataset_config_name, cache_dir=cache_dir, video=video,
    )  # fmt: skip
    if video:
        read = clip_reader(resolution, num_frames, frame_stride)
        make = partial(clip_stream, stream_source, resolution, num_frames, frame_stride)
        what, flag = "videos", "--num_validation_videos"
    else:
        read, make = image_reader(resolution), partial(image_stream, stream_source, resolution)
        what, flag = "images", "--num_validation_images"
    val, held_out, info = hold_out_first(stream_source, num_val, read)
    if val is None:
        raise UsageError(f"The stream has no readable {what} to hold out for validation: check the data ({flag}).")
    if val.shape[0] < num_val:
        logger.warning(f"Only {val.shape[0]} readable {what} could be held out for validation ({flag} {num_val}).")
    augment = dict(center_crop=center_crop, random_flip=random_flip, seed=seed, exclude=held_out)
    stream = make(**augment, buffer_size=buffer_size, rank=rank, world_size=world_size, decode_threads=decode_threads)

    def head(n: int) -> List:
        items, first = [], make(**augment, shuffle=False, decode_threads=decode_threads)
        for item in first:
            if first.epoch > 0 or len(items) == n:  # one pass at most: a small dataset is not repeated
                break
            items.append(item)
        return items

    return stream, val, info, head


def _stream_batches(streams: Dict, batch_sizes: Dict[str, int], device):
    """Endless per-process batches of streams, as :class:`JointBatches` gives them, on ``device``. Read here, in the
    training process, one batch at a time (``num_workers=0``, no prefetch), so that a checkpoint's stream positions
    are those of the last batch trained on."""
    parts = (("pixel_values", "image"), ("video_values", "video"))
    loaders = {
        key: iter(torch.utils.data.DataLoader(streams[kind], batch_size=batch_sizes[kind], collate_fn=collate))
        for key, kind in parts
        if batch_sizes[kind]
    }
    while True:
        batch = {"pixel_values": None, "video_values": None, "skipped": []}
        for key, loader in loaders.items():
            part = next(loader)
            batch[key] = part["pixel_values"].to(device)
            batch["skipped"] += part["skipped"]
        yield batch


# ----------------------------------------------------------------------------------------------------------------
# Stop signals and DataLoader workers

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_END = object()


def _init_then_unblock_stop_signals(worker_init_fn: Optional[Callable], worker_id: int) -> None:
    """A DataLoader worker's start: the given ``worker_init_fn`` (the training scripts': ignore SIGTERM and Ctrl-C),
    then the stop signals it was forked with blocked are unblocked (one sent meanwhile is then handled as that
    function decided)."""
    if worker_init_fn is not None:
        worker_init_fn(worker_id)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _first_batch_without_stop_signals(batches):
    """``batches``, with SIGTERM and SIGINT blocked in this thread while the first one is fetched, which is when
    the DataLoader forks its workers: they start with both blocked. Torch gives a worker a SIGTERM handler that ends
    it before its ``worker_init_fn`` runs, so a job-wide SIGTERM that arrived in that window killed the worker, and
    the training process failed ("DataLoader worker ... killed by signal") instead of stopping with a checkpoint. In
    the training process a signal is handled as before (another thread may take it; the handler sets a flag)."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:  # a DataLoader forks at iter(), accelerate's at the first next()
        iterator = iter(batches)
        first = next(iterator, _END)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if first is _END:
        return
    yield first
    yield from iterator
