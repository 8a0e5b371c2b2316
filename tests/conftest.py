"""Test-suite wide settings (never touch the network, headless plots) and shared fixtures for the script tests."""

import os
import subprocess
import sys

import pytest
import torch

for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "disabled",
    "MPLBACKEND": "Agg",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[_key] = _value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_CONFIG = os.path.join(ROOT, "accelerate_configs", "cpu.yaml")


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL (4x down, 4 latent channels) saved in diffusers format, with a random AlexNet trunk
    file next to it for LPIPS (the real loading path, offline)."""
    import torchvision
    from diffusers import AutoencoderKL

    path = tmp_path_factory.mktemp("tiny_vae")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        mid_block_add_attention=False,
    ).save_pretrained(path)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), os.path.join(path, "alexnet_trunk.pth"))
    return str(path)


def script_env(extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("DIFFUSABILITY_DEBUG", None)
    return dict(env, **(extra or {}))


@pytest.fixture
def run_script():
    """``run_script(name, args, check=True, launcher=None, extra_env=None)``: run ``train_scripts/<name>`` through
    ``accelerate launch`` with the CPU config (or ``launcher``); returns the CompletedProcess."""

    def run(name, args, check=True, launcher=None, extra_env=None):
        cmd = launcher or [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_CONFIG]
        script = os.path.join(ROOT, "train_scripts", name)
        proc = subprocess.run(
            cmd + [script] + list(map(str, args)), capture_output=True, text=True, env=script_env(extra_env), cwd=ROOT
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc

    return run
