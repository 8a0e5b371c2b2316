"""What the toolkit's scripts share about runs, in the spirit of ``diffusers.training_utils``.

- Output folders: refuse to overwrite another run's results or checkpoints unless asked (``check_output_dir``).
- Atomic writes: a model, pipeline or checkpoint is written into a temporary folder and moved into place when
  complete (``atomic_save``, ``save_checkpoint``), so a killed process never leaves a half-written one where a
  loadable one was; ``latest`` resumes from the newest *complete* checkpoint (``resolve_resume``).
- Errors about the user's input: one ``error: ...`` line and exit code 2, no traceback (``run_script``).
- CPU threads: ``accelerate launch`` runs a plain single CPU process on one thread (``use_all_cpu_cores``).
- Training loops: launcher checks (``check_launcher``, ``refuse_hub_token``), the accelerator set-up
  (``make_accelerator``), per-step seeding (``step_generator``), resuming (``resume_position``), the App. B
  schedule (``warmup_cosine``), peak memory (``peak_memory_gb``), throughput (``StepMeter``), non-finite losses
  (``NonFiniteGuard``), tracker settings (``tracker_config``) and the global batch a preset gives
  (``split_global_batch``, ``describe_global_batch``).
"""

import contextlib
import gc
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import traceback
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import error_summary
from .files import as_plain_write

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_MARKER = "training_state.json"  # written last into a checkpoint: its presence means "complete"
# Files that name a loadable diffusers model or pipeline: moved into place last, removed first (see atomic_save)
INDEX_FILES = ("model_index.json", "config.json")


class UsageError(ValueError):
    """A problem with the user's arguments, files or environment that the user can fix (printed as one line)."""


