"""Test-suite wide settings (never touch the network, headless plots) and shared fixtures for the script tests."""

import os
import shutil
import subprocess

import pytest
import torch

from testing_utils import ROOT, Forked, run_script_in_process, tiny_autoencoder_kl

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


@pytest.fixture
def embedded_latents(tmp_path_factory, run_script):
    """16 crops of the embedded photographs encoded by the embedded AE, extracted once per worker and shared
    read-only (a test that changes them copies them first)."""
    out = tmp_path_factory.getbasetemp() / "embedded_latents"
    if not (out / "metadata.json").is_file():
        run_script("extract_latents.py", ["--output_dir", out, "--max_samples", 16, "--shard_size", 16])
    return str(out)


@pytest.fixture(scope="session")
def ddp_reference(tmp_path_factory):
    """``ddp_reference(script, args, port)``: the output folder of a 2-process DDP run (CPU processes with torchrun's
    environment, ``testing_utils.Forked``) of ``train_scripts/<script> args``, made once for the whole suite: the
    FSDP and DeepSpeed tests compare their runs with the same DDP runs, whichever pytest-xdist worker asks first (the
    others wait for it).

    ``args`` may name the asking worker's own copies of the tiny inputs, which every worker builds the same way: the
    run is keyed by the command with the worker's temporary folder left out, and a worker whose inputs (their
    safetensors files) differ from the ones the run was made from is told so instead of comparing against it. The
    run goes to a temporary folder, renamed when it has finished, under a time limit that stops all of its
    processes."""
    import hashlib
    import json

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    # pytest-xdist's workers have <this run's temporary folder>/popen-gwN: share the run's folder, never an older one
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") and base.name.startswith("popen-") else base

    def inputs(args):
        """The tensors of every input the arguments name (a file, or a folder's safetensors files) -> a digest.
        A ``torch.save`` file is read, not hashed as bytes: each save writes its own serialization id."""
        digests = {}
        for arg in map(str, args):
            if not os.path.exists(arg):
                continue
            files = [arg] if os.path.isfile(arg) else sorted(
                os.path.join(d, f) for d, _, names in os.walk(arg) for f in names if f.endswith(".safetensors")
            )  # fmt: skip
            h = hashlib.sha256()
            for path in files:
                if path.endswith((".pt", ".pth", ".bin")):
                    state = torch.load(path, map_location="cpu", weights_only=True)
                    for name in sorted(state):
                        h.update(name.encode() + state[name].numpy().tobytes())
                else:
                    with open(path, "rb") as fh:
                        h.update(fh.read())
            digests[arg.replace(str(base), "<tmp>")] = h.hexdigest()
        return digests

    def run(script, args, port, timeout=600):
        command = [script, *(str(a).replace(str(base), "<tmp>") for a in args)]
        key = hashlib.sha256(json.dumps(command).encode()).hexdigest()[:16]
        out = shared / f"ddp_reference_{os.path.splitext(script)[0]}_{key}"
        mine = inputs(args)
        with FileLock(str(out) + ".lock"):
            if not out.is_dir():
                partial = shared / f"{out.name}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                proc = Forked(port)(os.path.join(ROOT, "train_scripts", script), [*args, "--output_dir", partial],
                                    script_env({"ACCELERATE_USE_CPU": "1"}), timeout)  # fmt: skip
                assert proc.returncode == 0, (
                    f"{script} under DDP failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
                )
                (partial / "reference_inputs.json").write_text(json.dumps(mine))
                partial.rename(out)
        theirs = json.loads((out / "reference_inputs.json").read_text())
        assert theirs == mine, (
            f"the DDP reference {out} was made from other inputs than this worker's: {theirs} {mine}"
        )
        return out

    return run


def script_env(extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return dict(env, **(extra or {}))


@pytest.fixture
def run_script():
    """``run_script(name, args, check=True, launcher=None, extra_env=None)``: run ``train_scripts/<name>`` end to
    end: by default in this process, as ``python script.py`` would run it (``run_script_in_process``: the same
    outputs without paying the interpreter's start and torch's imports again for every run), or as its own process
    through ``launcher``: a command (``ACCELERATE_CPU`` for the launcher itself, ``PYTHON`` for a plain process,
    ``torchrun(port)``, ``accelerate_launcher(config, port, shim)``) or processes forked with torchrun's
    environment (``Forked(port)``, ``Forked(port, config=..., shim=...)``). Returns the CompletedProcess."""

    def run(name, args, check=True, launcher=None, extra_env=None):
        if launcher is None:
            proc = run_script_in_process(name, args, extra_env)
        elif isinstance(launcher, Forked):
            proc = launcher(os.path.join(ROOT, "train_scripts", name), args, script_env(extra_env))
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
    # Each pytest-xdist worker gets its share of the cores for the tests it runs in its own process: torch's default
    # (every core in each worker) oversubscribes them, and idle OpenMP threads spin on cores the other worker needs.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))
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
