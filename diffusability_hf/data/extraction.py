"""The items ``extract_latents.py`` encodes, cut into the latent shards it writes, behind one object, so that the
script never asks "dataset or stream": a labelled dataset (images or clips) cut into shards of ``shard_size``, or a
stream whose input shards map one to one onto latent shards (each encoded whole, in order, by one process).
"""

import hashlib
import math
import os
from typing import Dict, List, Optional, Sequence

import torch

from .images import LabelledImages
from .shards import TarShards, open_streaming_source
from .stream_items import labelled_items
from .training import DataSource
from .videos import LabelledClips


class ExtractionItems:
    """``(pixels, label, index, ok)`` items of latent shard ``j`` (:meth:`shard`) for ``num_shards`` shards.

    ``total`` and ``dataset_size`` are None for a stream (unknown until read); :meth:`identity` names a stream's
    data by its input shards (their count and a digest of their list), what the extraction settings record.
    """

    def __init__(
        self,
        source: DataSource,
        *,
        video: bool,
        resolution: int,
        num_frames: int,
        frame_stride: int,
        seed: int,
        shard_size: int,
        max_samples: Optional[int] = None,
        label_column: str = "label",
        split: str = "train",
        cache_dir: Optional[str] = None,
        class_names: Optional[Sequence[str]] = None,
        decode_threads: int = 0,
    ):
        self.streaming, self.video, self.resolution = source.streamed, video, resolution
        self.num_frames, self.frame_stride, self.seed, self.decode_threads = (
            num_frames,
            frame_stride,
            seed,
            decode_threads,
        )
        self.source, self.dataset = None, None
        if self.streaming:  # one latent shard per input shard
            self.source = open_streaming_source(
                source.dataset_name, source.data_dir, source.data_files, source.column, label_column,
                source.dataset_config_name, cache_dir, split, video=video, class_names=class_names,
            )  # fmt: skip
            self.total, self.dataset_size, self.num_shards = None, None, self.source.num_shards
            return
        if video:
            self.dataset = LabelledClips(
                resolution, num_frames, source.data_dir, source.dataset_name, source.column, label_column,
                source.dataset_config_name, cache_dir, split, frame_stride, embedded_samples=max_samples, seed=seed,
            )  # fmt: skip
        else:
            self.dataset = LabelledImages(
                resolution, source.dataset_name, source.data_dir, source.column, label_column,
                source.dataset_config_name, cache_dir, split, embedded_samples=max_samples,
            )  # fmt: skip
        self.dataset_size = len(self.dataset)
        self.total = min(self.dataset_size, max_samples or self.dataset_size)
        self.shard_size = shard_size
        self.num_shards = math.ceil(self.total / shard_size)

    def shard(self, j: int):
        """The items of latent shard ``j``: input shard ``j`` of a stream, in order, or rows ``j * shard_size`` to
        ``(j + 1) * shard_size`` of the dataset."""
        if self.streaming:
            return labelled_items(
                self.source, [j], self.resolution, self.num_frames if self.video else None, self.frame_stride,
                self.seed, self.decode_threads,
            )  # fmt: skip
        return torch.utils.data.Subset(
            self.dataset, list(range(j * self.shard_size, min((j + 1) * self.shard_size, self.total)))
        )

    def identity(self) -> Dict:
        """What names a stream's data in the extraction settings (besides the flags): its shard count and a digest
        of its shard list (local paths made absolute, so that a rerun from another folder resumes); tar shards are
        named by that digest, however they were spelled (folder, braces, globs). Nothing for a dataset."""
        if not self.streaming:
            return {}
        names = [d if "://" in d or not os.path.exists(d) else os.path.abspath(d) for d in self.source.describe()]
        identity = {
            "shard_size": None,
            "input_shards": self.source.num_shards,
            "input_shards_sha1": hashlib.sha1("\n".join(names).encode()).hexdigest(),
        }
        if isinstance(self.source, TarShards):
            identity["dataset"] = "webdataset tar shards"
        return identity

    def class_names(self, shard_paths: Sequence[str]) -> List[str]:
        """The class names: the dataset's; a stream's from its source (HF ClassLabel, --class_names), else ``"0"``
        ... up to the largest integer label stored in the latent shards ``shard_paths``."""
        if not self.streaming:
            return self.dataset.names
        if self.source.class_names:
            return list(self.source.class_names)
        from safetensors import safe_open

        top = -1
        for path in shard_paths:
            with safe_open(path, "pt") as fh:
                labels = fh.get_tensor("labels")
            top = max(top, int(labels.max()) if len(labels) else -1)
        return [str(i) for i in range(top + 1)]