class MissingPathError(UsageError, FileNotFoundError):
    """A path the user named (or a download the run needs) does not exist."""


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def _raised_by_toolkit(err: BaseException) -> bool:
    """Whether the innermost frame of ``err`` is the toolkit's own code (the library or a script of its)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    here = os.path.dirname(os.path.abspath(__file__))
    top = os.path.dirname(here)
    filename = os.path.abspath(frames[-1].filename)
    return filename.startswith(here + os.sep) or filename.startswith(os.path.join(top, "train_scripts") + os.sep)


def run_script(main: Callable, parse_args: Callable) -> None:
    """``main(parse_args())`` as a command: input errors become one ``error: ...`` line on stderr and exit code 2;
    a run stopped by a signal after its checkpoint (:class:`GracefulStop`) one ``stopped: ...`` line and ``128 +
    signal``.

    An input error is a :class:`UsageError`, or a ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` /
    ``NotADirectoryError`` that the toolkit's own code raised (its messages say what to change). Anything else
    (a bug, an out-of-memory error, a failure inside torch or diffusers) keeps its full traceback. Set
    ``DIFFUSABILITY_TRACEBACK=1`` to see the traceback of input errors too.
    """
    try:
        main(parse_args())
        # Free what the run leaves in reference cycles (the accelerator, a DDP or FSDP module and the process group
        # they hold) while the interpreter is fully alive: gloo's worker threads releasing them during interpreter
        # finalization can abort a process (SIGABRT) after all its work is done.
        gc.collect()
    except TrainingStopped as stop:  # a checkpoint is saved: one line, and the exit code of that signal
        gc.collect()
        print(f"stopped: {stop}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_code)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        if os.environ.get("DIFFUSABILITY_TRACEBACK") or not (isinstance(err, UsageError) or _raised_by_toolkit(err)):
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of a training DataLoader: its worker processes ignore SIGTERM and Ctrl-C, so that a signal
    sent to the whole job (a scheduler's SIGTERM, Ctrl-C in a terminal) reaches the training process alone, which
    stops after its step with a checkpoint (:class:`GracefulStop`) and then shuts its workers down itself."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TrainingStopped(Exception):
    """A run stopped on request (SIGTERM, Ctrl-C) after saving a checkpoint: :func:`run_script` prints its message
    as one line and exits with ``128 + signal number``, as a process killed by that signal would."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class GracefulStop:
    """SIGTERM (what a cluster scheduler sends before preemption) and the first Ctrl-C (SIGINT) ask the training loop
    to stop after the current step, with a checkpoint; a second Ctrl-C stops at once (``KeyboardInterrupt``). A
    repeated SIGTERM changes nothing: a scheduler signals every process of a job and ``torchrun`` (under ``accelerate
    launch`` too) forwards the same signal to its workers, so each worker may get it twice; SIGKILL, as schedulers and
    ``torchrun`` send after their grace period, still ends the process. The handlers only set a flag: the step, a
    checkpoint being written or a validation in progress finish first. Installed on construction (main thread only),
    restored by :meth:`close`."""

    def __init__(self):
        import signal

        self.signum = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, the default behaviour stays
                pass

    def _handle(self, signum, frame):
        import signal

        if self.signum is None:
            self.signum = signum
            logger.warning(
                f"Received {signal.Signals(signum).name}: stopping after this step with a checkpoint"
                + (" (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
            )
            signal.signal(signal.SIGINT, signal.default_int_handler)  # the next Ctrl-C interrupts at once
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        # a repeated SIGTERM (the scheduler's and the launcher's copy of one request): already stopping

    def requested(self, accelerator) -> bool:
        """Whether any process was asked to stop (a collective under several processes: call it on every one, at the
        same point of the loop)."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        import torch

        flag = torch.tensor([0.0 if self.signum is None else float(self.signum)], device=accelerator.device)
        value = int(accelerator.reduce(flag, "sum").item())
        if value and self.signum is None:
            self.signum = value  # another process's signal (the same one on every process, as a launcher sends it)
        return value != 0

    def stopped(self, step: int, checkpoint: str) -> TrainingStopped:
        """The exception to raise once the checkpoint of ``step`` is saved."""
        import signal

        names = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}
        name = names.get(self.signum, f"signal {self.signum}")
        signum = self.signum if self.signum in names else signal.SIGTERM
        return TrainingStopped(
            f"Stopped by {name} after step {step}, with {checkpoint}: continue with --resume_from_checkpoint latest "
            "and the same arguments.",
            signum,
        )

    def close(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def _launcher_forced_one_thread() -> bool:
    """Whether ``OMP_NUM_THREADS=1`` came from ``accelerate launch`` itself rather than from the user.

    The launcher exports ``OMP_NUM_THREADS`` (its ``--num_cpu_threads_per_process``, 1 unless the user's own
    ``OMP_NUM_THREADS`` or a config file says otherwise) into the script's environment. So the script's ``1`` is the
    launcher's default exactly when the parent process is ``accelerate launch`` and its own environment has no
    ``OMP_NUM_THREADS``, ``--num_cpu_threads_per_process`` or ``--config_file`` (Linux ``/proc``; elsewhere this
    answers ``False`` and nothing changes).
    """
    if os.environ.get("OMP_NUM_THREADS") != "1":
        return False
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as fh:
            cmdline = fh.read().split(b"\0")
        with open(f"/proc/{parent}/environ", "rb") as fh:
            environ = fh.read().split(b"\0")
    except OSError:
        return False
    names = [os.path.basename(a) for a in cmdline[:3]]
    launched = b"accelerate.commands.launch" in cmdline or b"accelerate-launch" in names
    if b"accelerate" in names:  # `accelerate launch ...`
        launched = launched or cmdline[names.index(b"accelerate") + 1 : names.index(b"accelerate") + 2] == [b"launch"]
    asked = any(a.startswith(b"--num_cpu_threads_per_process") for a in cmdline) or b"--config_file" in cmdline
    return launched and not asked and not any(e.startswith(b"OMP_NUM_THREADS=") for e in environ)


def use_all_cpu_cores() -> Optional[int]:
    """Undo ``accelerate launch``'s one-thread default for a single CPU process; returns the new thread count.

    A plain ``accelerate launch script.py`` on one CPU process runs torch on ONE thread (the launcher exports
    ``OMP_NUM_THREADS=1``): the Quickstart took 2x longer on 2 cores. When the launcher (not the user) forced that
    one thread, there is one process and no CUDA device, use every core this process may run on. A thread count the
    user set (``OMP_NUM_THREADS``, ``--num_cpu_threads_per_process``, a config file) is kept, and several processes
    keep the launcher's split.
    """
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or torch.cuda.is_available() or torch.get_num_threads() != 1:
        return None
    if not _launcher_forced_one_thread():
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if cores > 1:
        torch.set_num_threads(cores)
        os.environ["OMP_NUM_THREADS"] = str(cores)  # for DataLoader workers and child processes
        return cores
    return None


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


# ----------------------------------------------------------------------------------------------------------------
# Training loops: what both training scripts do the same way

HUB_TOKEN_REFUSAL = (
    "--hub_token is refused: a token on the command line shows in process lists, shell history and the "
    "launcher's error messages. Log in with `hf auth login` or set the HF_TOKEN environment variable."
)


def refuse_hub_token(parser, args) -> None:
    """``parser.error`` for a ``--hub_token`` on the command line (the value itself is never echoed)."""
    if getattr(args, "hub_token", None) is not None:
        parser.error(HUB_TOKEN_REFUSAL)


def hub_repo(args) -> Optional[str]:
    """With ``--push_to_hub``, the Hub repo the run will upload to, checked (login, access) before any training;
    ``--hub_model_id`` or the output folder's name. ``None`` without ``--push_to_hub``."""
    if not args.push_to_hub:
        return None
    from .hub import check_hub_access

    return check_hub_access(
        args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)), None, args.private
    )


def check_launcher(compile: bool = False, mixed_precision: Optional[str] = None) -> None:
    """Refuse a launch the scripts cannot run (FSDP1, ``--compile`` under FSDP: :func:`~.fsdp.check_fsdp_launch`;
    DeepSpeed with bf16 or fp16), before any weights load. ``mixed_precision``: the script's ``--mixed_precision``
    (it overrides the config's ``mixed_precision``, which ``accelerate launch`` exports as
    ``ACCELERATE_MIXED_PRECISION``)."""
    from .fsdp import FSDPLaunchError, check_fsdp_launch

    try:
        check_fsdp_launch(compile)
    except FSDPLaunchError as err:
        raise UsageError(str(err)) from None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return
    # DeepSpeed's bf16/fp16 casts the whole prepared module (the frozen AE, LPIPS) to that dtype and autocasts
    # nothing, while the scripts keep fp32 weights and inputs under autocast: the first matmul fails on dtypes
    precision = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if precision == "no" and config_file != "none" and os.path.isfile(config_file):
        with open(config_file) as fh:
            ds_config = json.load(fh)
        precision = next((k for k in ("bf16", "fp16") if ds_config.get(k, {}).get("enabled") is True), "no")
    if precision != "no":
        raise UsageError(
            f"DeepSpeed with {precision} is not supported (DeepSpeed casts the whole model, frozen parts included, to "
            f"{precision}, unlike the scripts' fp32 weights under autocast): for {precision}, launch with "
            "accelerate_configs/fsdp.yaml (FSDP2) or multi_gpu.yaml (DDP); or set `mixed_precision: no` in the "
            "DeepSpeed config (and leave out --mixed_precision)."
        )


def configure_deepspeed(accelerator, micro_batch_size: Optional[int], max_grad_norm: float) -> None:
    """Under DeepSpeed, give the engine the script's flags before ``accelerator.prepare``: ``--max_grad_norm``
    (accelerate would fill the config's ``gradient_clipping: auto`` with 1.0, and the engine clips inside
    ``accelerator.backward``, so ``clip_grad_norm_`` only reads the norm) and, when given, the per-process batch
    (``prepare`` without a dataloader, as for streamed data, cannot infer it; a preset's per-process batch is known
    only after the split over the processes, so the script passes it then). A config that sets another
    ``gradient_clipping`` is refused."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    clipping = config.get("gradient_clipping", "auto")
    if clipping == "auto":
        config["gradient_clipping"] = float(max_grad_norm)
    elif float(clipping) != float(max_grad_norm):
        raise UsageError(
            f"The DeepSpeed config clips gradients at {clipping} and --max_grad_norm is {max_grad_norm}: remove "
            "`gradient_clipping` from the config (the script's --max_grad_norm is used), or pass the same value."
        )
    if micro_batch_size is not None and config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size


def make_accelerator(args):
    """The ``Accelerator`` of a training script (accumulation, precision, trackers under ``output_dir/logging_dir``,
    a seedable sampler so that a resumed run sees the batches a straight one does, under DeepSpeed the clipping and
    batch of the flags: :func:`configure_deepspeed`), with logging configured."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    configure_deepspeed(accelerator, None, args.max_grad_norm)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    return accelerator


def step_seed(seed: int, step: int, rank: int, micro: int) -> int:
    """The seed of one micro-batch: a function of (``--seed``, optimizer step, process, micro-batch) only, so that a
    resumed run draws what a straight one does and no two processes or accumulation steps share noise."""
    return seed * 1_000_003 + step * 64 + rank + micro * 7_919_000_003


def step_generator(device, seed: int, step: int, rank: int, micro: int):
    """A ``torch.Generator`` on ``device`` seeded with :func:`step_seed`; torch's global RNG (dropout, decoder noise
    injection) is seeded from the same value, offset so that the two streams differ."""
    import torch

    value = step_seed(seed, step, rank, micro)
    torch.manual_seed(value + 12_345)
    return torch.Generator(device).manual_seed(value)


def resume_position(accelerator, path: Optional[str], steps_per_epoch: int, accumulation: int) -> Tuple[int, int, int]:
    """``(global_step, first_epoch, batches_to_skip)`` after loading checkpoint ``path`` (``(0, 0, 0)`` for None)."""
    if path is None:
        return 0, 0, 0
    logger.info(f"Resuming from {path}")
    step = load_checkpoint(accelerator, path)
    return step, step // steps_per_epoch, (step % steps_per_epoch) * accumulation


def use_learning_rate(lr_scheduler, learning_rate: float, log: Callable[[str], None]) -> None:
    """After a resume, the learning rate of the command line, not the checkpoint's: the saved ``LambdaLR`` state
    restores its ``base_lrs``, so a run resumed with a lower ``--learning_rate`` (what a diverged run is told to
    do) would otherwise go on with the old one. Logs the change; nothing when they agree."""
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's AcceleratedScheduler wraps it
    old = list(sched.base_lrs)
    if all(math.isclose(b, learning_rate, rel_tol=1e-9) for b in old):
        return
    sched.base_lrs = [learning_rate for _ in old]
    for group, factor in zip(sched.optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * factor(sched.last_epoch)
    log(f"--learning_rate {learning_rate:g} replaces the checkpoint's {old[0]:g} from here on")


def warmup_cosine(step: int, warmup: int, total: int, peak: float, end: float) -> float:
    """App. B's schedule as a factor of ``peak``: linear warmup from 0 to ``peak`` over ``warmup`` steps, then cosine
    decay to ``end`` at ``total`` steps. For ``LambdaLR``; under accelerate the scheduler steps once per process per
    optimizer step, so pass ``warmup`` and ``total`` times the process count (as diffusers' examples do)."""
    if step < warmup:
        return step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (end + 0.5 * (peak - end) * (1 + math.cos(math.pi * progress))) / peak


def peak_memory_gb(device) -> float:
    """Peak accelerator memory allocated by tensors (CUDA), else the process's peak resident memory."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:  # VmHWM: unlike ru_maxrss, it does not start from the launcher's peak (kept across fork and exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StepMeter:
    """Throughput of a training loop, per optimizer step and over the run: global samples/s, step time, the time
    spent waiting on the data loader, and peak memory (``peak_memory_gb``), so that a run can be compared with
    published per-GPU figures.

    Wrap the loader (``for batch in meter.batches(loader)``: the time spent in its ``next`` is the data wait), call
    :meth:`step` right after each optimizer step (its scalars go to the progress bar and the trackers) and
    :meth:`restart` once the step's logging, checkpointing and validation are done, so that their time is not
    counted as training. A step's time runs from the previous :meth:`restart` (or construction) to :meth:`step`:
    data wait, forward, backward and optimizer, over every micro-batch of gradient accumulation. On CUDA, :meth:`step`
    synchronises the device first (kernels are asynchronous).
    """

    def __init__(self, samples_per_step: int, device, warmup_steps: int = 1):
        import time

        self._clock = time.perf_counter
        self.samples_per_step, self.device, self.warmup_steps = int(samples_per_step), device, warmup_steps
        self.times: List[Tuple[float, float]] = []  # (step time, data wait) per step, in seconds
        self.restart()

    def restart(self) -> None:
        """Start timing the next step (after logging, checkpoints and validation)."""
        self._start, self._wait = self._clock(), 0.0

    def batches(self, iterable):
        """The items of ``iterable``, with the time spent waiting for each added to the current step's data wait."""
        iterator = iter(iterable)
        while True:
            start = self._clock()
            try:
                item = next(iterator)
            except StopIteration:
                return
            self._wait += self._clock() - start
            yield item

    def step(self) -> Dict[str, float]:
        """Close the current optimizer step; its figures as tracker scalars (``train/...``)."""
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        seconds = max(self._clock() - self._start, 1e-9)
        self.times.append((seconds, self._wait))
        return {
            "train/samples_per_second": self.samples_per_step / seconds,
            "train/step_time_s": seconds,
            "train/data_wait_s": self._wait,
            "train/peak_memory_gb": peak_memory_gb(self.device),
        }

    def summary(self) -> Dict[str, object]:
        """Over the steps after the first ``warmup_steps`` (graph compilation, allocator and cache warm-up; all the
        steps when there are no more): global samples/s (samples over the summed step times), the median step time,
        the share of step time spent waiting on data, the first step's time, and the peak memory."""
        kept = self.times[self.warmup_steps :] or self.times
        total = sum(t for t, _ in kept)
        import statistics

        return {
            "samples_per_step": self.samples_per_step,
            "steps_measured": len(kept),
            "samples_per_second": self.samples_per_step * len(kept) / total if total else None,
            "median_step_time_s": statistics.median(t for t, _ in kept) if kept else None,
            "data_wait_fraction": sum(w for _, w in kept) / total if total else None,
            "first_step_time_s": self.times[0][0] if self.times else None,
            "peak_memory_gb": peak_memory_gb(self.device),
        }


def deepspeed_active(accelerator) -> bool:
    """True when ``accelerator.prepare`` hands the model to a DeepSpeed engine."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


class NonFiniteLossError(UsageError):
    """Too many optimizer steps in a row had a non-finite loss; the run stopped with a checkpoint."""


class NonFiniteGuard:
    """Skip the updates of a non-finite loss, count them, and stop a run that keeps diverging.

    ``finite(loss)`` is asked once per micro-batch: it is ``True`` only when the loss is finite on *every* process
    (the flag is reduced, so all processes skip together and no collective is left waiting). A step with a
    non-finite micro-batch skips the backward of that micro-batch and the optimizer and EMA updates of the whole
    step (the gradients are dropped), but still counts as a step: the data, the per-step seeds and the learning-rate
    schedule move on. Under DeepSpeed the engine steps inside the backward, which a skipped backward skips; with
    gradient accumulation a non-finite micro-batch stops the run (the engine keeps the step's earlier gradients). After ``max_in_a_row`` such steps in a row, :meth:`step_done` raises
    :class:`NonFiniteLossError` (the caller saves a checkpoint first).
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row, self.skipped, self.in_a_row, self._bad = max_in_a_row, 0, 0, False
        self._saved = None

    def remember(self, parameters, optimizer, ema=None, accelerator=None) -> None:
        """Keep a copy of what the coming optimizer step changes (the trainable weights, the optimizer's state, the
        EMA), so that a run that diverges stops with the weights of its last finite loss (:meth:`restore`): the
        step before a run of non-finite losses is usually the one that blew the weights up. Costs one more copy of
        those on their device (under FSDP of this process's shards); nothing with ``max_in_a_row = 0`` or under
        DeepSpeed, whose engine keeps its own partitioned optimizer state. Call it right before ``optimizer.step()``
        of a step that is not skipped."""
        import torch

        if not self.max_in_a_row or (accelerator is not None and deepspeed_active(accelerator)):
            return
        inner = getattr(optimizer, "optimizer", optimizer)
        with torch.no_grad():
            if self._saved is None:
                weights = [(p, p.detach().clone()) for p in parameters]
                self._saved = {"weights": weights, "state": {}, "ema": None}
            for p, buffer in self._saved["weights"]:
                buffer.copy_(p.detach())
            old, state = self._saved["state"], {}
            for p, entries in inner.state.items():  # AdamW: step, exp_avg, exp_avg_sq (created at the first step)
                state[p] = {}
                for key, value in entries.items():
                    if torch.is_tensor(value):
                        buffer = old.get(p, {}).get(key)
                        if buffer is None or buffer.shape != value.shape:
                            buffer = value.detach().clone()
                        else:
                            buffer.copy_(value)
                        state[p][key] = buffer
                    else:
                        state[p][key] = value
            self._saved.update(state=state, inner=inner)
            if ema is not None:
                shadow = self._saved["ema"][0] if self._saved["ema"] else [s.clone() for s in ema.shadow]
                for buffer, s in zip(shadow, ema.shadow):
                    buffer.copy_(s)
                self._saved["ema"] = (shadow, ema.num_updates, ema)

    def restore(self) -> bool:
        """Put back what :meth:`remember` kept (weights, optimizer state, EMA); ``False`` when nothing was kept."""
        import torch

        if self._saved is None:
            return False
        with torch.no_grad():
            for p, buffer in self._saved["weights"]:
                p.copy_(buffer)
            inner, state = self._saved.get("inner"), self._saved["state"]
            if inner is not None:
                for p in list(inner.state):
                    if p not in state:
                        del inner.state[p]  # had no state before that step: AdamW starts it afresh
                        continue
                    for key, value in state[p].items():
                        if torch.is_tensor(value):
                            inner.state[p][key].copy_(value)
                        else:
                            inner.state[p][key] = value
            if self._saved["ema"] is not None:
                shadow, updates, ema = self._saved["ema"]
                for s, buffer in zip(ema.shadow, shadow):
                    s.copy_(buffer)
                ema.num_updates = updates
        return True

    def finite(self, loss, accelerator) -> bool:
        import torch

        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        bad = bool(accelerator.reduce(bad, "sum").item() > 0) if accelerator.num_processes > 1 else bool(bad.item())
        if bad and accelerator.gradient_accumulation_steps > 1 and deepspeed_active(accelerator):
            # The ZeRO optimizer keeps the step's earlier micro-batch gradients, and its zero_grad leaves them
            raise NonFiniteLossError(
                "The loss was not finite, and under DeepSpeed with gradient accumulation the step cannot be skipped "
                "(DeepSpeed keeps its earlier micro-batches' gradients): resume with --resume_from_checkpoint "
                "latest after lowering --learning_rate or checking the data, or train with "
                "--gradient_accumulation_steps 1, or launch with accelerate_configs/multi_gpu.yaml or fsdp.yaml."
            )
        self._bad = self._bad or bad
        return not bad

    @property
    def step_is_bad(self) -> bool:
        """Whether a micro-batch of the current step had a non-finite loss (its updates are skipped)."""
        return self._bad

    def step_done(self, step: int) -> bool:
        """Close optimizer step ``step``; returns whether it was skipped, and raises after too many in a row."""
        skipped, self._bad = self._bad, False
        self.skipped += skipped
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if skipped and self.max_in_a_row and self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"The loss was not finite for {self.in_a_row} optimizer steps in a row (up to step {step}; "
                f"{self.skipped} skipped in all), so training stopped with a checkpoint of the weights of the last "
                "finite loss (before the step that diverged): lower --learning_rate or --max_grad_norm, train in bf16 "
                "or fp32 instead of fp16, check the data for NaN or inf values, then resume with "
                "--resume_from_checkpoint latest and the new flags (or raise --max_nonfinite_steps)."
            )
        return skipped


def tracker_config(args) -> dict:
    """The run's settings for ``accelerator.init_trackers``: scalars as they are, lists of scalars joined by spaces,
    the rest (and ``hub_token``) left out."""
    config = {}
    for key, value in vars(args).items():
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float, str)) for v in value):
            value = " ".join(map(str, value))
        if key != "hub_token" and isinstance(value, (int, float, str, bool)):
            config[key] = value
    return config


def given_flags(parser, input_args, args) -> set:
    """The settings named on the command line (by ``dest``): ``input_args`` parsed again into a namespace that already
    holds a marker for every setting of ``args``, which argparse's defaults then leave alone."""
    import argparse

    unset = object()
    probe = parser.parse_args(input_args, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return {dest for dest, value in vars(probe).items() if value is not unset}


# What a batch flag counts, for messages
BATCH_UNITS = {"train_batch_size": "images", "video_batch_size": "clips"}


def split_global_batch(
    global_sizes: Mapping[str, int], num_processes: int, accumulation: int, preset: str
) -> Dict[str, int]:
    """Per-process batch sizes that give a preset's global batch with this launch (the paper's Table 5 sizes are
    global: "a batch size of 32 (320,000 total seen images)", Sec. 4).

    ``global = per_process x num_processes x accumulation``. ``global_sizes`` maps a batch flag's ``dest`` (e.g.
    ``train_batch_size``) to the preset's global size. Returns ``{dest: per-process size}``; raises a
    :class:`UsageError` naming the process counts that divide it and the nearest per-process flags when this launch
    does not.
    """
    split = {}
    for key, total in global_sizes.items():
        if total == 0:
            split[key] = 0
            continue
        share = num_processes * accumulation
        if total % share:
            flag, what = "--" + key, BATCH_UNITS.get(key, "samples")
            near = sorted({max(1, total // share), total // share + 1})
            options = " or ".join(f"{flag} {n} ({n * share} {what} per step)" for n in near)
            counts = [n for n in range(1, total + 1) if total % (n * accumulation) == 0]
            raise UsageError(
                f"--preset {preset} trains with the paper's global batch of {total} {what} per step (Table 5), "
                f"which {num_processes} processes x {accumulation} accumulation steps do not divide: launch with "
                f"{', '.join(map(str, counts))} processes, or give the per-process batch yourself: {options}."
            )
        split[key] = total // share
    return split


def describe_global_batch(
    per_process: Mapping[str, int],
    num_processes: int,
    accumulation: int,
    preset: Optional[str] = None,
    num_frames: Optional[int] = None,
) -> dict:
    """What one optimizer step sees in total, for the log, ``metrics.json`` and the model card.

    ``per_process`` maps a unit ("images", "clips", "latents") to its per-process micro-batch; ``preset`` names the
    preset whose global batch it is (None: per-process flags); ``num_frames`` is said of clips. Returns the totals per
    unit, ``per_process``, ``num_processes``, ``gradient_accumulation_steps``, ``source`` and ``description``.
    """
    share = num_processes * accumulation
    totals = {unit: n * share for unit, n in per_process.items()}
    frames = f" of {num_frames} frames" if num_frames else ""
    text = " + ".join(f"{n} {unit}" + (frames if unit == "clips" else "") for unit, n in totals.items())
    text += f" ({' + '.join(map(str, per_process.values()))} per process x {num_processes} processes x "
    text += f"{accumulation} accumulation steps" + (f"; --preset {preset}'s Table 5 global batch)" if preset else ")")
    return {
        **totals,
        "per_process": dict(per_process),
        "num_processes": num_processes,
        "gradient_accumulation_steps": accumulation,
        "source": f"--preset {preset} (Table 5, global)" if preset else "per-process flags",
        "description": text,
    }


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


# ----------------------------------------------------------------------------------------------------------------
# The end of a run


def report_written(output_dir: str, names: Iterable[str], log: Callable[[str], None] = print) -> str:
    """One closing message: what the run wrote and where (existing names only, in the given order)."""
    names = [n for n in names if os.path.lexists(os.path.join(output_dir, n))]
    text = f"Wrote to {output_dir}: " + (", ".join(names) if names else "nothing")
    log(text)
    return text
