"""What the tests share besides fixtures (``conftest.py`` holds those): the clone's paths, the tiny autoencoder most
tests build, and the launch commands of the scripts (as diffusers keeps them in ``testing_utils``)."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "train_scripts")
CPU_CONFIG = os.path.join(ROOT, "accelerate_configs", "cpu.yaml")
# `accelerate launch` with the one-process CPU config, as the README runs the scripts
ACCELERATE_CPU = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_CONFIG]


def tiny_autoencoder_kl(blocks=(8, 16), seed=0, **config):
    """A tiny random ``AutoencoderKL``: ``len(blocks) - 1`` halvings, 4 latent channels, groups of 4, one layer per
    block (``config`` adds or overrides diffusers' arguments). torch's RNG is seeded with ``seed`` first (None: not
    seeded, the caller's state decides the weights)."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    settings = dict(
        block_out_channels=tuple(blocks),
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    return AutoencoderKL(**{**settings, **config})


def load_script(name):
    """``train_scripts/<name>`` as a module (its ``parse_args`` and ``main``), under a name of its own."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_under_test_{name[:-3]}", os.path.join(SCRIPTS, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(name, argv):
    """Run a script as its command line does, in this process: returns ``(exit code, stderr)``. For the bad-input
    checks, which end before any heavy work: a subprocess through ``accelerate launch`` costs 30-60 s each, this a
    fraction of a second (one subprocess test per script keeps the launched command's exit-code contract). The run
    and the state put back afterwards are :func:`run_script_in_process`'s."""
    proc = run_script_in_process(name, argv)
    return proc.returncode, proc.stderr


def run_script_in_process(name, argv, extra_env=None):
    """Run ``train_scripts/<name>`` end to end in this process, as ``python train_scripts/<name> ARGS`` runs it (its
    command-line path, ``errors.run_script(main, parse_args)``, in the clone's folder, with the environment the
    tests give a script); returns a ``subprocess.CompletedProcess`` with its exit code, stdout and stderr. A run as
    its own process spends about 9 s starting Python and importing torch, diffusers and the rest
    (``benchmarks/bench_script_startup.py``); here those imports are paid once per test worker. What a script
    changes for its process is put back afterwards: the environment, the working folder, ``sys.argv``, torch's
    threads, signal handlers, the root logger, warning filters, accelerate's process-wide state and the output
    folder's lock; torch's RNG starts from a fresh process's seed. An exception that escapes is printed and gives
    exit code 1, as Python does."""
    import contextlib
    import io
    import logging
    import signal
    import subprocess
    import traceback
    import warnings

    from diffusability_hf.errors import run_script

    argv = [str(a) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), list(sys.argv)
    threads = torch.get_num_threads()
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    code = 0
    with warnings.catch_warnings():
        try:
            os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
            os.environ.update({"ACCELERATE_USE_CPU": "1", **(extra_env or {})})
            os.chdir(ROOT)
            sys.argv = [os.path.join(SCRIPTS, name), *argv]
            torch.set_num_threads(1)
            torch.manual_seed(67280421310721)  # torch's seed in a fresh process
            for handler in handlers:  # pytest's capture: the script's logging.basicConfig must see no handler
                root.removeHandler(handler)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    module = load_script(name)
                    run_script(module.main, lambda: module.parse_args(argv))
                except SystemExit as stop:
                    code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                except BaseException:  # noqa: B036 - as the interpreter reports an escaped exception
                    traceback.print_exc()
                    code = 1
        finally:
            for handler in root.handlers[:]:
                root.removeHandler(handler)
            for handler in handlers:
                root.addHandler(handler)
            root.setLevel(level)
            for sig, handler in signals.items():
                signal.signal(sig, handler)
            torch.set_num_threads(threads)
            sys.argv = saved_argv
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            from accelerate.state import AcceleratorState, GradientState

            from diffusability_hf.files import release_output_dir_locks

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()
            release_output_dir_locks()
    return subprocess.CompletedProcess([name, *argv], code, out.getvalue(), err.getvalue())
