"""Running the toolkit's scripts as a user would, for experiments: each in its own process with its own argv, CPU
threads and log (:func:`run`), several at once with the cores split between them (:func:`in_parallel`), and each
named step once, so that a rerun continues an interrupted experiment (:class:`Stages`). Used by the bench
(``train_scripts/diffusability_bench.py``) and by ``experiments/*/run.py``.
"""

import itertools
import json
import os
import shutil
import sys
import threading
import time

import torch

from ..files import atomic_write_json

# Every script runs in its own process, forked from a server process that has imported torch, diffusers and the
# toolkit once: a fresh interpreter spends about 15 s importing them on 2 CPU cores, which would dominate the
# bench's many short runs. The child runs the script file as ``__main__`` with its own argv, CPU threads and log,
# exactly as ``python train_scripts/<script> ...`` would.
PRELOAD = [
    "torch", "diffusers", "diffusers.models.autoencoders.autoencoder_kl", "accelerate", "safetensors.torch",
    "diffusability_hf.autoencoders", "diffusability_hf.data.images", "diffusability_hf.losses",
    "diffusability_hf.metrics", "diffusability_hf.models", "diffusability_hf.pipelines",
    "diffusability_hf.training.checkpoints", "diffusability_hf.training.launch", "matplotlib.pyplot",
    "datasets", "deepspeed",
]  # fmt: skip
# ``datasets`` (with pandas and pyarrow) is imported by every data-reading script, ``deepspeed`` by accelerate's
# ``unwrap_model`` where it is installed: about 0.7 s and 0.25 s of every short run. A missing one is skipped (the
# forkserver ignores an ImportError in its preload).
# (Not "__main__": CPython's forkserver never receives the main script's path, so preloading it imports nothing.)
# The scripts' ``run_script`` freezes what exists when it starts, so a child's garbage collections never walk (and
# copy) the server's inherited objects: measured on ``--smoke``, 0.83x the wall time and 0.69x the stages' seconds.
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg"}
_context = None
# Reading a forkserver child's exit code is not thread-safe: ``Process.start`` polls every other live child, and
# when that poll races the child's own ``join``, one of the two reads end-of-file and records exit code 255 for a
# run that succeeded. Every start and every reading of an exit code happens under this lock.
_process_lock = threading.Lock()


def _script_process(script, argv, log, threads, cwd):
    """The child: output to ``log``, ``threads`` CPU threads, in ``cwd``, then the script as ``__main__``."""
    import runpy

    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **OFFLINE)
    torch.set_num_threads(threads)
    os.chdir(cwd)
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def run(path, *args, log, threads, cwd):
    """The script at ``path`` in its own process, offline, on ``threads`` CPU threads, in the folder ``cwd``; its
    output goes to ``log`` (which starts with the equivalent command line). Returns the seconds it took; a failure
    raises with the end of its log."""
    import multiprocessing
    import multiprocessing.connection

    global _context
    if _context is None:
        os.environ.update(OFFLINE)  # before the server imports huggingface_hub, which reads them at import
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    argv = [str(a) for a in args]
    with open(log, "w") as fh:
        fh.write(" ".join(["python", os.path.relpath(path, cwd), *argv]) + "\n\n")
    start = time.time()
    proc = _context.Process(target=_script_process, args=(path, argv, log, threads, cwd))
    with _process_lock:
        proc.start()
    multiprocessing.connection.wait([proc.sentinel])
    with _process_lock:
        proc.join()
    if proc.exitcode:
        with open(log) as fh:
            tail = fh.read()[-4000:]
        raise RuntimeError(f"{os.path.basename(path)} failed ({proc.exitcode}); its log is {log}:\n{tail}")
    return time.time() - start


def cpu_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def in_parallel(tasks, jobs, cores):
    """Run the callables (each takes its CPU thread count) with at most ``jobs`` at once, the ``cores`` split
    between them; when there are more tasks than jobs, the last one to start gets every core (it will mostly run
    alone). Re-raises a failure."""
    from concurrent.futures import ThreadPoolExecutor

    lock, started = threading.Lock(), itertools.count(1)
    share = max(1, cores // max(1, min(jobs, len(tasks))))

    def start(task):
        with lock:
            last = next(started) == len(tasks) > jobs
        return task(cores if last else share)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(start, t) for t in tasks]
        try:
            return [f.result() for f in futures]
        except BaseException:
            pool.shutdown(cancel_futures=True)  # no queued run starts after a failure
            raise


class Stages:
    """Runs each named step once: a step whose output marker exists is reused (a rerun continues an interrupted
    bench). The seconds of every step and of every invocation are kept in ``times.json`` (a continued run adds
    its own), so the report's total is the sum of the invocations' wall times."""

    def __init__(self, out, scripts_dir, cwd):
        self.path, self.logs, self.lock = os.path.join(out, "times.json"), os.path.join(out, "logs"), threading.Lock()
        self.scripts_dir, self.cwd = scripts_dir, cwd
        os.makedirs(self.logs, exist_ok=True)
        self.times = {"steps": {}, "invocations": []}
        if os.path.isfile(self.path):
            with open(self.path) as fh:
                self.times = json.load(fh)
        self.start = time.time()
        self.times["invocations"].append(0.0)

    def record(self, name, seconds):
        with self.lock:
            self.times["steps"][name] = seconds
            self.times["invocations"][-1] = time.time() - self.start
            atomic_write_json(self.path, self.times)

    def total(self):
        self.record("report", 0.0)
        return sum(self.times["invocations"])

    def script(self, name, marker, script, *args, threads):
        if os.path.exists(marker):
            return
        folder = os.path.dirname(marker)
        if os.path.isdir(folder) and os.listdir(folder):  # an interrupted attempt of this very step: start afresh
            shutil.rmtree(folder)
        log = os.path.join(self.logs, f"{name}.log")
        self.record(name, run(os.path.join(self.scripts_dir, script), *args, log=log, threads=threads, cwd=self.cwd))
