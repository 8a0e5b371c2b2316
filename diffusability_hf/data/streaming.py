"""Streaming data for web-scale training and latent extraction: webdataset tar shards (local, ``http(s)://``,
``hf://`` or any fsspec URL) and HF ``datasets`` in streaming mode (Hub or local), split across processes, shuffled
through a seeded buffer, resumable without repeats.

Items are exactly those of the map-style datasets, made by the same transforms (:func:`~.data.resize_and_crop`,
:func:`~.data.open_image`, :func:`~.video_data.read_clip`, :func:`~.video_data.clip_to_tensor`):

- :func:`image_stream`: ``{"pixel_values": (3, R, R), "skipped": [(where, reason), ...]}`` as
  :class:`~.data.HFImageDataset`; a corrupt sample is skipped and named in the next item's ``skipped`` (the training
  loop's :class:`~.data.SkipLog` counts it as today), and so is the unread rest of a truncated shard.
- :func:`clip_stream`: the same with clips ``(3, T, R, R)``, as :class:`~.video_data.VideoClips`.
- :func:`labelled_items` (extraction): ``(pixels, label, sample_id, ok)`` as :class:`~.data.LabelledImages` /
  :class:`~.video_data.LabelledClips`, ``ok = False`` (zeros, label -1) for an unreadable sample.

Shards. ``--train_data_dir`` holds ``*.tar`` shards (sorted by name); ``--train_data_files`` is one or more specs
with bash brace expansion (``shards/{000000..000127}.tar``, ``{train,extra}-0.tar``: :func:`expand_braces`, the
convention of webdataset and its ``braceexpand``) and ``*`` globs (not for ``http(s)://``). A sample is the run of
consecutive members with the same name up to the first dot of the basename (webdataset's ``base_plus_ext``):
``a/0001.jpg`` + ``a/0001.cls`` is sample ``a/0001``. Image keys :data:`IMAGE_KEYS`, video keys :data:`VIDEO_KEYS`,
label keys :data:`LABEL_KEYS` (``cls`` an integer, ``txt`` a class name, ``json`` ``{"label": int or name}``).
Sample ``p`` of shard ``j`` has the stable id :func:`sample_id` ``(j, p) = j * 10**9 + p``.

Why a small ``tarfile`` reader and not ``load_dataset("webdataset", streaming=True)`` (checked with datasets 5.2):
HF's builder infers the columns from the first 5 samples of the first shard, so a sample whose image is a ``.png``
in a ``.jpg`` dataset arrives with no image at all (silently, measured), and samples whose keys differ within the
first 5 stop the load; ``.webm`` and ``.gif`` are not video columns (a GIF is an image column); the rest of a
truncated tar is dropped without a word (measured). Resume is the other reason: HF's ``IterableDataset.state_dict()``
restores shard and row offsets but not the shuffle buffer, so a resumed run skips the buffer's content for that
epoch (up to ``buffer_size`` samples per process; 5 of 32 with a buffer of 6, measured). HF datasets themselves
(:func:`load_streaming_dataset`) are read through HF (``load_dataset(..., streaming=True)``, one HF shard =
``IterableDataset.shard(num_shards, index)``, usually one data file) and go through the same splitting, buffer and
resume as the tar shards. ``http(s)://`` is read with the standard library (``urllib``: fsspec's HTTP needs
aiohttp); other URLs (``hf://``, ``s3://``, ...) through ``fsspec``.

Splitting across processes (:func:`shards_for_rank`). With at least as many shards as processes, process ``rank``
reads shards ``order[rank::world_size]`` of the epoch's shard order (each shard read by one process; processes get
different sample counts when shards do not divide evenly: each process counts its own epochs). With fewer shards,
every process reads every shard and keeps the samples whose position in the epoch's stream is ``rank`` modulo
``world_size`` (all bytes read by every process: use more shards than processes).

Shuffling. The shard order is a seeded permutation per epoch (``seed``, ``epoch``; the same on every process), and
samples pass a buffer of ``buffer_size`` (as webdataset's ``shuffle``: each arriving sample takes the place of a
random buffered one, which is emitted; the rest leave in random order at the end of the epoch), seeded by ``(seed,
epoch, rank)``. Augmentations (crops, flips, temporal starts) are seeded by ``(seed, epoch, sample id)``.

Resume (:meth:`ShardStream.state_dict`, :func:`save_stream_state`). The state is ``(epoch, consumed, the sizes of
the shards read so far this epoch)`` per process. Loading it makes the stream yield exactly what the interrupted one
would have yielded next (same samples, same order, same augmentations, the buffer's content included): the buffer is
replayed on sample positions without decoding or reading the shards already passed, then the shards that still hold
buffered samples are re-read (not decoded) to refill it. Not honoured: a different seed, buffer, shard list, rank or
process count (``load_state_dict`` refuses it, or with ``strict=False`` starts the next epoch); a shard whose content
changed; items a ``DataLoader`` worker had prefetched (a stream refuses to run in a worker: it is counted where the
training loop iterates it, so use ``num_workers=0`` and ``decode_threads`` for parallel decoding; PIL and PyAV
decode with the GIL released). ``consumed`` counts samples handed out, skipped ones included; a shard truncated
exactly at a member boundary reads as a shorter shard (tar has no index).

Do not pass a stream's ``DataLoader`` to ``accelerator.prepare``: accelerate dispatches or re-shards an
``IterableDataset`` across processes itself, and the stream is already split.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
import os
import random
import re
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..errors import UsageError
from ..files import atomic_write_json
from .images import IMAGE_EXTENSIONS, open_image, resize_and_crop, to_tensor
from .videos import VIDEO_EXTENSIONS, clip_to_tensor, read_clip

logger = logging.getLogger(__name__)

IMAGE_KEYS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # png, jpg, jpeg, webp, bmp: the first present is used
VIDEO_KEYS = tuple(e.lstrip(".") for e in VIDEO_EXTENSIONS)  # mp4, webm, mkv, mov, avi, gif
LABEL_KEYS = ("cls", "txt", "json")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
SAMPLE_ID_BASE = 10**9  # sample_id = shard * SAMPLE_ID_BASE + position: readable in decimal
MAX_CONSECUTIVE_UNREADABLE = 100  # as the map-style datasets


def sample_id(shard: int, position: int) -> int:
    """The stable id of sample ``position`` of shard ``shard`` (``shard * 10**9 + position``): fits int64."""
    if not 0 <= position < SAMPLE_ID_BASE:
        raise ValueError(f"A shard position must be in [0, {SAMPLE_ID_BASE}), got {position}.")
    return shard * SAMPLE_ID_BASE + position


def split_sample_id(sid: int) -> Tuple[int, int]:
    """``(shard, position)`` of a :func:`sample_id`."""
    return divmod(int(sid), SAMPLE_ID_BASE)


# ----------------------------------------------------------------------------------------------------------------
# Shard lists


def expand_braces(spec: str) -> List[str]:
    """Bash brace expansion: ``{a,b}`` alternatives and ``{000..127}`` ranges (zero-padded as written, also
    descending), nested and combined; a brace with neither is kept as text (as bash does)."""
    depth, start = 0, None
    for i, ch in enumerate(spec):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
            if depth == 0:
                head, body, tail = spec[:start], spec[start + 1 : i], spec[i + 1 :]
                parts, level, last = [], 0, 0
                for j, c in enumerate(body):  # split at top-level commas
                    level += (c == "{") - (c == "}")
                    if c == "," and level == 0:
                        parts.append(body[last:j])
                        last = j + 1
                parts.append(body[last:])
                if len(parts) == 1:
                    m = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
                    if not m:  # not an expansion: keep "{body}" and expand what follows
                        return [head + "{" + b + "}" + t for b in expand_braces(body) for t in expand_braces(tail)]
                    lo, hi = int(m.group(1)), int(m.group(2))
                    padded = any(len(e.lstrip("-")) > 1 and e.lstrip("-")[0] == "0" for e in m.groups())
                    pad = max(len(m.group(1)), len(m.group(2))) if padded else 0  # bash: {000..127} keeps 3 digits
                    step = 1 if hi >= lo else -1
                    parts = [str(v).zfill(pad) for v in range(lo, hi + step, step)]
                return [head + p + t for part in parts for p in expand_braces(part) for t in expand_braces(tail)]
    return [spec]


def _is_url(path: str) -> bool:
    return "://" in path


def _glob(pattern: str) -> List[str]:
    """The sorted matches of a glob pattern, locally or on an fsspec filesystem (``hf://``, ``s3://``, ...)."""
    if not _is_url(pattern):
        return sorted(glob.glob(pattern))
    if pattern.startswith(("http://", "https://")):
        raise UsageError(f"{pattern}: http(s) URLs cannot be listed; name the shards with braces, e.g. {{000..127}}.")
    import fsspec

    fs, path = fsspec.core.url_to_fs(pattern)
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))


