"""CPU threads: ``accelerate launch`` runs a plain single CPU process on one thread; the scripts use every core
unless the user chose a thread count (``use_all_cpu_cores``). Of the toolkit it imports only the launch size
(``errors.launched_processes``)."""

import logging
import os
from typing import Optional

import torch

from .errors import launched_processes

logger = logging.getLogger(__name__)


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

    if launched_processes() > 1 or torch.cuda.is_available() or torch.get_num_threads() != 1:
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
