"""DiTFlowMatchPipeline: class-conditional flow-matching sampling on tiny models, checked against closed forms
(eq. 3 shift, Euler step, classifier-free guidance) and across save / remote-code load."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
)

from diffusability_hf.pipelines import DiTFlowMatchPipeline

from testing_utils import tiny_autoencoder_kl

ID2LABEL = {0: "cat", 1: "dog", 2: "tench, Tinca tinca"}
PROVENANCE = {"latents_ae_weights_fingerprint": "0123abcd", "vae_weights_fingerprint": "0123abcd", "latents": "/x"}
MEAN = [0.1, -0.2, 0.3, 0.0]
STD = [1.0, 2.0, 0.5, 3.0]

# A stand-in for the toolkit's self-conditioned DiT (same call contract), in a file of its own as a custom model is.
STANDIN_MODULE = "standin_selfcond_dit"
STANDIN_SOURCE = """
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput


@dataclass
class StandInOutput(BaseOutput):
    sample: torch.Tensor = None
    last_hidden_state: torch.Tensor = None


class StandInSelfCondDiT(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels=4, sample_size=8, num_classes=3, hidden_size=8, self_conditioning=True):
        super().__init__()
        self.proj_in = torch.nn.Conv2d(in_channels, hidden_size, 1)
        self.label_embedding = torch.nn.Embedding(num_classes + 1, hidden_size)
        self.self_cond_proj = torch.nn.Conv2d(hidden_size, hidden_size, 1)
        self.proj_out = torch.nn.Conv2d(hidden_size, in_channels, 1)

    def forward(self, hidden_states, timestep, class_labels, self_cond=None, return_dict=True):
        h = self.proj_in(hidden_states) + self.label_embedding(class_labels)[:, :, None, None]
        h = h + (timestep / 1000.0)[:, None, None, None]
        if self_cond is not None:
            h = h + self.self_cond_proj(self_cond)
        h = torch.tanh(h)
        out = self.proj_out(h)
        if not return_dict:
            return (out, h)
        return StandInOutput(sample=out, last_hidden_state=h)