def _check_local_tar(path: str) -> None:
    """Raise a one-line ``UsageError`` unless ``path`` is a readable tar archive (its first header is read)."""
    if not os.path.isfile(path):
        raise UsageError(f"The shard {path} does not exist.")
    try:
        with tarfile.open(path, "r|*"):
            pass
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UsageError(f"The shard {path} is not a readable tar archive ({err}).") from None


def list_shards(train_data_dir: Optional[str] = None, train_data_files=None) -> List[str]:
    """The shard list of ``--train_data_dir`` (its ``*.tar`` files, sorted; local or a listable URL) or of
    ``--train_data_files`` (a spec or a list of specs, expanded by :func:`expand_braces`, then globbed where they
    hold ``*?[``; order kept). Local shards are checked to be readable tar archives; remote ones when read.
    Raises a one-line ``UsageError`` for a missing folder, a folder without shards, a pattern that matches nothing,
    a missing or unreadable local file."""
    if (train_data_dir is None) == (train_data_files is None):
        raise UsageError("Give the shards with exactly one of --train_data_dir and --train_data_files.")
    if train_data_dir is not None:
        root = train_data_dir.rstrip("/")
        if not _is_url(root) and not os.path.isdir(root):
            raise UsageError(f"--train_data_dir {train_data_dir} is not a folder.")
        shards = sorted(set(s for suffix in SHARD_SUFFIXES for s in _glob(f"{root}/*{suffix}")))
        if not shards:
            raise UsageError(f"--train_data_dir {train_data_dir} holds no tar shards ({', '.join(SHARD_SUFFIXES)}).")
    else:
        specs = [train_data_files] if isinstance(train_data_files, str) else list(train_data_files)
        shards = []
        for spec in specs:
            for name in expand_braces(spec):
                if re.search(r"[*?\[]", name):
                    found = _glob(name)
                    if not found:
                        raise UsageError(f"--train_data_files pattern {name} matches no file.")
                    shards += found
                else:
                    shards.append(name)
        if not shards:
            raise UsageError("--train_data_files names no shard.")
    for shard in shards:
        if not _is_url(shard):
            _check_local_tar(shard)
    return shards


