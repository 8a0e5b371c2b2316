"""The training stream over shard sources (:mod:`.shards`): split across processes, shuffled through a seeded
buffer, resumable without repeats (:class:`ShardStream`). Its items are made by :mod:`.stream_items`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

import torch

from ..errors import UsageError
from ..files import atomic_write_json
from .shards import MAX_CONSECUTIVE_UNREADABLE, sample_id, split_sample_id

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Splitting and the shuffle buffer


def shards_for_rank(num_shards: int, rank: int, world_size: int) -> List[int]:
    """The shards process ``rank`` of ``world_size`` reads, in order: ``rank, rank + world_size, ...`` (every shard
    read by exactly one process; none for ranks beyond ``num_shards``). For latent extraction: each input shard is
    encoded once and can be written as latent shard ``j``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size}).")
    return list(range(rank, num_shards, world_size))


class _ShuffleBuffer:
    """Webdataset's buffered shuffle: each arriving sample replaces a random buffered one, which is emitted; at the
    end of the stream the buffer is shuffled once and emitted. Holds samples or, to replay a resume, positions."""

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng, self.items, self.draining = size, rng, [], False

    def push(self, item):
        """Add ``item``; return the emitted one, or ``None`` while the buffer fills."""
        self.items.append(item)
        if len(self.items) <= self.size:
            return None
        j = self.rng.randrange(len(self.items))
        self.items[j], self.items[-1] = self.items[-1], self.items[j]
        return self.items.pop()

    def drain(self) -> Iterator:
        if not self.draining:
            self.draining = True
            self.rng.shuffle(self.items)
        while self.items:
            yield self.items.pop()


def decode_in_order(raws: Iterator, decode: Callable, threads: int) -> Iterator:
    """``(raw, (item, None) or (None, error))`` per raw sample, in order; ``threads > 0`` decodes ahead in a thread
    pool (at most ``2 * threads`` samples ahead)."""

    def attempt(raw):
        try:
            return decode(raw), None
        except Exception as err:  # corrupt or unreadable: the caller skips or flags it
            return None, f"{type(err).__name__}: {err}"

    if threads <= 0:
        for raw in raws:
            yield raw, attempt(raw)
        return
    with ThreadPoolExecutor(threads) as pool:
        window = deque()
        for raw in raws:
            window.append((raw, pool.submit(attempt, raw)))
            if len(window) >= 2 * threads:
                r, fut = window.popleft()
                yield r, fut.result()
        while window:
            r, fut = window.popleft()
            yield r, fut.result()


def _refuse_worker(what: str) -> None:
    if torch.utils.data.get_worker_info() is not None:
        raise UsageError(
            f"{what} must be iterated in the training process (DataLoader num_workers=0), where its position is "
            "counted for resume; decode in parallel with decode_threads instead."
        )


# ----------------------------------------------------------------------------------------------------------------
# The training stream