"""


def tiny_vae(seed=0):
    return tiny_autoencoder_kl(seed=seed).eval()


def tiny_dit(seed=1, out_channels=4):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=out_channels,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=3,
        norm_num_groups=4,
    ).eval()


def make_pipe(transformer=None, vae=None, scheduler=None, **config):
    config = {"id2label": ID2LABEL, "latents_mean": MEAN, "latents_std": STD, **config}
    pipe = DiTFlowMatchPipeline(
        transformer=transformer if transformer is not None else tiny_dit(),
        vae=vae if vae is not None else tiny_vae(),
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(),
        **config,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, labels=(0, 1), seed=0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(list(labels), generator=torch.Generator().manual_seed(seed), **kwargs).images


def record_calls(model):
    """Every forward call's keyword inputs and output; returns (calls, hook handle)."""
    calls = []

    def hook(module, args, kwargs, output):
        calls.append({**{k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()}, "output": output})

    return calls, model.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def standin_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("standin") / f"{STANDIN_MODULE}.py"
    path.write_text(STANDIN_SOURCE)
    spec = importlib.util.spec_from_file_location(STANDIN_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[STANDIN_MODULE] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(STANDIN_MODULE, None)


def standin_dit(module, seed=2):
    torch.manual_seed(seed)
    return module.StandInSelfCondDiT().eval()


# ------------------------------------------------------------------------------------------------------ outputs


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(output_type):
    pipe = make_pipe()
    out = pipe([0, 2, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type=output_type)
    images = out.images
    if output_type == "pil":
        assert len(images) == 3 and all(isinstance(im, PIL.Image.Image) and im.size == (16, 16) for im in images)
        assert images[0].mode == "RGB"
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (3, 16, 16, 3)
        assert images.min() >= 0.0 and images.max() <= 1.0
    elif output_type == "pt":
        assert torch.is_tensor(images) and images.shape == (3, 3, 16, 16)
        assert images.min() >= 0.0 and images.max() <= 1.0
    else:
        assert torch.is_tensor(images) and images.shape == (3, 4, 8, 8)
        assert torch.isfinite(images).all()
    as_tuple = pipe([0, 2, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1


def test_pil_np_pt_agree():
    pipe = make_pipe()
    np_images = sample(pipe, output_type="np")
    pt_images = sample(pipe, output_type="pt")
    pil_images = sample(pipe, output_type="pil")
    np.testing.assert_allclose(pt_images.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil_images[1]), (np_images[1] * 255).round().astype(np.uint8))


# ------------------------------------------------------------------------------------------------------- labels


def test_class_names_via_id2label():
    pipe = make_pipe()
    by_id = sample(pipe, labels=[0, 1, 2])
    np.testing.assert_array_equal(sample(pipe, labels=["cat", "dog", "tench, Tinca tinca"]), by_id)
    np.testing.assert_array_equal(sample(pipe, labels=["cat", 1, "Tinca tinca"]), by_id)  # synonyms, mixed
    single = pipe("dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(
        single, pipe(1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    )
    assert single.shape == (1, 16, 16, 3)
    assert pipe.get_label_ids(["tench", 0, np.int64(2)]) == [2, 0, 2]
    assert pipe.num_classes == 3


@pytest.mark.parametrize(
    "labels, match",
    [
        (["cat", "zebra"], r"Unknown class name 'zebra'\. Valid names: .*'cat'.*'dog'.*'tench'"),
        ([0, 3], r"Class id 3 is out of range: valid ids are 0\.\.2"),
        (-1, r"Class id -1 is out of range: valid ids are 0\.\.2"),
        ([True], r"must be ints or names"),
        ([0.5], r"must be ints or names"),
        ([], r"empty"),
    ],
)
def test_bad_labels_raise_before_sampling(labels, match):
    pipe = make_pipe()
    calls, handle = record_calls(pipe.transformer)
    decoded = []
    pipe.vae.decode = lambda *a, **k: decoded.append(a)
    with pytest.raises(ValueError, match=match):
        pipe(labels, num_inference_steps=2)
    handle.remove()
    assert calls == [] and decoded == []


def test_bad_arguments_raise():
    pipe = make_pipe()
    for kwargs, match in [
        ({"output_type": "jpg"}, "output_type"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"shift": 0.0}, "shift"),
    ]:
        with pytest.raises(ValueError, match=match):
            pipe([0], **kwargs)
    with pytest.raises(ValueError, match="3 entries but the latents have 4 channels"):
        make_pipe(latents_mean=[0.0, 0.0, 0.0])([0])
    no_names = make_pipe(id2label=None)
    with pytest.raises(ValueError, match="no id2label"):
        no_names(["cat"])


# -------------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_images_different_seed_different():
    pipe = make_pipe()
    a = sample(pipe, seed=0)
    np.testing.assert_array_equal(a, sample(pipe, seed=0))
    assert np.abs(a - sample(pipe, seed=1)).max() > 1e-3


def test_sampling_is_independent_of_train_mode():
    """Models left in train mode (DiT label dropout p=0.1 per block) still sample deterministically; modes restored."""
    pipe = make_pipe()
    expected = sample(pipe, labels=[0, 1, 2, 0, 1, 2])
    pipe.transformer.train()
    pipe.vae.train()
    label_embedders = [m for m in pipe.transformer.modules() if hasattr(m, "dropout_prob")]
    assert len(label_embedders) == 2  # one per block
    for module in label_embedders:
        module.dropout_prob = 1.0  # in train mode every label would be dropped
    np.testing.assert_array_equal(sample(pipe, labels=[0, 1, 2, 0, 1, 2]), expected)
    assert pipe.transformer.training and pipe.vae.training


# ------------------------------------------------------------------------------------------- guidance and steps


def test_no_guidance_one_forward_per_step():
    pipe = make_pipe()
    calls, handle = record_calls(pipe.transformer)
    sample(pipe, labels=[2, 0], num_inference_steps=3, guidance_scale=1.0)
    handle.remove()
    assert len(calls) == 3
    for call in calls:
        assert call["hidden_states"].shape == (2, 4, 8, 8)
        assert call["class_labels"].tolist() == [2, 0]


def test_guidance_doubles_batch_with_null_class_and_combines_velocities():
    pipe = make_pipe()
    calls, handle = record_calls(pipe.transformer)
    guided = sample(pipe, labels=[2, 0], num_inference_steps=3, guidance_scale=4.0, output_type="latent")
    handle.remove()
    assert len(calls) == 3
    for call in calls:
        assert call["hidden_states"].shape == (4, 4, 8, 8)
        assert call["class_labels"].tolist() == [2, 0, 3, 3]  # null class = num_embeds_ada_norm
        torch.testing.assert_close(call["hidden_states"][:2], call["hidden_states"][2:], rtol=0, atol=0)

    # One Euler step from sigma = 1 to 0: x0 = noise - v with v = v_uncond + g (v_cond - v_uncond).
    g = 4.0
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    one_step = sample(pipe, labels=[2, 0], num_inference_steps=1, guidance_scale=g, output_type="latent")
    t = torch.full((2,), 1000.0)
    with torch.no_grad():
        v_cond = pipe.transformer(noise, timestep=t, class_labels=torch.tensor([2, 0])).sample
        v_uncond = pipe.transformer(noise, timestep=t, class_labels=torch.tensor([3, 3])).sample
    torch.testing.assert_close(one_step, noise - (v_uncond + g * (v_cond - v_uncond)), rtol=1e-5, atol=1e-5)
    assert guided.shape == (2, 4, 8, 8)


def test_extra_output_channels_are_dropped():
    """A DiT that also predicts a variance (out_channels = 2C) is read for its first C channels."""
    pipe = make_pipe(transformer=tiny_dit(out_channels=8))
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    one_step = sample(pipe, labels=[1], num_inference_steps=1, output_type="latent")
    with torch.no_grad():
        v = pipe.transformer(noise, timestep=torch.full((1,), 1000.0), class_labels=torch.tensor([1])).sample
    assert v.shape[1] == 8
    torch.testing.assert_close(one_step, noise - v[:, :4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_shift_is_eq3_on_the_uniform_grid(shift):
    steps = 5
    pipe = make_pipe()
    calls, handle = record_calls(pipe.transformer)
    sample(pipe, labels=[0], num_inference_steps=steps, shift=shift, output_type="latent")
    handle.remove()
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)  # unshifted Euler grid, noise -> data
    expected = 1 - (1 - t) / (shift + (1 - shift) * (1 - t))  # paper eq. 3
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), expected, rtol=0, atol=1e-6)
    used = torch.stack([call["timestep"][0] for call in calls]).double()
    torch.testing.assert_close(used, 1000 * expected[:-1], rtol=0, atol=1e-3)  # DiT timestep = 1000 sigma
    assert pipe.scheduler.shift == 1.0  # the call's shift does not stick to the scheduler


def test_shift_defaults_to_the_scheduler_config():
    pipe = make_pipe(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    np.testing.assert_array_equal(sample(pipe, shift=None), sample(pipe, shift=3.0))
    t = torch.linspace(1.0, 0.0, 3, dtype=torch.float64)
    torch.testing.assert_close(pipe.scheduler.sigmas.double(), 3 * t / (1 + 2 * t), rtol=0, atol=1e-6)
    assert np.abs(sample(pipe, shift=1.0) - sample(pipe, shift=3.0)).max() > 1e-4


# ------------------------------------------------------------------------------------------------------ decoding


def capture_decode(vae):
    inputs = []
    original = vae.decode

    def decode(z, *args, **kwargs):
        inputs.append(z.clone())
        return original(z, *args, **kwargs)

    vae.decode = decode
    return inputs


def test_latents_are_denormalised_before_decoding():
    pipe = make_pipe()
    latents = sample(pipe, labels=[0, 2], output_type="latent")
    inputs = capture_decode(pipe.vae)
    sample(pipe, labels=[0, 2])
    assert len(inputs) == 1
    mean = torch.tensor(MEAN).view(1, 4, 1, 1)
    std = torch.tensor(STD).view(1, 4, 1, 1)
    torch.testing.assert_close(inputs[0], latents * std + mean)


def test_no_statistics_decode_the_latents_as_they_are():
    pipe = make_pipe(latents_mean=None, latents_std=None)
    latents = sample(pipe, output_type="latent")
    inputs = capture_decode(pipe.vae)
    sample(pipe)
    torch.testing.assert_close(inputs[0], latents)


def tiny_dc():
    torch.manual_seed(0)
    return AutoencoderDC(
        latent_channels=4,
        attention_head_dim=4,
        encoder_block_types=("ResBlock", "ResBlock"),
        decoder_block_types=("ResBlock", "ResBlock"),
        encoder_block_out_channels=(8, 16),
        decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), ()),
        decoder_qkv_multiscales=((), ()),
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
    ).eval()


def tiny_qwen():
    torch.manual_seed(0)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    ).eval()


