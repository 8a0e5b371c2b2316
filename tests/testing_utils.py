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


def torchrun(port, processes=2):
    """``torchrun`` with ``processes`` CPU processes and its rendezvous on ``port`` (one port per launch in the
    suite, so that two workers' launches never meet)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(port)]  # fmt: skip


def accelerate_launcher(config, port, shim):
    """``accelerate launch`` with the config file ``config`` on ``port``, running ``shim`` (a tests/*_on_cpu.py
    file), which runs the script: accelerate picks FSDP and DeepSpeed for accelerator devices only, and without the
    shim the same config would silently run DDP on CPU processes."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
            str(port), shim]  # fmt: skip


class Forked:
    """A launch of ``processes`` processes, as ``torchrun --nproc_per_node N --master_port PORT`` starts them or, with
    ``config``, as ``accelerate launch --config_file CONFIG --main_process_port PORT SHIM`` does (accelerate's own
    launch code runs in this process: it reads the config and sets the environment, and ``torch.distributed.run``,
    the part that starts the processes, is replaced). Each process gets torchrun's environment (``RANK``,
    ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` ...) and runs the script as ``__main__``, forked
    from the server process that the bench's runner keeps (torch, diffusers and the toolkit imported once per test
    worker): a fresh interpreter spends about 9 s importing them (``benchmarks/bench_script_startup.py``), twice per
    launch, which made the launched tests most of the suite's time. A failing process ends the others, as torchrun's
    agent does.

    What differs from the real launchers: no agent process (rank 0 holds the rendezvous store); a process ends with
    ``os._exit`` after its threads (no interpreter finalization, no ``atexit``); the modules the server preloaded
    read their import-time settings from the environment it started with; the processes share the server's hash
    seed; a process killed by a signal gives a negative exit code (torchrun: 1), the time limit -9 with a line on
    stderr. The tests that check a launcher itself (signals, exit codes, threads at interpreter exit) and one run per
    accelerate config (``test_fsdp.py``, ``test_deepspeed.py``) keep the real commands."""

    def __init__(self, port, processes=2, config=None, shim=None):
        self.port, self.processes, self.config, self.shim = port, processes, config, shim

    def __call__(self, script, args, env, timeout=600):
        argv = [script, *map(str, args)]
        if self.config is None:
            return forked_processes(self.processes, self.port, argv, env, timeout)
        from unittest import mock

        import torch.distributed.run as distrib_run
        from accelerate.commands.launch import launch_command, launch_command_parser

        result = {}
        fork_server()  # before accelerate's variables are set here: the server keeps the environment it starts with

        def agent(torchrun_args):  # what accelerate hands torchrun, in the environment it prepared
            if torchrun_args.standalone or torchrun_args.module or torchrun_args.no_python:
                raise AssertionError(f"Forked runs a script on a given port only: {torchrun_args}")
            command = [torchrun_args.training_script, *torchrun_args.training_script_args]
            nproc, port = int(torchrun_args.nproc_per_node), int(torchrun_args.master_port)
            result["proc"] = forked_processes(nproc, port, command, dict(os.environ), timeout)

        command = ["--config_file", str(self.config), "--main_process_port", str(self.port), self.shim, *argv]
        with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(distrib_run, "run", agent):
            launch_command(launch_command_parser().parse_args(command))
        if "proc" not in result:
            raise AssertionError(f"accelerate launch {' '.join(command)} did not start its processes through torchrun")
        return result["proc"]


def fork_server():
    """The forkserver context, its server running: the bench runner's (``runner.PRELOAD`` imported once), started
    from this process's environment as it is now if it is not running yet (every process forked from it inherits
    what the preloaded modules read from the environment when they were imported)."""
    import multiprocessing
    import multiprocessing.forkserver

    from diffusability_hf.bench import runner

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(runner.PRELOAD)  # the first to start the server sets what it imports
    multiprocessing.forkserver.ensure_running()
    return context


def _forked_rank(argv, env, out, err, cwd):
    """One process of a :class:`Forked` launch: its output to ``out`` and ``err``, its environment, then the script."""
    import multiprocessing
    import runpy
    import tempfile

    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout.reconfigure(line_buffering=True)  # as torchrun's ``python -u``: a process ended early keeps its lines
    multiprocessing.set_start_method("fork", force=True)  # the script's own workers start as under torchrun
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # read from the environment again
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    os.chdir(cwd)
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


def forked_processes(processes, port, argv, env, timeout=600):
    """``processes`` processes of ``argv`` (a Python file and its arguments) with torchrun's environment added to
    ``env``, forked from the bench runner's server; returns a ``CompletedProcess`` with the processes' stdout and
    stderr in rank order, and the first failing process's exit code (0 when all succeeded)."""
    import multiprocessing.connection
    import shutil
    import subprocess
    import tempfile
    import time

    context = fork_server()
    folder = tempfile.mkdtemp(prefix="forked_launch_")
    size = str(processes)
    logs = [(os.path.join(folder, f"{rank}.out"), os.path.join(folder, f"{rank}.err")) for rank in range(processes)]
    procs = []
    try:
        for rank in range(processes):
            # torchrun's variables (torch/distributed/elastic/agent/server/local_elastic_agent.py); rank 0 holds the
            # store, as without torchrun's agent
            rank_env = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK="0", ROLE_RANK=str(rank),
                            ROLE_NAME="default", WORLD_SIZE=size, LOCAL_WORLD_SIZE=size, ROLE_WORLD_SIZE=size,
                            GROUP_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            TORCHELASTIC_RUN_ID="forked", TORCHELASTIC_RESTART_COUNT="0",
                            TORCHELASTIC_MAX_RESTARTS="0", TORCHELASTIC_USE_AGENT_STORE="False")  # fmt: skip
            rank_env.setdefault("OMP_NUM_THREADS", "1")  # as torchrun sets it for several processes
            proc = context.Process(target=_forked_rank, args=(argv, rank_env, *logs[rank], ROOT))
            proc.start()
            procs.append(proc)
        deadline, code, timed_out = time.monotonic() + timeout, 0, False
        while any(p.exitcode is None for p in procs):
            alive = [p.sentinel for p in procs if p.exitcode is None]
            if not multiprocessing.connection.wait(alive, timeout=max(0.0, deadline - time.monotonic())):
                code, timed_out = code or -9, True  # past the time limit
                break
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed:
                code = code or failed[0]
                break
        for proc in procs:  # torchrun's agent ends the others when one fails: SIGTERM, then SIGKILL
            if proc.exitcode is None:
                proc.terminate()
        end = time.monotonic() + 30
        for proc in procs:
            proc.join(max(0.0, end - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        code = code or next((p.exitcode for p in procs if p.exitcode), 0)
        stdout, stderr = (
            "".join(open(p, errors="replace").read() for p in kind if os.path.exists(p)) for kind in zip(*logs)
        )
        if timed_out:
            stderr += f"\nForked: the processes were killed after the time limit of {timeout} s\n"
    finally:
        for proc in procs:  # an error or an interrupt in this process leaves none of them running
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        shutil.rmtree(folder, ignore_errors=True)
    return subprocess.CompletedProcess(argv, code, stdout, stderr)


def transformer_weights(folder):
    """The transformer's tensors of a saved DiT pipeline."""
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


# The multi-process equality tests (FSDP and DeepSpeed against DDP, tests/test_fsdp.py and tests/test_deepspeed.py):
# a tiny DiT and the tiny AE's SE fine-tuning, 4 steps with a checkpoint, validation and an EMA snapshot at step 2.
# --max_grad_norm 0.05 clips every step, so the sharded paths must clip at the flag's value over the whole model.
DIT_TINY = ["--model", "DiT-tiny/2", "--train_batch_size", 4, "--report_to", "none", "--num_inference_steps", 2,
            "--lr_warmup_steps", 1, "--learning_rate", 1e-3, "--ema_halflife_steps", 2, "--seed", 5,
            "--max_grad_norm", 0.05]  # fmt: skip


def distributed_dit_args(latents_dir):
    return ["--latents_dir", latents_dir, *DIT_TINY, "--max_train_steps", 4, "--checkpointing_steps", 2,
            "--validation_steps", 2, "--pipeline_snapshot_steps", 2]  # fmt: skip


def distributed_se_args(tiny_vae_dir):
    """LPIPS on (a frozen network inside the wrapped objective), output layers frozen, the posterior mean decoded
    (posterior noise is drawn per process, but the mean keeps the comparison tight), validation at step 2."""
    return ["--pretrained_model_name_or_path", tiny_vae_dir, "--resolution", 32, "--train_batch_size", 2,
            "--max_train_steps", 4, "--checkpointing_steps", 2, "--validation_steps", 2, "--num_validation_images", 2,
            "--learning_rate", 1e-3, "--report_to", "none", "--latent_sampling", "mode", "--latent_stats_num_samples",
            4, "--ema_halflife_steps", 2, "--seed", 3, "--max_grad_norm", 0.05,
            "--lpips_trunk_path", os.path.join(tiny_vae_dir, "alexnet_trunk.pth")]  # fmt: skip


def load_script(name):
    """``train_scripts/<name>`` (``.py`` optional) as a module (its ``parse_args`` and ``main``), under a name of its
    own (not in ``sys.modules``: each call loads it afresh)."""
    import importlib.util

    name = name if name.endswith(".py") else name + ".py"
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
