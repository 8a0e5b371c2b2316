"""Checkpoints of the training scripts: written atomically (``save_checkpoint``), found (``latest_checkpoint``: the
newest *complete* one), resumed from (``resolve_resume``, ``load_checkpoint``, ``resume_position``), pruned.
"""

import json
import logging
import os
import shutil
from typing import Callable, List, Optional, Sequence, Tuple

from ..errors import MissingPathError, UsageError, error_summary
from ..files import CHECKPOINT_RE, disk_full_error, is_disk_full

logger = logging.getLogger(__name__)

CHECKPOINT_MARKER = "training_state.json"  # written last into a checkpoint: its presence means "complete"


def remove_checkpoints(output_dir: str, also: Sequence[str] = ()) -> List[str]:
    """Delete every ``checkpoint-*`` folder (and leftover temporary checkpoints) of ``output_dir``, and the folders
    named in ``also`` (other parts of a run that ``latest`` could mistake for this one's, e.g. pipeline snapshots);
    returns the names removed."""
    if not os.path.isdir(output_dir):
        return []
    gone = [
        n
        for n in sorted(os.listdir(output_dir))
        if CHECKPOINT_RE.match(n) or n.startswith(".tmp-checkpoint-") or n in also
    ]
    for name in gone:
        shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return gone


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_step(path: str) -> int:
    """The step of a ``checkpoint-N`` folder (from its marker file when it has one)."""
    marker = os.path.join(path, CHECKPOINT_MARKER)
    if os.path.isfile(marker):
        with open(marker) as fh:
            return int(json.load(fh)["step"])
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    if match is None:
        raise UsageError(f"{path} is not a checkpoint-N folder written by this toolkit.")
    return int(match.group(1))


def is_complete_checkpoint(path: str) -> bool:
    """A checkpoint is complete when every process finished writing it (the marker file is written last)."""
    return os.path.isfile(os.path.join(path, CHECKPOINT_MARKER))


