"""Test-suite wide settings (never touch the network, headless plots) and shared fixtures for the script tests."""

import os
import subprocess

import pytest
import torch

from testing_utils import ROOT, run_script_in_process, tiny_autoencoder_kl

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


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL (4x down, 4 latent channels) saved in diffusers format, with a random AlexNet trunk
    file next to it for LPIPS (the real loading path, offline)."""
    import torchvision

    path = tmp_path_factory.mktemp("tiny_vae")
    tiny_autoencoder_kl((8, 16, 16), mid_block_add_attention=False).save_pretrained(path)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), os.path.join(path, "alexnet_trunk.pth"))
    return str(path)


def script_env(extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return dict(env, **(extra or {}))


@pytest.fixture
def run_script():
    """``run_script(name, args, check=True, launcher=None, extra_env=None)``: run ``train_scripts/<name>`` end to
    end: by default in this process, as ``python script.py`` would run it (``run_script_in_process``: the same
    outputs without paying the interpreter's start and torch's imports again for every run), or as its own process
    through ``launcher`` (``ACCELERATE_CPU`` for the launcher itself, ``PYTHON`` for a plain process, torchrun or a
    multi-process config). Returns the CompletedProcess."""

    def run(name, args, check=True, launcher=None, extra_env=None):
        if launcher is None:
            proc = run_script_in_process(name, args, extra_env)
        else:
            script = os.path.join(ROOT, "train_scripts", name)
            proc = subprocess.run(
                launcher + [script] + list(map(str, args)),
                capture_output=True,
                text=True,
                env=script_env(extra_env),
                cwd=ROOT,
            )
        if check and proc.returncode != 0:
            raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        return proc

    return run


class TinyI3D(torch.nn.Module):
    """Stand-in with the calling convention of StyleGAN-V's I3D TorchScript (random weights, 8-d features)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, kernel_size=3, stride=2, padding=1)

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = torch.nn.functional.interpolate(x, size=(x.shape[2], 32, 32), mode="trilinear", align_corners=False)
        return torch.tanh(self.conv(x)).mean(dim=(2, 3, 4))


class TinyImageFeatures(torch.nn.Module):
    """A small local feature model for ``--feature_extractor PATH`` (float [0, 1] input, 6-d features)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, kernel_size=4, stride=4)

    def forward(self, x):
        return torch.tanh(self.conv(x * 2 - 1)).mean(dim=(2, 3))


@pytest.fixture(scope="session")
def tiny_feature_models(tmp_path_factory):
    """Tiny random feature extractors on disk, loaded through the real code paths: a DINOv2 folder (transformers),
    torch-fidelity's InceptionV3 with random weights, an I3D-convention TorchScript and a plain TorchScript file."""
    from transformers import Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("feature_models")
    torch.manual_seed(0)
    Dinov2Model(
        Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     image_size=28, patch_size=14)
    ).save_pretrained(root / "tiny_dinov2")  # fmt: skip

    torch.jit.script(TinyI3D()).save(str(root / "tiny_i3d.pt"))
    torch.jit.script(TinyImageFeatures()).save(str(root / "tiny_features.pt"))
    return {
        "dinov2": str(root / "tiny_dinov2"),
        "i3d": str(root / "tiny_i3d.pt"),
        "torchscript": str(root / "tiny_features.pt"),
        "root": str(root),
    }


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 state dict with random weights, saved where ``--inception_weights`` reads it."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    original = FeatureExtractorInceptionV3.load_state_dict
    torch.save({}, path)
    FeatureExtractorInceptionV3.load_state_dict = lambda self, state, *a, **k: None  # keep the random init
    try:
        torch.manual_seed(0)
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(net.state_dict(), path)
    return str(path)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "slow: runs a script end to end in its own process (seconds to minutes); `-m 'not slow'` is the quick pass",
    )
    config.addinivalue_line(
        "markers", "minutes: one of the few tests that take minutes (a whole bench --smoke, the README's Quickstart)"
    )


def pytest_collection_modifyitems(config, items):
    """A test that launches a script (the ``run_script`` fixture) or takes minutes is end to end: marked ``slow``.

    The longest test files run first (those with a test that takes minutes, then those with a slow one, then the
    rest; each file whole and in its order, so that a module-scoped fixture is built once per worker), so that the
    two workers (``-n 2``, whose ``worksteal`` scheduling hands a worker that ran dry half of the other's queue)
    end together instead of one waiting on a long test that started last."""
    rank = {}
    for item in items:
        if "run_script" in getattr(item, "fixturenames", ()) or item.get_closest_marker("minutes"):
            item.add_marker(pytest.mark.slow)
        key = 0 if item.get_closest_marker("minutes") else 1 if item.get_closest_marker("slow") else 2
        rank[item.module.__name__] = min(key, rank.get(item.module.__name__, 2))
    items.sort(key=lambda item: rank[item.module.__name__])