@pytest.mark.parametrize("make_vae, decode_shape", [(tiny_dc, (2, 4, 8, 8)), (tiny_qwen, (2, 4, 1, 8, 8))])
def test_other_autoencoders(make_vae, decode_shape):
    pipe = make_pipe(vae=make_vae())
    inputs = capture_decode(pipe.vae)
    images = sample(pipe)
    assert inputs[0].shape == decode_shape  # the image autoencoder gets (B, C, h, w), the video one (B, C, 1, h, w)
    assert images.shape == (2, 16, 16, 3) and images.min() >= 0 and images.max() <= 1


# ----------------------------------------------------------------------------------------------- self-conditioning


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_self_conditioning_feeds_back_the_last_hidden_state(standin_module, guidance_scale):
    pipe = make_pipe(transformer=standin_dit(standin_module))
    calls, handle = record_calls(pipe.transformer)
    sample(pipe, labels=[1, 2], num_inference_steps=4, guidance_scale=guidance_scale)
    handle.remove()
    assert len(calls) == 4
    assert calls[0]["self_cond"] is None
    for previous, call in zip(calls, calls[1:]):
        assert call["self_cond"] is not None
        torch.testing.assert_close(call["self_cond"], previous["output"].last_hidden_state, rtol=0, atol=0)
    assert calls[1]["self_cond"].shape[0] == (2 if guidance_scale == 1.0 else 4)


