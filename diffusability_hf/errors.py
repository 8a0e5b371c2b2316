"""The toolkit's errors and how a script reports them: one line, ``error: ...``, exit code 2 (``run_script``, which
also leaves no process group of a launched run to interpreter exit, and makes its forks wait for gloo's threads).

``UsageError`` is the base of every error the user can fix (arguments, files, environment). This module imports
nothing of the toolkit: it is the bottom of the import graph.
"""

import gc
import os
import sys
import threading
import time
import traceback
from functools import partial
from typing import Callable


class UsageError(ValueError):
    """A problem with the user's arguments, files or environment that the user can fix (printed as one line)."""


class MissingPathError(UsageError, FileNotFoundError):
    """A path the user named (or a download the run needs) does not exist."""


class TrainingStopped(Exception):
    """A run stopped on request (SIGTERM, Ctrl-C) after saving a checkpoint: :func:`run_script` prints its message
    as one line and exits with ``128 + signal number``, as a process killed by that signal would."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


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


def _say(line: str) -> None:
    """One line to stderr in one write: the processes of a launch share the log, and ``print`` writes the text and
    its newline apart (unbuffered, as under ``PYTHONUNBUFFERED``), so two processes' lines could run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def launched_processes() -> int:
    """The number of processes of this launch, read as accelerate reads it (torchrun and ``accelerate launch`` set
    ``WORLD_SIZE``; MPI launchers their own variables); 1 for a plain ``python script.py``."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def import_before_process_group() -> None:
    """Import the modules that put the default process group into their functions' default arguments
    (``group=group.WORLD``): ``torch.distributed.nn`` (which diffusers imports) and DeepSpeed's communication module
    (which accelerate's ``unwrap_model`` imports where DeepSpeed is installed).

    Imported for the first time while a group exists, they keep it alive after ``destroy_process_group``: its gloo
    threads are then torn down during interpreter finalization, where a thread that needs the interpreter can abort
    the process (SIGABRT, "terminate called without an active exception") or hang it after all its work is done.
    Imported before the group exists, they hold nothing, and ``end_training`` frees the group and stops its threads.
    """
    import importlib
    import importlib.util

    for name in ("torch.distributed.nn", "deepspeed"):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            importlib.import_module(name)


_fork_wait_registered = False


def settle_threads_before_fork(limit_s: float = 2.0) -> None:
    """Make every later ``os.fork`` of this process (a ``DataLoader`` forks its workers each epoch) wait, with the GIL
    released, until no thread that runs outside Python is running (at most ``limit_s`` seconds). Once per process;
    ``run_script`` calls it in a multi-process launch, whose process group runs gloo's threads. CPython 3.12 and later
    need none of it.

    Why: on CPython 3.11 and earlier (3.11.7 measured) a child forked while another thread held the interpreter's
    thread-list lock deadlocks inside ``os.fork`` (CPython gh-112275: the child takes that lock before resetting it).
    gloo's worker threads take it without the GIL, each time they free a finished collective whose tensors have Python
    objects, which is just before an epoch's fork (accelerate synchronises the RNG with a collective as an epoch
    starts). The worker never started and the run waited for its batch forever: 9 of 29 two-process runs of 300
    one-step epochs hung, none of 12 with this wait. Those threads take the lock only while running, and once the
    collectives are freed they sleep until this process starts another, so waiting until none runs leaves the lock
    free at the fork."""
    global _fork_wait_registered
    if _fork_wait_registered or sys.version_info >= (3, 12) or not hasattr(os, "register_at_fork"):
        return
    _fork_wait_registered = True
    os.register_at_fork(before=partial(_wait_for_native_threads, limit_s))


def _wait_for_native_threads(limit_s: float) -> None:
    python = {t.native_id for t in threading.enumerate()}
    deadline = time.monotonic() + limit_s
    idle = 0
    while idle < 2 and time.monotonic() < deadline:  # two looks in a row with none running
        time.sleep(0.001)  # releases the GIL: a thread that waits for it finishes what it started
        try:
            states = [_thread_state(tid) for tid in os.listdir("/proc/self/task") if int(tid) not in python]
        except OSError:
            return
        idle = idle + 1 if "R" not in states else 0


def _thread_state(tid: str) -> str:
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:  # the thread ended
        return "X"


def _free_the_process_group() -> None:
    """Destroy the process group where the run left it (a stopped or failed run never reaches ``end_training``) and
    free what the run leaves in reference cycles (the accelerator, a DDP or FSDP module and the group they hold),
    while the interpreter is fully alive: gloo's worker threads released during interpreter finalization can abort
    a process (SIGABRT) after all its work is done (see :func:`import_before_process_group`)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def run_script(main: Callable, parse_args: Callable) -> None:
    """``main(parse_args())`` as a command: input errors become one ``error: ...`` line on stderr and exit code 2;
    a run stopped by a signal after its checkpoint (:class:`GracefulStop`) one ``stopped: ...`` line and ``128 +
    signal``.

    An input error is a :class:`UsageError`, or a ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` /
    ``NotADirectoryError`` that the toolkit's own code raised (its messages say what to change). Anything else
    (a bug, an out-of-memory error, a failure inside torch or diffusers) keeps its full traceback. Set
    ``DIFFUSABILITY_TRACEBACK=1`` to see the traceback of input errors too.
    """
    if launched_processes() > 1:  # before the run creates its process group
        import_before_process_group()
        settle_threads_before_fork()
    # What exists now (the imported modules) outlives the run: frozen, the collections below and the collector's
    # own full passes during the run leave it alone (in a process forked from a server that imported torch, such a
    # pass would also copy every page it touches).
    gc.freeze()
    try:
        main(parse_args())
        _free_the_process_group()
    except TrainingStopped as stop:  # a checkpoint is saved: one line, and the exit code of that signal
        _free_the_process_group()
        _say(f"stopped: {stop}")
        sys.exit(stop.exit_code)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        if os.environ.get("DIFFUSABILITY_TRACEBACK") or not (isinstance(err, UsageError) or _raised_by_toolkit(err)):
            raise
        _free_the_process_group()
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message holds
        _say(f"error: {message}")
        sys.exit(2)
    finally:
        gc.unfreeze()  # a caller that goes on (a test running the script in its process) collects as before


def error_summary(err: BaseException, limit: int = 200) -> str:
    """``"TypeName: first line of the message"`` (cut to ``limit`` characters), for a one-line error that names its
    cause (torch's and safetensors' messages run over many lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__
