"""Shard sources for web-scale data: webdataset tar shards (local, ``http(s)://``, ``hf://`` or any fsspec URL) and
HF ``datasets`` in streaming mode (Hub or local), each read in order. :mod:`.streaming` splits, shuffles and resumes
them; :mod:`.stream_items` makes their samples into the map-style datasets' items.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tarfile
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..errors import UsageError
from .images import IMAGE_EXTENSIONS
from .videos import VIDEO_EXTENSIONS

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
    ``{extension: bytes}``. ``class_names`` maps ``txt`` labels (and names the classes for metadata).

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
    truncated tar is dropped without a word (measured). Resume is the other reason: HF's
    ``IterableDataset.state_dict()`` restores shard and row offsets but not the shuffle buffer, so a resumed run skips
    the buffer's content for that epoch (up to ``buffer_size`` samples per process; 5 of 32 with a buffer of 6,
    measured). HF datasets themselves (:func:`load_streaming_dataset`) are read through HF
    (``load_dataset(..., streaming=True)``, one HF shard = ``IterableDataset.shard(num_shards, index)``, usually one
    data file) and go through the same splitting, buffer and resume as the tar shards. ``http(s)://`` is read with the
    standard library (``urllib``: fsspec's HTTP needs aiohttp); other URLs (``hf://``, ``s3://``, ...) through
    ``fsspec``.
    """

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