def test_no_self_cond_argument_without_the_flag(standin_module):
    model = standin_dit(standin_module)
    model.register_to_config(self_conditioning=False)
    pipe = make_pipe(transformer=model)
    calls, handle = record_calls(pipe.transformer)
    sample(pipe)
    handle.remove()
    assert all("self_cond" not in call for call in calls)


# ---------------------------------------------------------------------------------------------- save and load

SAMPLE_KWARGS = {"num_inference_steps": 3, "guidance_scale": 2.0, "shift": 2.0, "output_type": "np"}
LABELS = [0, 2]

REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    paths, labels, kwargs, out_file = json.loads(sys.argv[1])
    results, info = {}, {}
    for key, path in paths.items():
        pipe = DiffusionPipeline.from_pretrained(path, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        results[key] = pipe(labels, generator=torch.Generator().manual_seed(0), **kwargs).images
        info[key] = [type(pipe).__module__, type(pipe).__name__, type(pipe.transformer).__module__]
        info[key + "_provenance"] = pipe.config.provenance
    # The remote pipeline class loads a saved custom component from its file itself when trusted.
    pipe = type(pipe).from_pretrained(paths["custom"], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    results["custom_own_loader"] = pipe(labels, generator=torch.Generator().manual_seed(0), **kwargs).images
    info["toolkit_imported"] = sorted(m for m in sys.modules if m.startswith("diffusability_hf"))
    np.savez(out_file, **results)
    print(json.dumps(info))
    """
)


@pytest.fixture(scope="module")
def saved(standin_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    pipes = {"stock": make_pipe(provenance=PROVENANCE), "custom": make_pipe(transformer=standin_dit(standin_module))}
    paths, expected = {}, {}
    for key, pipe in pipes.items():
        paths[key] = str(root / key)
        pipe.save_pretrained(paths[key])
        expected[key] = pipe(LABELS, generator=torch.Generator().manual_seed(0), **SAMPLE_KWARGS).images

    # Remote code in a fresh interpreter that never imports the toolkit.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_MODULES_CACHE": str(root / "modules")}
    out_file = str(root / "remote.npz")
    args = json.dumps([paths, LABELS, SAMPLE_KWARGS, out_file])
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, args], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"paths": paths, "expected": expected, "remote": dict(np.load(out_file)), "info": info}


def test_saved_model_index_layout(saved):
    for key, transformer_entry in [
        ("stock", ["diffusers", "DiTTransformer2DModel"]),
        ("custom", [STANDIN_MODULE, "StandInSelfCondDiT"]),
    ]:
        path = saved["paths"][key]
        with open(os.path.join(path, "model_index.json")) as f:
            index = json.load(f)
        assert index["_class_name"] == ["pipeline", "DiTFlowMatchPipeline"]
        assert index["transformer"] == transformer_entry
        assert index["vae"] == ["diffusers", "AutoencoderKL"]
        assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        assert index["id2label"] == {str(k): v for k, v in ID2LABEL.items()}
        assert index["latents_mean"] == MEAN and index["latents_std"] == STD
        assert index["provenance"] == (PROVENANCE if key == "stock" else None)  # readable with json alone
        with open(os.path.join(path, "pipeline.py")) as f:
            code = f.read()
        assert "class DiTFlowMatchPipeline(DiffusionPipeline)" in code
        assert "diffusability_hf" not in code  # self-contained: nothing to import from the toolkit
    assert os.path.isfile(os.path.join(saved["paths"]["custom"], "transformer", f"{STANDIN_MODULE}.py"))
    assert not any(f.endswith(".py") for f in os.listdir(os.path.join(saved["paths"]["stock"], "transformer")))


def test_remote_code_loads_in_a_fresh_interpreter(saved):
    info = saved["info"]
    assert info["toolkit_imported"] == []
    assert info["stock"][:2] == ["diffusers_modules.local.pipeline", "DiTFlowMatchPipeline"]
    assert info["stock"][2].startswith("diffusers.")
    assert info["custom"][2] == f"diffusers_modules.local.{STANDIN_MODULE}"
    assert info["stock_provenance"] == PROVENANCE and info["custom_provenance"] is None
    for key in ("stock", "custom"):
        np.testing.assert_allclose(saved["remote"][key], saved["expected"][key], rtol=0, atol=1e-6)
    np.testing.assert_allclose(saved["remote"]["custom_own_loader"], saved["expected"]["custom"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", ["stock", "custom"])
def test_toolkit_class_loads_the_saved_pipeline(saved, key):
    pipe = DiTFlowMatchPipeline.from_pretrained(saved["paths"][key])
    assert type(pipe) is DiTFlowMatchPipeline
    assert pipe.config.id2label == {str(k): v for k, v in ID2LABEL.items()}
    assert pipe.config.provenance == (PROVENANCE if key == "stock" else None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(LABELS, generator=torch.Generator().manual_seed(0), **SAMPLE_KWARGS).images
    np.testing.assert_array_equal(images, saved["expected"][key])
    if key == "custom":
        assert type(pipe.transformer).__module__ == STANDIN_MODULE


def test_saved_pipeline_needs_trust_or_the_imported_class(saved, monkeypatch):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(saved["paths"]["stock"])
    monkeypatch.delitem(sys.modules, STANDIN_MODULE)
    with pytest.raises(ValueError, match=rf"custom class StandInSelfCondDiT.*module named `{STANDIN_MODULE}`"):
        DiTFlowMatchPipeline.from_pretrained(saved["paths"]["custom"])


# ------------------------------------------------------------------------------------------- guidance interval


def euler_reference(pipe, labels, num_steps, g, interval, seed=0):
    """An independent Euler loop: sigmas 1, 1 - 1/N, ..., 1/N, 0 (no shift); guidance only where sigma_i is inside
    ``interval`` (the current noise level of the step), else the conditional velocity alone."""
    x = torch.randn((len(labels), 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    sigmas = [1 - i / num_steps for i in range(num_steps)] + [0.0]
    cond, null = torch.tensor(labels), torch.full((len(labels),), pipe.num_classes)
    for s, s_next in zip(sigmas, sigmas[1:]):
        t = torch.full((len(labels),), s * 1000.0)
        with torch.no_grad():
            v = pipe.transformer(x, timestep=t, class_labels=cond).sample
            if interval[0] <= s <= interval[1]:
                v_uncond = pipe.transformer(x, timestep=t, class_labels=null).sample
                v = v_uncond + g * (v - v_uncond)
        x = x + (s_next - s) * v
    return x


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.3, 0.8), (0.0, 0.1)])
def test_guidance_interval_guides_only_inside_it(interval):
    pipe = make_pipe()
    calls, handle = record_calls(pipe.transformer)
    got = sample(pipe, labels=[2, 0], num_inference_steps=5, guidance_scale=3.0, output_type="latent",
                 guidance_interval=interval)  # fmt: skip
    handle.remove()
    sigmas = [1.0, 0.8, 0.6, 0.4, 0.2]
    assert [c["hidden_states"].shape[0] for c in calls] == [
        4 if interval[0] <= s <= interval[1] else 2 for s in sigmas
    ]
    torch.testing.assert_close(got, euler_reference(pipe, [2, 0], 5, 3.0, interval), rtol=1e-4, atol=1e-4)


def test_guidance_interval_everywhere_equals_plain_guidance_and_nowhere_equals_none():
    pipe = make_pipe()
    plain = sample(pipe, num_inference_steps=4, guidance_scale=2.5, output_type="latent")
    everywhere = sample(
        pipe, num_inference_steps=4, guidance_scale=2.5, output_type="latent", guidance_interval=(0, 1)
    )
    nowhere = sample(pipe, num_inference_steps=4, guidance_scale=2.5, output_type="latent", guidance_interval=(0, 0))
    unguided = sample(pipe, num_inference_steps=4, guidance_scale=1.0, output_type="latent")
    torch.testing.assert_close(everywhere, plain, rtol=0, atol=0)
    torch.testing.assert_close(nowhere, unguided, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, unguided, atol=1e-4)


def test_guidance_interval_self_conditioning_keeps_each_branch(standin_module):
    """Outside the interval only the conditional branch runs; its activations keep feeding it, and the
    unconditional branch gets its own last ones back (zeros before its first pass)."""
    pipe = make_pipe(transformer=standin_dit(standin_module))
    calls, handle = record_calls(pipe.transformer)
    sample(pipe, labels=[1, 2], num_inference_steps=4, guidance_scale=2.0, guidance_interval=(0.0, 0.6))
    handle.remove()
    assert [c["hidden_states"].shape[0] for c in calls] == [2, 2, 4, 4]  # sigmas 1, 0.75 outside; 0.5, 0.25 inside
    assert calls[0]["self_cond"] is None
    torch.testing.assert_close(calls[1]["self_cond"], calls[0]["output"].last_hidden_state, rtol=0, atol=0)
    cond, uncond = calls[2]["self_cond"].chunk(2)
    torch.testing.assert_close(cond, calls[1]["output"].last_hidden_state, rtol=0, atol=0)
    assert torch.count_nonzero(uncond) == 0
    torch.testing.assert_close(calls[3]["self_cond"], calls[2]["output"].last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("interval", [(0.5, 0.2), (-0.1, 0.5), (0.2,)])
def test_bad_guidance_interval_raises(interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(make_pipe(), guidance_scale=2.0, guidance_interval=interval)


def test_the_training_runs_pipeline_holds_the_ema_weights_and_its_provenance(tmp_path):
    """pipelines/training.py: an EMA copy (the training weights untouched), the provenance, an atomic snapshot."""
    from diffusability_hf.pipelines.training import class_sample_grid, make_pipeline, save_snapshot
    from diffusability_hf.training.ema import EMA

    transformer = tiny_dit()
    ema = EMA(list(transformer.parameters()), 2.0, None)
    with torch.no_grad():
        for p in transformer.parameters():
            p.add_(1.0)  # the training weights move on; the EMA keeps the old ones
    meta = {"id2label": ID2LABEL, "latents_mean": MEAN, "latents_std": STD, "ae": "ae", "dataset": "d",
            "ae_weights_fingerprint": "a" * 16, "vae_weights_fingerprint": "b" * 16}  # fmt: skip
    pipe = make_pipeline(transformer, tiny_vae(), meta, ema=ema, shift=2.0, step=3)
    ref = tiny_dit()
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), ref.parameters()))
    assert not torch.equal(next(transformer.parameters()), next(ref.parameters()))  # a copy was changed
    assert pipe.scheduler.config.shift == 2.0 and not pipe.transformer.training
    assert pipe.config.provenance == {
        "latents_ae_weights_fingerprint": "a" * 16, "vae_weights_fingerprint": "b" * 16, "latents_ae": "ae",
        "latents": "encoded on the fly: d", "step": 3,
        "fingerprint_function": "diffusability_hf.autoencoders.weights_fingerprint",
    }  # fmt: skip
    folder = make_pipeline(transformer, tiny_vae(), meta, latents_dir=str(tmp_path)).config.provenance["latents"]
    assert folder == str(tmp_path) and "step" not in make_pipeline(transformer, tiny_vae(), meta).config.provenance
    path = save_snapshot(pipe, str(tmp_path / "snapshots"), 3)
    assert path == str(tmp_path / "snapshots" / "step-3") and os.listdir(tmp_path / "snapshots") == ["step-3"]
    with open(os.path.join(path, "model_index.json")) as f:
        assert json.load(f)["provenance"]["step"] == 3
    pipe.set_progress_bar_config(disable=True)
    grid = class_sample_grid(pipe, 3, num_inference_steps=2, per_class=2, max_classes=2)
    again = class_sample_grid(pipe, 3, num_inference_steps=2, per_class=2, max_classes=2)
    assert grid.mode == "RGB" and np.array_equal(np.asarray(grid), np.asarray(again))  # seeded
