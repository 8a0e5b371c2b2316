"""Output folders and atomic writes.

- A finished output folder is never overwritten unless asked (``check_output_dir``); one run at a time holds it
  (``lock_output_dir``).
- Models, pipelines, checkpoints and reports are written under a temporary name and moved into place when complete
  (``atomic_save``, ``atomic_write_json``), so a killed process never leaves a half-written file where a good one was.
- ``tempfile.mkstemp`` creates files with mode 0600 whatever the umask: a file written through one is given the mode
  a plain write would give it (``as_plain_write``), so the other users of a shared folder can read it.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Callable, Iterable, List, Optional, Sequence

from .errors import UsageError

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_plain_write(path: str) -> None:
    """Give ``path`` the mode ``open(path, "w")`` would have given it: ``0o666`` less the umask."""
    os.chmod(path, 0o666 & ~umask())


# Files that name a loadable diffusers model or pipeline: moved into place last, removed first (see atomic_save)
INDEX_FILES = ("model_index.json", "config.json")


# ----------------------------------------------------------------------------------------------------------------
# Output folders


def existing_outputs(output_dir: str, results: Iterable[str]) -> List[str]:
    """The names in ``output_dir`` that belong to an earlier run: any of ``results`` and every ``checkpoint-*``."""
    if not os.path.isdir(output_dir):
        return []
    names = set(os.listdir(output_dir))
    found = [r for r in results if r in names]
    found += sorted((n for n in names if CHECKPOINT_RE.match(n)), key=lambda n: int(n.split("-")[1]))
    return found


def check_output_dir(
    output_dir: str,
    results: Sequence[str],
    overwrite: bool,
    resume: Optional[str] = None,
) -> List[str]:
    """Refuse, before any heavy work, an ``output_dir`` that holds another run's results or checkpoints.

    Args:
        output_dir: the folder the script writes to.
        results: file or folder names that a finished run of this script leaves (e.g. ``config.json``).
        overwrite: ``--overwrite_output_dir`` was given: the folder may be reused (the caller removes the old
            checkpoints with :func:`remove_checkpoints` so that ``latest`` cannot resume the old run).
        resume: ``--resume_from_checkpoint``, for the training scripts: resuming reuses the folder on purpose.

    Returns the names found (empty for a new folder). Raises :class:`UsageError` naming them and the flags.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UsageError(f"--output_dir {output_dir} is a file, not a folder: choose a folder (new or empty).")
    found = existing_outputs(output_dir, results)
    if found and not overwrite and not resume:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        hint = (
            "pass --resume_from_checkpoint latest to continue it, "
            if any(CHECKPOINT_RE.match(n) for n in found)
            else ""
        )
        raise UsageError(
            f"--output_dir {output_dir} already holds the results of another run ({shown}): choose a new "
            f"--output_dir, {hint}or pass --overwrite_output_dir to replace them."
        )
    return found


_held_locks = []  # the open, locked output folders of this process: released when it exits, however it exits


def lock_output_dir(output_dir: str) -> None:
    """Create ``output_dir`` and take an exclusive lock on it for the rest of the process (call it on the main
    process, before anything is written or removed there). A second run into the same folder while the first one
    runs is refused in one line; the lock goes with the process that holds it (also on a kill), so a crashed run
    leaves nothing to clean up. An advisory ``fcntl.flock`` on the folder itself: no lock file is left behind."""
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    fd = os.open(output_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UsageError(
            f"--output_dir {output_dir} is in use by another run that is still going: wait for it to finish, or "
            "choose another --output_dir."
        ) from None
    _held_locks.append(fd)


def release_output_dir_locks() -> None:
    """Release every lock this process took with :func:`lock_output_dir`: for a caller that runs a script's ``main``
    more than once in one process (the tests); a script's own locks go with its process."""
    import fcntl

    while _held_locks:
        fd = _held_locks.pop()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ----------------------------------------------------------------------------------------------------------------
# Atomic saves


def _move_into_place(src: str, dst: str) -> None:
    """``os.replace`` for files; a folder replaces an existing one through a rename of the old one."""
    if os.path.isdir(src) and os.path.lexists(dst):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(dst))
        os.replace(dst, os.path.join(old, os.path.basename(dst)))
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def is_disk_full(err: BaseException) -> bool:
    """Whether an exception means the device is full (``ENOSPC``; safetensors reports it as "os error 28")."""
    import errno

    text = str(err)
    return getattr(err, "errno", None) == errno.ENOSPC or "os error 28" in text or "No space left" in text


def disk_full_error(what: str, where: str) -> "UsageError":
    """The one line for a write that ran out of space (the caller removed its temporary files)."""
    return UsageError(
        f"No space left on the device while writing {what} to {where}: nothing that was there before was changed. "
        "Free some space (or choose another --output_dir), then run again (training: --resume_from_checkpoint "
        "latest)."
    )


@contextlib.contextmanager
def atomic_save(output_dir: str):
    """Yield a temporary folder inside ``output_dir``; when the block ends without error, move its contents in.

    Heavy writes (``save_pretrained`` of GBs of weights) happen in the temporary folder; the move is a handful of
    renames on one file system. The files that make a folder loadable (``model_index.json``, ``config.json``) are
    removed first and moved in last, so at any moment ``output_dir`` holds the old complete model, no loadable
    model, or the new complete one, never a mix that loads. On an error the temporary folder is deleted and
    ``output_dir`` is left as it was.

    Example::

        with atomic_save(args.output_dir) as tmp:
            vae.save_pretrained(tmp)
    """
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=output_dir)
    try:
        yield tmp
        names = sorted(os.listdir(tmp), key=lambda n: n in INDEX_FILES)  # index files last
        for name in INDEX_FILES:
            if name in names and os.path.lexists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
        for name in names:
            _move_into_place(os.path.join(tmp, name), os.path.join(output_dir, name))
    except Exception as err:
        if is_disk_full(err):  # the old model stays; the half-written one goes (finally)
            raise disk_full_error("the results", output_dir) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str, text) -> None:
    """Write a text file (``str``), or a binary one (``bytes``), through a temporary file in the same folder and a
    rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as fh:
            fh.write(text)
        as_plain_write(tmp)  # mkstemp's 0600 would hide the file from the other users of a shared folder
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj, **kwargs) -> None:
    """``json.dump`` through :func:`atomic_write_text` (indent 2 by default)."""
    kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **kwargs))


# ----------------------------------------------------------------------------------------------------------------
# The end of a run


def report_written(output_dir: str, names: Iterable[str], log: Callable[[str], None] = print) -> str:
    """One closing message: what the run wrote and where (existing names only, in the given order)."""
    names = [n for n in names if os.path.lexists(os.path.join(output_dir, n))]
    text = f"Wrote to {output_dir}: " + (", ".join(names) if names else "nothing")
    log(text)
    return text
