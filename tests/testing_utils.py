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