# ----------------------------------------------------------------------------------------------------------------
# Sources: shards of raw samples, each read in order


def _open_url(url: str, retries: int = 3):
    """A binary file object for a local path, an ``http(s)://`` URL (urllib) or an fsspec URL; a remote open that
    fails is tried ``retries`` times (1 s, 2 s, ... apart; a missing file or an HTTP 4xx once), then a one-line
    ``UsageError`` names the URL."""
    if not _is_url(url):
        return open(url, "rb")
    for attempt in range(retries):
        try:
            if url.startswith(("http://", "https://")):
                import urllib.request

                return urllib.request.urlopen(url, timeout=60)
            import fsspec

            return fsspec.open(url, "rb").open()
        except Exception as err:
            permanent = isinstance(err, FileNotFoundError) or 400 <= getattr(err, "code", 0) < 500  # e.g. HTTP 404
            if permanent or attempt == retries - 1:
                raise UsageError(f"Cannot open the shard {url}: {type(err).__name__}: {err}") from None
            time.sleep(1 + attempt)


def _base_plus_ext(name: str):
    """``(key, extension)`` of a tar member name, as webdataset's ``tariterators.base_plus_ext``: the key is the
    path up to the first dot of the basename; ``(None, None)`` for a name without one."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def iter_tar_samples(fileobj, start: int = 0) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample of a tar stream, in order, from sample ``start`` on (the earlier
    ones are read but not kept). Members without an extension are ignored (webdataset does the same); a repeated
    extension within a sample is kept under ``"__error__"`` (the sample is then unreadable). Raises the tar error of
    a corrupt or truncated archive where it happens."""
    position, key, fields = -1, None, {}
    with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
        for member in tf:
            if not member.isfile():
                continue
            base, ext = _base_plus_ext(member.name)
            if base is None:
                continue
            if base != key:
                if key is not None and position >= start:
                    yield key, fields
                position, key, fields = position + 1, base, {}
            if position < start:
                continue  # before the resume point: not kept (tar has no index to seek with)
            data = tf.extractfile(member).read()
            if ext in fields:
                fields["__error__"] = f"duplicate member {member.name}".encode()
            fields[ext] = data
        if key is not None and position >= start:
            yield key, fields