def list_checkpoints(output_dir: str) -> List[str]:
    """The ``checkpoint-N`` folders of ``output_dir``, oldest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    names = [
        n for n in os.listdir(output_dir) if CHECKPOINT_RE.match(n) and os.path.isdir(os.path.join(output_dir, n))
    ]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n.split("-")[1]))]


def latest_checkpoint(output_dir: str, warn: Callable[[str], None] = logger.warning) -> Optional[str]:
    """The newest complete checkpoint of ``output_dir`` (``None`` when there is none); incomplete ones are skipped
    with a warning (a process killed while writing, or a folder copied in part)."""
    for path in reversed(list_checkpoints(output_dir)):
        if is_complete_checkpoint(path):
            return path
        warn(
            f"Skipping {path}: it is incomplete (no {CHECKPOINT_MARKER}: the run was probably killed while saving it, "
            "or an older version wrote it; pass it to --resume_from_checkpoint explicitly to try it)."
        )
    return None


def resolve_resume(
    output_dir: str, resume_from_checkpoint: Optional[str], warn=logger.warning, found: Sequence[str] = ()
) -> Optional[str]:
    """The checkpoint to resume from: ``None`` (new run), the latest complete one, or a checked explicit folder.

    ``latest`` with no complete checkpoint starts a new run, unless ``found`` (what :func:`check_output_dir` found in
    ``output_dir``) names results that a new run would replace: that is refused with a :class:`UsageError`. An
    explicit folder that does not exist raises :class:`UsageError` before any heavy work; one without the marker (an
    older version's checkpoint, or a save that was killed) is tried with a warning, and :func:`load_checkpoint` says
    so clearly if it is damaged.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        path = latest_checkpoint(output_dir, warn)
        results = [name for name in found if not CHECKPOINT_RE.match(name)]
        if path is None and results:
            raise UsageError(
                f"--resume_from_checkpoint latest: {output_dir} has no complete checkpoint to resume, and a new run "
                f"would replace the earlier run's {', '.join(results[:4])} there: choose a new --output_dir, or pass "
                "--overwrite_output_dir (without --resume_from_checkpoint) to replace it."
            )
        if path is None:
            warn(f"--resume_from_checkpoint latest: no complete checkpoint in {output_dir}: starting a new run.")
        return path
    if not os.path.isdir(resume_from_checkpoint):
        raise MissingPathError(f"--resume_from_checkpoint {resume_from_checkpoint} is not a folder.")
    if not is_complete_checkpoint(resume_from_checkpoint):
        warn(
            f"--resume_from_checkpoint {resume_from_checkpoint} has no {CHECKPOINT_MARKER} (written by an older "
            "version, or the run was killed while saving it): trying to load it anyway."
        )
    return resume_from_checkpoint


def load_checkpoint(accelerator, path: str) -> int:
    """``accelerator.load_state(path)`` with a clear message for a damaged checkpoint; returns its step. A checkpoint
    written with another process count is refused: the global batch, the data order and the sharded states would
    silently change."""
    marker = os.path.join(path, CHECKPOINT_MARKER)
    if os.path.isfile(marker):
        try:
            with open(marker) as fh:
                saved = json.load(fh).get("num_processes")
        except (OSError, ValueError, AttributeError) as err:
            raise UsageError(
                f"Checkpoint {path} is damaged: its {CHECKPOINT_MARKER} cannot be read ({type(err).__name__}). "
                "Resume from another checkpoint."
            ) from None
        if saved is not None and saved != accelerator.num_processes:
            raise UsageError(
                f"Checkpoint {path} was written by {saved} process(es) and this launch has "
                f"{accelerator.num_processes}: the global batch and the data order would change. Resume with "
                f"`accelerate launch --num_processes {saved}`, or start a new run in another --output_dir."
            )
    try:
        # accelerate reads its pickles with weights_only=True (they cannot run code) but skips random states it cannot
        # read with a log line: read them first, so that a damaged one stops the resume instead of changing it
        from accelerate.utils import load

        for name in sorted(os.listdir(path)):
            if name.startswith("random_states_") and name.endswith(".pkl"):
                load(os.path.join(path, name))
        accelerator.load_state(path)
    except Exception as err:  # truncated pickle / safetensors, missing file, a pickle that is not plain data, ...
        raise UsageError(
            f"Checkpoint {path} is damaged and cannot be loaded ({error_summary(err)}). Delete it and resume from an earlier one "
            "(--resume_from_checkpoint latest takes the newest complete one)."
        ) from None
    return checkpoint_step(path)


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    total_limit: Optional[int] = None,
    extra: Optional[Callable[[str], None]] = None,
) -> str:
    """Save the training state atomically as ``output_dir/checkpoint-{step}``; keep the ``total_limit`` newest.

    Every process writes into ``.tmp-checkpoint-{step}``; once all are done the main process writes the marker
    file and renames the folder. Older checkpoints are deleted only after the new one is complete, so a kill at
    any moment leaves at least the previous complete checkpoint. ``extra(folder)``, when given, runs on every
    process after ``save_state`` and before the marker, to add files of its own (e.g. each process's data-stream
    position, :func:`~.streaming.save_stream_state`). Collective: call it on every process.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process and os.path.lexists(tmp):
        shutil.rmtree(tmp)  # a leftover of a killed save
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        if extra is not None:
            extra(tmp)
    except Exception as err:
        if not is_disk_full(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoints stay as they were
        raise disk_full_error(f"checkpoint-{step}", output_dir) from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, CHECKPOINT_MARKER), "w") as fh:
            json.dump({"step": step, "num_processes": accelerator.num_processes}, fh)
        if os.path.lexists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:  # None or 0: keep every checkpoint
            complete = [p for p in list_checkpoints(output_dir) if is_complete_checkpoint(p)]
            for old in complete[: max(0, len(complete) - total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
                logger.info(f"Removed {old} (--checkpoints_total_limit {total_limit})")
    accelerator.wait_for_everyone()
    return final


def resume_position(accelerator, path: Optional[str], steps_per_epoch: int, accumulation: int) -> Tuple[int, int, int]:
    """``(global_step, first_epoch, batches_to_skip)`` after loading checkpoint ``path`` (``(0, 0, 0)`` for None)."""
    if path is None:
        return 0, 0, 0
    logger.info(f"Resuming from {path}")
    step = load_checkpoint(accelerator, path)
    return step, step // steps_per_epoch, (step % steps_per_epoch) * accumulation


def remove_interrupted_saves(output_dir: str, subfolders: Sequence[str] = ()) -> List[str]:
    """Delete what a killed save left (``.tmp-checkpoint-*``, ``.tmp-save-*``; ``.old-*`` in ``subfolders``):
    never complete, never resumed. Returns the names removed."""
    removed = []
    for folder, prefixes in [("", (".tmp-checkpoint-", ".tmp-save-"))] + [
        (s, (".tmp-save-", ".old-")) for s in subfolders
    ]:
        path = os.path.join(output_dir, folder)
        if not os.path.isdir(path):
            continue
        for name in sorted(os.listdir(path)):
            if name.startswith(prefixes):
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
                removed.append(os.path.join(folder, name) if folder else name)
    return removed