class ShardStream(torch.utils.data.IterableDataset):
    """An endless stream of items over a source's shards (:class:`TarShards` or :class:`HFShards`) for process
    ``rank`` of ``world_size``, epoch after epoch (the split, the shuffle and resume are described below).

    Args:
        source: the shards; decode: ``decode(source, raw, where, sid, epoch) -> item`` (raises on a corrupt sample);
        seed: shard order, buffer and augmentations; shuffle: ``False`` reads shards and samples in order;
        buffer_size: samples in the shuffle buffer (per process); decode_threads: threads decoding ahead (0: none);
        exclude: sample ids never yielded (e.g. held out for validation by :func:`hold_out_first`).

    ``epoch`` and ``consumed`` (samples of this epoch handed out, skipped ones included) say where it is;
    :meth:`state_dict` and :meth:`load_state_dict` save and restore that. Items of dict form get the corrupt
    samples met since the previous item in ``skipped``. Iterate with one iterator at a time; a new iterator
    continues where the last one stopped.

    Splitting across processes (:func:`shards_for_rank`). With at least as many shards as processes, process ``rank``
    reads shards ``order[rank::world_size]`` of the epoch's shard order (each shard read by one process; processes get
    different sample counts when shards do not divide evenly: each process counts its own epochs). With fewer shards,
    every process reads every shard and keeps the samples whose position in the epoch's stream is ``rank`` modulo
    ``world_size`` (all bytes read by every process: use more shards than processes).

    Shuffling. The shard order is a seeded permutation per epoch (``seed``, ``epoch``; the same on every process), and
    samples pass a buffer of ``buffer_size`` (as webdataset's ``shuffle``: each arriving sample takes the place of a
    random buffered one, which is emitted; the rest leave in random order at the end of the epoch), seeded by
    ``(seed, epoch, rank)``. Augmentations (crops, flips, temporal starts) are seeded by ``(seed, epoch, sample id)``.

    Resume (:meth:`ShardStream.state_dict`, :func:`save_stream_state`). The state is
    ``(epoch, consumed, the sizes of the shards read so far this epoch)`` per process. Loading it makes the stream
    yield exactly what the interrupted one would have yielded next (same samples, same order, same augmentations, the
    buffer's content included): the buffer is replayed on sample positions without decoding or reading the shards
    already passed, then the shards that still hold buffered samples are re-read (not decoded) to refill it. Not
    honoured: a different seed, buffer, shard list, rank or process count (``load_state_dict`` refuses it, or with
    ``strict=False`` starts the next epoch); a shard whose content changed; items a ``DataLoader`` worker had
    prefetched (a stream refuses to run in a worker: it is counted where the training loop iterates it, so use
    ``num_workers=0`` and ``decode_threads`` for parallel decoding; PIL and PyAV decode with the GIL released).
    ``consumed`` counts samples handed out, skipped ones included; a shard truncated exactly at a member boundary reads
    as a shorter shard (tar has no index).

    Do not pass a stream's ``DataLoader`` to ``accelerator.prepare``: accelerate dispatches or re-shards an
    ``IterableDataset`` across processes itself, and the stream is already split.
    """

    def __init__(
        self,
        source,
        decode: Callable,
        seed: int = 0,
        shuffle: bool = True,
        buffer_size: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        decode_threads: int = 0,
        exclude: Sequence[int] = (),
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size}).")
        if buffer_size < 0 or decode_threads < 0:
            raise ValueError("buffer_size and decode_threads must be >= 0.")
        self.source, self.decode, self.seed, self.shuffle = source, decode, seed, shuffle
        self.buffer_size = buffer_size if shuffle else 0
        self.rank, self.world_size, self.decode_threads = rank, world_size, decode_threads
        self.exclude = frozenset(int(s) for s in exclude)
        self.by_shard = source.num_shards >= world_size
        self.epoch, self.consumed, self._sizes = 0, 0, {}
        self._pending: List[Tuple[str, str]] = []  # skipped since the last item

    # -- where it is

    def _identity(self) -> Dict:
        digest = hashlib.sha1("\n".join(self.source.describe()).encode()).hexdigest()
        return {
            "seed": self.seed, "shuffle": self.shuffle, "buffer_size": self.buffer_size, "rank": self.rank,
            "world_size": self.world_size, "num_shards": self.source.num_shards, "shards_sha1": digest,
            "num_excluded": len(self.exclude),
        }  # fmt: skip

    def state_dict(self) -> Dict:
        """``{"epoch", "consumed", "shard_sizes", ...}``: JSON-able; what :meth:`load_state_dict` needs to continue
        exactly after the last item handed out."""
        sizes = [[int(k), int(v)] for k, v in sorted(self._sizes.items())]
        return {"epoch": self.epoch, "consumed": self.consumed, "shard_sizes": sizes, **self._identity()}

    def load_state_dict(self, state: Dict, strict: bool = True) -> None:
        """Continue from ``state``. A state of another configuration (seed, buffer, shards, rank, process count)
        raises a ``UsageError``; with ``strict=False`` the stream starts the epoch after the saved one instead."""
        mine = self._identity()
        changed = [k for k in mine if state.get(k) != mine[k]]
        if changed:
            what = ", ".join(f"{k} {state.get(k)!r} -> {mine[k]!r}" for k in changed)
            if strict:
                raise UsageError(f"The data stream changed since the checkpoint ({what}): it cannot resume exactly.")
            logger.warning("The data stream changed since the checkpoint (%s): starting the next epoch.", what)
            self.epoch, self.consumed, self._sizes = int(state["epoch"]) + 1, 0, {}
            return
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._sizes = {int(k): int(v) for k, v in state["shard_sizes"]}

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning."""
        self.epoch, self.consumed, self._sizes = epoch, 0, {}

    def epoch_shards(self, epoch: int) -> List[int]:
        """The shards this process reads in ``epoch``, in reading order."""
        order = list(range(self.source.num_shards))
        if self.shuffle:
            random.Random(f"shards:{self.seed}:{epoch}").shuffle(order)  # the same on every process
        return [order[j] for j in shards_for_rank(len(order), self.rank, self.world_size)] if self.by_shard else order

    # -- reading

    def _walk(self, order, sizes, start=(0, 0, 0), read=True):
        """``(cursor, sid, where, raw)`` of this process's samples from ``start = (k, p, g)`` (shard ``order[k]``,
        position ``p``, ``g`` samples of the epoch's stream before it); without ``read``, positions only, from the
        known ``sizes`` (a shard of unknown size is taken as endless). Records the sizes of the shards it ends."""
        k0, p0, g = start
        for k in range(k0, len(order)):
            shard, p = order[k], (p0 if k == k0 else 0)
            if read:
                samples = self.source.iter_shard(shard, p)
            else:
                n = sizes.get(shard)
                samples = ((None, None) for _ in (range(p, n) if n is not None else itertools.count(p)))
            try:
                for where, raw in samples:
                    sid = sample_id(shard, p)
                    if (self.by_shard or g % self.world_size == self.rank) and sid not in self.exclude:
                        yield (k, p, g), sid, where, raw
                    p, g = p + 1, g + 1
            except Exception as err:
                if isinstance(err, UsageError):  # a shard that cannot be opened: a wrong URL
                    raise
                # A truncated or corrupt shard: the rest of it is skipped, and counted
                url = self.source.shard_name(shard)
                logger.warning("Shard %s is unreadable after %d samples (%s): skipping its rest", url, p, err)
                self._pending.append((str(url), f"{type(err).__name__}: {err}"))
            if read:
                sizes[shard] = p

    def _replay(self, order, sizes, consumed, buffer):
        """Replay the buffer on positions up to ``consumed`` emitted samples; returns the input cursor (``None``
        once the shards are exhausted) and fills ``buffer`` with the raw samples it holds at that point."""
        cursor, emitted = None, 0
        positions = self._walk(order, sizes, read=False)
        for pos, sid, _, _ in positions:
            if emitted == consumed:
                cursor = pos
                break
            emitted += buffer.push(sid) is not None
        else:  # the shards were exhausted: the buffer was draining
            if emitted < consumed:
                drain = buffer.drain()
                for _ in range(consumed - emitted):
                    if next(drain, None) is None:
                        break
        # Refill the buffer: re-read (not decode) the shards that hold its samples, up to the last one it holds
        want, needed, raw = set(buffer.items), {}, {}
        for sid in buffer.items:
            shard, p = split_sample_id(sid)
            needed[shard] = max(needed.get(shard, -1), p)
        for shard, last in sorted(needed.items()):
            for p, (where, sample) in enumerate(self.source.iter_shard(shard)):
                if sample_id(shard, p) in want:
                    raw[sample_id(shard, p)] = (where, sample)
                if p >= last:
                    break
        lost = [sid for sid in buffer.items if sid not in raw]
        if lost:
            logger.warning("%d buffered samples could not be read again on resume: they are left out", len(lost))
        buffer.items = [(sid, *raw[sid]) for sid in buffer.items if sid in raw]
        return cursor

    def _emitted(self, epoch: int):
        """``(sid, where, raw)`` in the order the buffer emits them this epoch, from ``self.consumed`` on."""
        order = self.epoch_shards(epoch)
        buffer = _ShuffleBuffer(self.buffer_size, random.Random(f"buffer:{self.seed}:{epoch}:{self.rank}"))
        sizes = self._sizes
        cursor = (0, 0, 0)
        if self.consumed:
            cursor = self._replay(order, sizes, self.consumed, buffer)
        if cursor is not None and not buffer.draining:
            for _, sid, where, raw in self._walk(order, sizes, cursor):
                out = buffer.push((sid, where, raw))
                if out is not None:
                    yield out
        yield from buffer.drain()

    def __iter__(self):
        _refuse_worker("A ShardStream")
        while True:
            fresh, count = self.consumed == 0, 0
            for item in self._items(self.epoch):
                count += 1
                yield item
            if fresh and count == 0:
                raise UsageError(
                    f"Process {self.rank} of {self.world_size} got no readable sample in epoch {self.epoch} of "
                    f"{self.source.num_shards} shards: check the data (or use fewer processes)."
                )
            self.epoch, self.consumed, self._sizes = self.epoch + 1, 0, {}

    def _items(self, epoch: int) -> Iterator:
        """One epoch's items from ``consumed`` on; corrupt samples go to the next item's ``skipped``."""

        def decode(entry):
            sid, where, raw = entry
            return self.decode(self.source, raw, where, sid, epoch)

        failures, unreadable = 0, 0
        for (_, where, _), (item, error) in decode_in_order(self._emitted(epoch), decode, self.decode_threads):
            if error is not None:
                self._pending.append((str(where), error))
                failures, unreadable = failures + 1, unreadable + 1
                if failures >= MAX_CONSECUTIVE_UNREADABLE:
                    raise RuntimeError(
                        f"{failures} consecutive samples could not be read (last: {where}: {error}): check the shards."
                    )
                continue
            self.consumed += 1 + unreadable  # handed out: this item and the corrupt ones before it
            failures = unreadable = 0
            if isinstance(item, dict) and "skipped" in item:
                item["skipped"] = self._pending + item["skipped"]
                self._pending = []
            yield item


def stream_state_path(folder: str, rank: int) -> str:
    """``folder/stream_state_rank{rank}.json``: one file per process, as accelerate saves per-process RNG states."""
    return os.path.join(folder, f"stream_state_rank{rank}.json")


def save_stream_state(stream: ShardStream, folder: str) -> None:
    """Write this process's :meth:`ShardStream.state_dict` into a checkpoint folder (atomically)."""
    atomic_write_json(stream_state_path(folder, stream.rank), stream.state_dict())


def load_stream_state(stream: ShardStream, folder: str, strict: bool = True) -> bool:
    """Restore this process's stream position from a checkpoint folder; ``False`` (and the stream unchanged) when
    the folder has none (a checkpoint of a run without streaming)."""
    path = stream_state_path(folder, stream.rank)
    if not os.path.isfile(path):
        return False
    with open(path) as fh:
        stream.load_state_dict(json.load(fh), strict=strict)
    return True