def _label_from(value, class_names: Optional[Sequence[str]]) -> int:
    """An integer label from an int, a digit string or a class name (then ``class_names`` must hold it)."""
    if isinstance(value, bool):
        raise ValueError(f"label {value!r} is not a class")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if re.fullmatch(r"\d+", text):
        return int(text)
    if class_names is None or text not in class_names:
        raise ValueError(f"label {text!r} is not one of the class names (pass class_names)")
    return list(class_names).index(text)


class TarShards:
    """Webdataset tar shards (URLs or paths, see :func:`list_shards`): shard ``j`` is ``urls[j]``; a raw sample is
    ``{extension: bytes}``. ``class_names`` maps ``txt`` labels (and names the classes for metadata)."""

    def __init__(self, urls: Sequence[str], class_names: Optional[Sequence[str]] = None):
        self.urls, self.class_names = list(urls), (list(class_names) if class_names is not None else None)
        if not self.urls:
            raise UsageError("No tar shards given.")

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    def describe(self) -> List[str]:
        """What identifies the data in a resume state: the shard URLs."""
        return self.urls

    def shard_name(self, shard: int) -> str:
        return self.urls[shard]

    def iter_shard(self, shard: int, start: int = 0) -> Iterator[Tuple[str, Dict[str, bytes]]]:
        """``(where, raw sample)`` of shard ``shard`` from position ``start``; ``where`` is ``url#key``."""
        with _open_url(self.urls[shard]) as fh:
            for key, fields in iter_tar_samples(fh, start):
                yield f"{self.urls[shard]}#{key}", fields

    @staticmethod
    def _pick(raw: Dict[str, bytes], keys: Sequence[str], what: str, where: str) -> Dict:
        if "__error__" in raw:
            raise ValueError(raw["__error__"].decode())
        for k in keys:
            if k in raw:
                return {"bytes": raw[k], "path": f"{where}.{k}"}
        raise ValueError(f"no {what} member ({', '.join(keys)}); members: {', '.join(sorted(raw)) or 'none'}")

    def image_cell(self, raw, where: str) -> Dict:
        return self._pick(raw, IMAGE_KEYS, "image", where)

    def video_cell(self, raw, where: str) -> Dict:
        return self._pick(raw, VIDEO_KEYS, "video", where)

    def label(self, raw, where: str) -> int:
        if "cls" in raw:
            return _label_from(raw["cls"].decode(), self.class_names)
        if "json" in raw:
            obj = json.loads(raw["json"])
            return _label_from(obj["label"] if isinstance(obj, dict) else obj, self.class_names)
        if "txt" in raw:
            return _label_from(raw["txt"].decode(), self.class_names)
        raise ValueError(f"no label member ({', '.join(LABEL_KEYS)})")


