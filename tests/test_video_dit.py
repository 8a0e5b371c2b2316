"""The video DiT of Section 4 / Appendix B (3D RoPE, no temporal patch, self-conditioning) on tiny configs."""

import ast
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.utils.dynamic_modules_utils import get_relative_imports

import diffusability_hf.models.selfcond_dit as selfcond_module
import diffusability_hf.models.video_dit as video_module
from diffusability_hf.models import (
    SelfConditionedDiT,
    SelfConditionedVideoDiT,
    SelfConditionedVideoDiTOutput,
    count_parameters,
    dit_meta_parameter_count,
    rope_3d,
    rope_3d_axes_dims,
    sincos_3d,
    video_transformer_config,
)

NUM_CLASSES = 10
DIM = 32  # DiT-tiny: 2 heads of 16


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def inputs(batch=2, channels=4, frames=3, height=8, width=8, seed=0):
    x = randn(batch, channels, frames, height, width, seed=seed)
    t = torch.linspace(50.0, 950.0, batch)
    y = torch.arange(batch) % (NUM_CLASSES + 1)
    return x, t, y


@torch.no_grad()
def randomize_(model, skip=(), std=0.1, seed=0):
    """Overwrite the (partly zero) DiT init so outputs depend on every path; parameters named in ``skip`` are kept."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not name.startswith(tuple(skip)):
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny(pos_embed="rope", patch_size=2, self_conditioning=True, **kwargs):
    config = video_transformer_config([4, 3, 8, 8], NUM_CLASSES, f"DiT-tiny/{patch_size}", pos_embed=pos_embed)
    return SelfConditionedVideoDiT(**{**config, "self_conditioning": self_conditioning, **kwargs})


def tokens(frames=3, height=8, width=8, patch_size=2):
    return frames * (height // patch_size) * (width // patch_size)


# --------------------------------------------------------------------------------------------------- shapes / init


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
@pytest.mark.parametrize("patch_size", [1, 2])
def test_shapes(pos_embed, patch_size):
    model = randomize_(tiny(pos_embed, patch_size))
    x, t, y = inputs()
    n = tokens(patch_size=patch_size)
    with torch.no_grad():
        out = model(x, t, y)
        assert isinstance(out, SelfConditionedVideoDiTOutput)
        assert out.sample.shape == x.shape and out.last_hidden_state.shape == (2, n, DIM)
        sample, last = model(x, t, y, self_cond=out.last_hidden_state, return_dict=False)
    assert sample.shape == x.shape and last.shape == (2, n, DIM)
    assert torch.isfinite(sample).all()


def test_init_is_adaln_zero_and_tokens_are_frame_patches():
    model = tiny().train()
    assert model.emb.class_embedder.dropout_prob == 0.0
    assert model.emb.class_embedder.embedding_table.num_embeddings == NUM_CLASSES + 1
    assert torch.count_nonzero(model.self_cond_proj.weight) == 0 and model.self_cond_proj.bias is None
    x, t, y = inputs()
    out = model(x, t, y)
    assert torch.count_nonzero(out.sample) == 0  # adaLN-Zero: v = 0 at init
    # Identity blocks: the last-block tokens are the per-frame patch tokens, frame after frame (t, row, col order).
    per_frame = torch.stack([model.patch_embed(x[:, :, i]) for i in range(x.shape[2])], dim=1)  # (B, T, hw, D)
    torch.testing.assert_close(out.last_hidden_state, per_frame.flatten(1, 2))


def test_single_frame_is_the_image_dit(monkeypatch):
    """T' = 1: h/p * w/p tokens, and with the positions taken out the video DiT computes what the image DiT does
    with the same weights (same parameter names, patchify, blocks, unpatchify)."""
    video = randomize_(tiny())
    image_keys = inspect.signature(SelfConditionedDiT.__init__).parameters
    image = SelfConditionedDiT(**{k: v for k, v in video.config.items() if k in image_keys})
    image.load_state_dict(video.state_dict())  # strict: the state dicts have the same keys and shapes
    x, t, y = inputs(frames=1, height=8, width=4)
    with torch.no_grad():
        out = video(x, t, y)
        assert out.last_hidden_state.shape == (2, 4 * 2, DIM) and out.sample.shape == x.shape

        def identity_3d(head_dim, frames, height, width, *args, **kwargs):
            n = frames * height * width
            return torch.ones(n, head_dim), torch.zeros(n, head_dim)

        def identity_2d(head_dim, height, width, *args, **kwargs):
            return identity_3d(head_dim, 1, height, width)

        monkeypatch.setattr(video_module, "rope_3d", identity_3d)
        monkeypatch.setattr(selfcond_module, "rope_2d", identity_2d)
        sc = randn(2, 8, DIM, seed=2)
        a, b = video(x, t, y, self_cond=sc), image(x[:, :, 0], t, y, self_cond=sc)
    torch.testing.assert_close(a.sample[:, :, 0], b.sample)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state)


def test_other_sizes_and_clear_errors():
    model = randomize_(tiny())
    x, t, y = inputs(frames=2, height=8, width=4)  # config: 3 x 8 x 8
    with torch.no_grad():
        assert model(x, t, y).sample.shape == (2, 4, 2, 8, 4)
        assert randomize_(tiny("sincos"))(x, t, y).sample.shape == (2, 4, 2, 8, 4)
        with pytest.raises(ValueError, match="divisible by the patch size 2"):
            model(randn(2, 4, 3, 7, 8), t, y)
        with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
            model(randn(2, 4, 8, 8), t, y)
        with pytest.raises(ValueError, match="4 input channels"):
            model(randn(2, 3, 2, 8, 8), t, y)
        with pytest.raises(ValueError, match=r"\(B, N, D\)"):
            model(x, t, y, self_cond=torch.zeros(2, 3, DIM))
        with pytest.raises(ValueError, match="self_conditioning=False"):
            tiny(self_conditioning=False)(x, t, y, self_cond=torch.zeros(2, 16, DIM))
    with pytest.raises(ValueError, match="rope"):
        tiny(pos_embed="alibi")
    with pytest.raises(ValueError, match="even size of at least 6"):
        SelfConditionedVideoDiT(num_attention_heads=2, attention_head_dim=4)
    with pytest.raises(ValueError, match="summing to attention_head_dim = 16"):
        tiny(rope_axes_dims=[4, 4, 4])
    with pytest.raises(ValueError, match="must divide sample_size"):
        tiny(sample_size=6, patch_size=4)


# ---------------------------------------------------------------------------------------------------------- 3D RoPE


def test_axes_split():
    assert rope_3d_axes_dims(64) == (16, 24, 24)  # DiT-S/B/L heads: CogVideoX's d/4, 3d/8, 3d/8
    assert rope_3d_axes_dims(72) == (20, 26, 26)  # DiT-XL heads: 3d/8 = 27 is odd
    assert rope_3d_axes_dims(16) == (4, 6, 6) and rope_3d_axes_dims(6) == (2, 2, 2)
    for d in range(6, 200, 2):
        dt, ds, dw = rope_3d_axes_dims(d)
        assert dt + ds + dw == d and ds == dw and min(dt, ds) >= 2 and dt % 2 == ds % 2 == 0
        assert dt >= d / 4 and dt < d / 4 + 4
    for bad in (2, 4, 7, 15):
        with pytest.raises(ValueError, match="even size of at least 6"):
            rope_3d_axes_dims(bad)


@pytest.mark.parametrize("axes_dims", [None, (6, 6, 4)])
def test_rope_scores_depend_only_on_offsets(axes_dims):
    head_dim, frames, height, width = 16, 4, 5, 6
    cos, sin = rope_3d(head_dim, frames, height, width, axes_dims=axes_dims)
    n = frames * height * width
    assert cos.shape == sin.shape == (n, head_dim)
    q = randn(head_dim, seed=0).expand(1, 1, n, head_dim)
    k = randn(head_dim, seed=1).expand(1, 1, n, head_dim)
    rq, rk = apply_rotary_emb(q, (cos, sin))[0, 0], apply_rotary_emb(k, (cos, sin))[0, 0]  # (N, head_dim)
    s = (rq @ rk.T).reshape(frames, height, width, frames, height, width)  # [t_q, r_q, c_q, t_k, r_k, c_k]
    # The whole grid shifted by (1, 2, 1) keeps every score, for all offsets at once.
    torch.testing.assert_close(s[:-1, :-2, :-1, :-1, :-2, :-1], s[1:, 2:, 1:, 1:, 2:, 1:])
    torch.testing.assert_close(s[0, 0, 1, 2, 1, 3], s[1, 3, 3, 3, 4, 5])  # offset (+2, +1, +2)
    # ... and each axis matters.
    assert not torch.allclose(s[0, 0, 0, 1, 0, 0], s[0, 0, 0, 0, 0, 0])  # time
    assert not torch.allclose(s[0, 0, 0, 0, 1, 0], s[0, 0, 0, 0, 0, 0])  # rows
    assert not torch.allclose(s[0, 0, 0, 0, 0, 1], s[0, 0, 0, 0, 0, 0])  # columns
    # Channel groups [time | rows | cols], tokens in (t, row, col) row-major order.
    dt, dh, _ = axes_dims or rope_3d_axes_dims(head_dim)
    grid = cos.reshape(frames, height, width, head_dim)
    groups = {"t": grid[..., :dt], "r": grid[..., dt : dt + dh], "c": grid[..., dt + dh :]}
    for name, g in groups.items():
        for axis, axis_name in enumerate("trc"):
            same = torch.allclose(g.narrow(axis, 0, 1), g.narrow(axis, 1, 1))
            assert same == (name != axis_name), (name, axis_name)


def test_sincos_table_layout():
    frames, height, width = 3, 4, 5
    table = sincos_3d(DIM, frames, height, width).reshape(frames, height, width, DIM)
    dt, dh, _ = rope_3d_axes_dims(DIM)
    groups = {"t": table[..., :dt], "r": table[..., dt : dt + dh], "c": table[..., dt + dh :]}
    for name, g in groups.items():
        for axis, axis_name in enumerate("trc"):
            assert torch.allclose(g.narrow(axis, 0, 1), g.narrow(axis, 1, 1)) == (name != axis_name)
    assert len({tuple(v.tolist()) for v in table.reshape(-1, DIM)}) == frames * height * width  # all distinct


def _time_free(fn, positional):
    """``fn`` (rope_3d / sincos_3d) with every frame at time 0: spatial positions kept, the time axis removed."""

    def patched(dim, num_frames, height, width, *args, **kwargs):
        out = fn(dim, 1, height, width, *args, **kwargs)
        return tuple(o.repeat(num_frames, 1) for o in out) if positional else out.repeat(num_frames, 1)

    return patched


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_frame_order_matters_through_the_time_axis(pos_embed, monkeypatch):
    model = randomize_(tiny(pos_embed, patch_size=1))
    x, t, y = inputs(frames=3, height=4, width=4)
    perm = [2, 1, 0]

    def swap_equivariance_gap():
        with torch.no_grad():
            return (model(x[:, :, perm], t, y).sample - model(x, t, y).sample[:, :, perm]).abs().max().item()

    assert swap_equivariance_gap() > 1e-3  # swapping two frames changes more than the order of the outputs
    # Control: without the time positions, attention cannot tell the frames apart and commutes with their order.
    name = "rope_3d" if pos_embed == "rope" else "sincos_3d"
    monkeypatch.setattr(video_module, name, _time_free(getattr(video_module, name), pos_embed == "rope"))
    assert swap_equivariance_gap() < 1e-5


# ----------------------------------------------------------------------------------- self-conditioning / classes


def test_self_cond_zeros_are_no_self_cond():
    model = randomize_(tiny(), skip=("self_cond_proj",))
    x, t, y = inputs()
    self_cond = randn(2, tokens(), DIM, seed=3)
    with torch.no_grad():
        plain = model(x, t, y).sample
        torch.testing.assert_close(model(x, t, y, self_cond=self_cond).sample, plain, rtol=0, atol=0)  # zero init
        model.self_cond_proj.weight.normal_(0, 0.1)  # as after training
        assert not torch.allclose(model(x, t, y, self_cond=self_cond).sample, plain)
        # Bias-free: zeros mean "no self-conditioning" exactly, so scripts can mask per sample.
        torch.testing.assert_close(model(x, t, y, self_cond=torch.zeros_like(self_cond)).sample, plain, rtol=0, atol=0)


def test_null_class_and_cfg_batch():
    model = randomize_(tiny()).train()
    x, t, _ = inputs()
    y = torch.tensor([3, 7])
    null = torch.full_like(y, NUM_CLASSES)
    with torch.no_grad():
        cond = model(x, t, y).sample
        uncond = model(x, t, null).sample
        assert not torch.allclose(cond, uncond)
        # Classifier-free guidance: one batch of 2B (conditional, then null class), as a sampler runs it.
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).sample
        torch.testing.assert_close(both[:2], cond)
        torch.testing.assert_close(both[2:], uncond)
        guided = both[2:] + 3.0 * (both[:2] - both[2:])
        assert guided.shape == x.shape and torch.isfinite(guided).all()
        torch.testing.assert_close(model(x, t, y).sample, cond, rtol=0, atol=0)  # no label dropout in train mode
        torch.testing.assert_close(model(x, 500.0, y).sample, model(x, torch.full((2,), 500.0), y).sample)
        with pytest.raises(IndexError):
            model(x, t, torch.full((2,), NUM_CLASSES + 1))


# ------------------------------------------------------------------------------------------------------- training


def test_gradients_and_one_step_lowers_the_loss():
    model = randomize_(tiny()).train()
    x, t, y = inputs()
    target = randn(*x.shape, seed=5)
    with torch.no_grad():
        aux = model(x, t, y).last_hidden_state  # the auxiliary pass: no gradient through it

    def loss():
        return (model(x, t, y, self_cond=aux).sample - target).pow(2).mean()

    before = loss()
    before.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
        assert loss() < before.detach()


def test_gradients_at_dit_init_reach_the_output_layer_only():
    model = tiny().train()
    x, t, y = inputs()
    (model(x, t, y, self_cond=randn(2, tokens(), DIM, seed=1)).sample - randn(*x.shape, seed=5)).pow(
        2
    ).mean().backward()
    nonzero = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # adaLN-Zero: the zero output layer blocks every gradient behind it, so only it learns in the first step.
    assert nonzero == {"proj_out_2.weight", "proj_out_2.bias"}
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_matches():
    model = randomize_(tiny())
    x, t, y = inputs()
    sc = randn(2, tokens(), DIM, seed=4)
    model(x, t, y, self_cond=sc).sample.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    model(x, t, y, self_cond=sc).sample.square().mean().backward()
    for g, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------------------------- saving and loading


@pytest.mark.parametrize("pos_embed, axes", [("rope", None), ("rope", [6, 4, 6]), ("sincos", None)])
def test_save_pretrained_round_trip(tmp_path, pos_embed, axes):
    model = randomize_(tiny(pos_embed, rope_axes_dims=axes)).eval()
    model.save_pretrained(tmp_path)
    loaded = SelfConditionedVideoDiT.from_pretrained(tmp_path).eval()
    assert loaded.config.pos_embed == pos_embed and loaded.config.num_frames == 3 and loaded.config.self_conditioning
    x, t, y = inputs()
    with torch.no_grad():
        a, b = model(x, t, y), loaded(x, t, y)
        torch.testing.assert_close(a.sample, b.sample, rtol=0, atol=0)
        sc = a.last_hidden_state
        torch.testing.assert_close(model(x, t, y, self_cond=sc).sample, loaded(x, t, y, self_cond=sc).sample)


def test_model_file_is_self_contained():
    path = Path(video_module.__file__)
    code = path.read_text(encoding="utf-8")
    tree = ast.parse(code)
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    roots = {a.name.split(".")[0] for node in top if isinstance(node, ast.Import) for a in node.names}
    roots |= {node.module.split(".")[0] for node in top if isinstance(node, ast.ImportFrom)}
    assert roots <= {"torch", "diffusers", "inspect", "typing", "dataclasses"}
    nested = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert len(nested) == len(top)  # no import statement below the top level either
    # diffusers' remote-code loader (and DiTFlowMatchPipeline.save_pretrained's warning) scan every line for
    # relative imports: a folder holding only this file must need no sibling file.
    assert get_relative_imports(str(path)) == []
    assert not any(line.lstrip().startswith("from .") for line in code.splitlines())


def _copied_objects(tree):
    """``(qualified name, node)`` of every class / function in ``tree``, methods as ``Class.method``."""
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            yield node.name, node
        if isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef):
                    yield f"{node.name}.{sub.name}", sub


def test_copies_from_selfcond_dit_agree():
    """Every ``# Copied from diffusability_hf.models.selfcond_dit.X[ with A->B]`` block is X's source, renamed."""
    lines = Path(video_module.__file__).read_text(encoding="utf-8").splitlines()
    mark = re.compile(r"^\s*# Copied from diffusability_hf\.models\.selfcond_dit\.(\S+?)(?: with (.+))?$")
    checked = []
    for name, node in _copied_objects(ast.parse("\n".join(lines))):
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        match = mark.match(lines[first - 2])
        if match is None:
            continue
        source = selfcond_module
        for part in match[1].split("."):
            source = getattr(source, part)
        expected = inspect.getsource(source)
        for rule in (match[2] or "").split(","):
            if rule.strip():
                old, new = rule.strip().split("->")
                expected = expected.replace(old, new)
        ours = video_module
        for part in name.split("."):
            ours = getattr(ours, part)
        assert inspect.getsource(ours) == expected, f"{name} differs from selfcond_dit.{match[1]}: sync the copy"
        checked.append(match[1])
    assert sorted(checked) == ["RoPEAttnProcessor", "SelfConditionedDiT._init_dit_weights", "SelfConditionedDiTBlock"]