class HFShards:
    """An HF ``datasets.IterableDataset`` (``streaming=True``), its shards (``IterableDataset.shard``, usually one
    data file each) read through HF; a raw sample is a row. Media columns must be undecoded (``decode=False``:
    :func:`load_streaming_dataset` does it)."""

    def __init__(
        self, dataset, column: str, label_column: Optional[str] = None, name: str = "dataset", class_names=None,
        identity: Optional[str] = None,
    ):  # fmt: skip
        self.dataset, self.column, self.label_column, self.name = dataset, column, label_column, name
        self.identity = identity or name
        feature = (dataset.features or {}).get(label_column) if label_column else None
        names = class_names or (feature.names if hasattr(feature, "names") else None)
        self.class_names = list(names) if names else None

    @property
    def num_shards(self) -> int:
        return self.dataset.num_shards

    def describe(self) -> List[str]:
        """What identifies the data in a resume state: the dataset, its data files, shard count and column."""
        return [self.identity, str(self.num_shards), self.column]

    def shard_name(self, shard: int) -> str:
        return f"{self.name} shard {shard}"

    def iter_shard(self, shard: int, start: int = 0) -> Iterator[Tuple[str, Dict]]:
        ds = self.dataset.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        for p, row in enumerate(ds.skip(start) if start else ds, start):
            cell = row.get(self.column)
            path = cell.get("path") if isinstance(cell, dict) else None
            yield (path or f"{self.name} shard {shard} row {p}"), row

    def _cell(self, raw, where: str) -> Dict:
        cell = raw.get(self.column)
        if isinstance(cell, str):
            cell = {"bytes": None, "path": cell}
        if not isinstance(cell, dict) or not (cell.get("bytes") or cell.get("path")):
            raise ValueError(f"empty {self.column!r} cell")
        if not cell.get("bytes") and _is_url(cell["path"]):  # a remote file named by the row
            with _open_url(cell["path"]) as fh:
                cell = {"bytes": fh.read(), "path": cell["path"]}
        return cell

    image_cell = video_cell = _cell

    def label(self, raw, where: str) -> int:
        if self.label_column is None or self.label_column not in raw:
            raise ValueError(f"no label column {self.label_column!r}")
        return _label_from(raw[self.label_column], self.class_names)


def load_streaming_dataset(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    column: Optional[str] = None,
    label_column: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    data_files=None,
    cache_dir: Optional[str] = None,
    split: str = "train",
    video: bool = False,
) -> HFShards:
    """An HF dataset in streaming mode (a Hub name, a packaged builder such as ``"parquet"`` with ``data_files``, or
    a local ``imagefolder`` / ``videofolder`` given as ``train_data_dir``), its image (or ``video``) column left
    undecoded. ``column=None`` takes the first ``Image`` (``Video``) column. Errors name the missing column."""
    import datasets

    kind = datasets.Video if video else datasets.Image
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise UsageError(f"--train_data_dir {train_data_dir} is not a folder.")
        builder = "videofolder" if video else "imagefolder"
        ds = datasets.load_dataset(builder, data_dir=train_data_dir, cache_dir=cache_dir, split=split, streaming=True)
        name = train_data_dir
    else:
        ds = datasets.load_dataset(
            dataset_name, dataset_config_name, data_files=data_files, cache_dir=cache_dir, split=split, streaming=True
        )
        name = dataset_name
    features = ds.features or {}
    columns = list(features)
    if column is None:
        column = next((c for c in columns if isinstance(features[c], kind)), None)
        if column is None:
            raise UsageError(f"The dataset has no {kind.__name__} column; its columns are {columns}: name one.")
    if columns and column not in columns:
        raise UsageError(f"Column '{column}' is not in the dataset; its columns are {columns}.")
    if label_column is not None and columns and label_column not in columns:
        raise UsageError(f"--label_column '{label_column}' is not in the dataset; its columns are {columns}.")
    if isinstance(features.get(column), kind):
        ds = ds.cast_column(column, kind(decode=False))
    identity = f"{name} {dataset_config_name} {data_files} {split}"
    return HFShards(ds, column, label_column, name=name, identity=identity)


def is_shard_folder(path) -> bool:
    """Whether a data folder is read as webdataset tar shards: a URL, or a local folder holding ``*.tar`` files
    (as :func:`open_streaming_source` decides)."""
    if path is None:
        return False
    if "://" in path:
        return True
    return os.path.isdir(path) and any(name.endswith(SHARD_SUFFIXES) for name in os.listdir(path))