STANDALONE = """
import importlib.util, json, sys
import torch
folder, inputs_path, out_path = sys.argv[1:4]
spec = importlib.util.spec_from_file_location("video_dit", folder + "/video_dit.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
from diffusers.utils.dynamic_modules_utils import get_class_from_dynamic_module
remote = get_class_from_dynamic_module(
    folder, module_file="video_dit.py", class_name="SelfConditionedVideoDiT", trust_remote_code=True
)
x, t, y, sc = torch.load(inputs_path)
outs = {}
with torch.no_grad():
    for name, cls in (("by_path", module.SelfConditionedVideoDiT), ("remote_code", remote)):
        model = cls.from_pretrained(folder).eval()
        out = model(x, t, y, self_cond=sc)
        outs[name] = (out.sample, out.last_hidden_state)
torch.save(outs, out_path)
print(json.dumps({"toolkit_imported": any(m.split(".")[0] == "diffusability_hf" for m in sys.modules)}))
"""


def test_loads_alone_in_a_fresh_process(tmp_path):
    """The file copied alone next to the weights (a pipeline's ``transformer/`` folder) loads without the toolkit,
    by file path and through diffusers' remote-code loader, and gives the same outputs."""
    model = randomize_(tiny()).eval()
    folder = tmp_path / "transformer"
    model.save_pretrained(folder)
    shutil.copyfile(video_module.__file__, folder / "video_dit.py")
    x, t, y = inputs()
    with torch.no_grad():
        sc = model(x, t, y).last_hidden_state
        ref = model(x, t, y, self_cond=sc)
    torch.save((x, t, y, sc), tmp_path / "inputs.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"toolkit_imported": False}
    outs = torch.load(tmp_path / "out.pt")
    assert set(outs) == {"by_path", "remote_code"}
    for sample, last in outs.values():
        torch.testing.assert_close(sample, ref.sample)
        torch.testing.assert_close(last, ref.last_hidden_state)


# ----------------------------------------------------------------------------------------------- configs / sizes


def test_video_transformer_config_by_name_and_size():
    config = video_transformer_config([16, 5, 32, 32], 700, "DiT-B/2")
    assert config == {
        "num_attention_heads": 12,
        "attention_head_dim": 64,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 12,
        "sample_size": 32,
        "num_frames": 5,
        "patch_size": 2,
        "num_embeds_ada_norm": 700,
        "pos_embed": "rope",
        "self_conditioning": True,
    }
    # No temporal patch and no position parameters: exactly the image DiT-B/2's parameters for the same latents.
    video = dit_meta_parameter_count(config, SelfConditionedVideoDiT)
    image_config = {k: v for k, v in config.items() if k not in ("num_frames",)}
    assert video == dit_meta_parameter_count(image_config, SelfConditionedDiT) == 130_736_704
    assert video_transformer_config([128, 3, 8, 8], 700, "DiT-B/1")["patch_size"] == 1  # LTX-AE (Table 2)
    xl = video_transformer_config([16, 5, 32, 32], 700, "DiT-XL/2")
    assert xl["attention_head_dim"] == 72 and dit_meta_parameter_count(xl, SelfConditionedVideoDiT) > 0
    with pytest.raises(ValueError, match="multiple of 2"):
        video_transformer_config([16, 5, 31, 31], 700, "DiT-B/2")
    with pytest.raises(ValueError, match="square"):
        video_transformer_config([16, 5, 32, 16], 700, "DiT-B/2")
    with pytest.raises(ValueError, match=r"\(C, T', h, w\)"):
        video_transformer_config([16, 32, 32], 700, "DiT-B/2")
    with pytest.raises(ValueError, match="DiT-XL/2"):
        video_transformer_config([16, 5, 32, 32], 700, "DiT-M/2")


def test_video_transformer_config_from_a_file(tmp_path):
    model = tiny("sincos", rope_axes_dims=[8, 12, 12])
    model.save_config(tmp_path / "video")
    config = video_transformer_config([4, 3, 8, 8], NUM_CLASSES, config_path=str(tmp_path / "video"))
    again = SelfConditionedVideoDiT.from_config(config)
    public = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (again, model)]
    assert public[0] == public[1] and count_parameters(again) == count_parameters(model)
    with pytest.raises(ValueError, match=r"takes 4x3x8\^2 latents \(C x T' x h\^2\), but lat holds 4x5x8\^2 ones"):
        video_transformer_config([4, 5, 8, 8], NUM_CLASSES, config_path=str(tmp_path / "video"), latents="lat")
    SelfConditionedDiT(num_layers=1, num_attention_heads=2, attention_head_dim=16).save_config(tmp_path / "image")
    with pytest.raises(ValueError, match="SelfConditionedDiT config, not a SelfConditionedVideoDiT"):
        video_transformer_config([4, 3, 8, 8], NUM_CLASSES, config_path=str(tmp_path / "image"))