def open_streaming_source(
    dataset_name: Optional[str] = None,
    train_data_dir: Optional[str] = None,
    train_data_files=None,
    column: Optional[str] = None,
    label_column: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    cache_dir: Optional[str] = None,
    split: str = "train",
    video: bool = False,
    class_names: Optional[Sequence[str]] = None,
):
    """The source behind ``--streaming``: :class:`TarShards` for ``--train_data_files`` or a ``--train_data_dir``
    holding tar shards (a URL is taken as one), else :func:`load_streaming_dataset` (an ``imagefolder`` /
    ``videofolder`` folder, or ``--dataset_name`` on the Hub or a packaged builder with ``data_files``)."""
    if train_data_files is not None:
        if dataset_name is not None:
            return load_streaming_dataset(
                dataset_name, None, column, label_column, dataset_config_name, train_data_files, cache_dir, split,
                video,
            )  # fmt: skip
        return TarShards(list_shards(train_data_files=train_data_files), class_names)
    if train_data_dir is not None:
        local = not _is_url(train_data_dir)
        if not local or (
            os.path.isdir(train_data_dir) and any(f.endswith(SHARD_SUFFIXES) for f in os.listdir(train_data_dir))
        ):
            return TarShards(list_shards(train_data_dir=train_data_dir), class_names)
        source = load_streaming_dataset(
            None, train_data_dir, column, label_column, cache_dir=cache_dir, split=split, video=video
        )
    elif dataset_name is not None:
        source = load_streaming_dataset(
            dataset_name, None, column, label_column, dataset_config_name, None, cache_dir, split, video
        )
    else:
        raise UsageError("--streaming needs --dataset_name, --train_data_dir or --train_data_files.")
    if class_names:
        source.class_names = list(class_names)
    return source


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


def _decode_in_order(raws: Iterator, decode: Callable, threads: int) -> Iterator:
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
    ``rank`` of ``world_size``, epoch after epoch (see the module docstring for the split, the shuffle and resume).

    Args:
        source: the shards; decode: ``decode(source, raw, where, sid, epoch) -> item`` (raises on a corrupt sample);
        seed: shard order, buffer and augmentations; shuffle: ``False`` reads shards and samples in order;
        buffer_size: samples in the shuffle buffer (per process); decode_threads: threads decoding ahead (0: none);
        exclude: sample ids never yielded (e.g. held out for validation by :func:`hold_out_first`).

    ``epoch`` and ``consumed`` (samples of this epoch handed out, skipped ones included) say where it is;
    :meth:`state_dict` and :meth:`load_state_dict` save and restore that. Items of dict form get the corrupt
    samples met since the previous item in ``skipped``. Iterate with one iterator at a time; a new iterator
    continues where the last one stopped.
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
        for (_, where, _), (item, error) in _decode_in_order(self._emitted(epoch), decode, self.decode_threads):
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


# ----------------------------------------------------------------------------------------------------------------
# Items: the map-style datasets' transforms


def _image_pixels(source, raw, where, rng, resolution, center_crop, random_flip) -> torch.Tensor:
    """``(3, R, R)`` in ``[-1, 1]``: :class:`~.data.HFImageDataset`'s decode, resize, crop and flip."""
    image = open_image(source.image_cell(raw, where))
    return to_tensor(resize_and_crop(image, resolution, center_crop, random_flip, rng))


def _clip_pixels(
    source, raw, where, rng, resolution, num_frames, frame_stride, center_crop, random_flip, random_start
):
    """``(3, T, R, R)``: :class:`~.video_data.VideoClips`' read and transform of a video's bytes."""
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
    :class:`~.data.HFImageDataset` (batch them with :func:`~.data.collate`)."""
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
    :class:`~.video_data.VideoClips` (an unreadable or too short video is skipped)."""
    from .videos import require_pyav

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

        for _, (item, error) in _decode_in_order(self._raw(), decode, self.decode_threads):
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
    as :class:`~.data.LabelledImages` / :class:`~.video_data.LabelledClips`. Batch with the default collate."""
    if num_frames is None:
        pixels = partial(_image_pixels, resolution=resolution, center_crop=True, random_flip=False)
        shape = (3, resolution, resolution)
    else:
        from .videos import require_pyav

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
