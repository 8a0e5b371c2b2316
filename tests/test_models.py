"""DiT presets (paper Appendix B) over diffusers' DiT, and the self-conditioned RoPE DiT, on tiny configs."""

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

import diffusability_hf.models.selfcond_dit as selfcond_module
from diffusability_hf.models import (
    DIT_PRESETS,
    SelfConditionedDiT,
    build_dit,
    build_selfcond_dit,
    build_transformer,
    count_parameters,
    disable_label_dropout,
    dit_config,
    dit_meta_parameter_count,
    parse_dit_name,
    rope_2d,
    transformer_class,
    transformer_config,
)

NUM_CLASSES = 10


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def inputs(batch=2, channels=4, height=8, width=8, seed=0):
    x = randn(batch, channels, height, width, seed=seed)
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


def tiny_selfcond(pos_embed="rope", patch_size=2, self_conditioning=True, sample_size=8):
    return build_selfcond_dit(
        f"DiT-tiny/{patch_size}", 4, sample_size, NUM_CLASSES, pos_embed=pos_embed, self_conditioning=self_conditioning
    )


# ----------------------------------------------------------------------------------------------- presets / configs


def test_presets_are_appendix_b():
    expected = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    for name, (hidden, depth, heads) in expected.items():
        assert DIT_PRESETS[name] == {"hidden_size": hidden, "num_layers": depth, "num_heads": heads}
    assert parse_dit_name("DiT-XL/2") == ("XL", 2) and parse_dit_name("DiT-B/1") == ("B", 1)
    for bad in ("DiT-M/2", "DiT-XL/3", "XL/2", "dit-xl/2"):
        with pytest.raises(ValueError, match="DiT-XL/2"):
            parse_dit_name(bad)


def test_dit_config_fields():
    cfg = dit_config("DiT-L/2", in_channels=16, sample_size=32, num_classes=1000)
    assert cfg["in_channels"] == cfg["out_channels"] == 16  # velocity prediction, no learned sigma
    assert cfg["num_embeds_ada_norm"] == 1000 and cfg["norm_type"] == "ada_norm_zero"
    assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == 1024 and cfg["num_layers"] == 24
    assert cfg["patch_size"] == 2 and cfg["sample_size"] == 32


def test_patch_size_must_divide_sample_size():
    with pytest.raises(ValueError, match=r"multiple of 4 \(e\.g\. 28 or 32\).*\[1, 2\]"):
        dit_config("DiT-S/4", sample_size=30)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_dit("DiT-tiny/4", sample_size=6)


# DiT paper (Peebles & Xie, 2023) sizes: their count includes the fixed sincos table (as a frozen parameter) and the
# learned-sigma half of the output layer; XL/2 is printed exactly by their train.py.
@pytest.mark.parametrize(
    "name, published", [("DiT-S/2", 33.0e6), ("DiT-B/2", 130.3e6), ("DiT-L/2", 458.0e6), ("DiT-XL/2", 675129632)]
)
def test_parameter_counts_match_dit_paper(name, published):
    cfg = dit_config(name, in_channels=4, sample_size=32, num_classes=1000)  # fits both DiT classes
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    ours = dit_meta_parameter_count({**cfg, "pos_embed": "sincos", "self_conditioning": False}, SelfConditionedDiT)
    their_extras = 16 * 16 * hidden + hidden * 2 * 2 * 4 + 2 * 2 * 4  # sincos table + sigma outputs
    if isinstance(published, int):
        assert ours + their_extras == published
    else:
        assert ours + their_extras == pytest.approx(published, rel=0.01)
    # diffusers' stock DiT repeats the timestep + label embedder in every block.
    stock = dit_meta_parameter_count(dit_config(name, in_channels=4, sample_size=32, num_classes=1000))
    per_block_embedder = 256 * hidden + hidden + hidden * hidden + hidden + 1001 * hidden
    assert stock == ours + (cfg["num_layers"] - 1) * per_block_embedder
    # Self-conditioning adds one D x D linear layer.
    with_sc = dit_meta_parameter_count({**cfg, "self_conditioning": True}, SelfConditionedDiT)
    assert with_sc == ours + hidden * hidden  # bias-free


# ------------------------------------------------------------------------------------------------------- stock DiT


@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_stock_dit_shapes(patch_size):
    model = build_dit(f"DiT-tiny/{patch_size}", in_channels=4, sample_size=8, num_classes=NUM_CLASSES)
    assert isinstance(model, DiTTransformer2DModel)
    x, t, y = inputs()
    with torch.no_grad():
        out = model(x, t, y).sample
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero init: the model starts at v = 0


def test_stock_dit_label_dropout_disabled_and_null_class():
    model = build_dit("DiT-tiny/2", sample_size=8, num_classes=NUM_CLASSES, init_weights=False).train()
    for block in model.transformer_blocks:
        assert block.norm1.emb.class_embedder.dropout_prob == 0.0
        assert block.norm1.emb.class_embedder.embedding_table.num_embeddings == NUM_CLASSES + 1
    x, t, _ = inputs(batch=8)
    y = torch.tensor([0, 1, 2, 3, NUM_CLASSES, 5, 6, NUM_CLASSES])  # NUM_CLASSES is the null class
    torch.manual_seed(0)
    a = model(x, t, y).sample
    torch.manual_seed(1)
    b = model(x, t, y).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(IndexError):
        model(x, t, torch.full((8,), NUM_CLASSES + 1))


def test_stock_dit_without_fix_drops_labels_per_block():
    # The failure mode disable_label_dropout exists for (diffusers default p = 0.1 in every block).
    model = DiTTransformer2DModel(**dit_config("DiT-tiny/2", sample_size=8, num_classes=NUM_CLASSES)).train()
    x, t, _ = inputs(batch=64)
    y = torch.zeros(64, dtype=torch.long)
    torch.manual_seed(0)
    a = model(x, t, y).sample
    torch.manual_seed(1)
    b = model(x, t, y).sample
    assert not torch.allclose(a, b)
    assert disable_label_dropout(model) == 2  # one LabelEmbedding per block
    torch.testing.assert_close(model(x, t, y).sample, model(x, t, y).sample, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ self-conditioned DiT


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_selfcond_dit_shapes(pos_embed, patch_size):
    model = randomize_(tiny_selfcond(pos_embed, patch_size))
    x, t, y = inputs()
    n = (8 // patch_size) ** 2
    with torch.no_grad():
        out = model(x, t, y)
        assert out.sample.shape == x.shape
        assert out.last_hidden_state.shape == (2, n, 32)
        sample, last = model(x, t, y, self_cond=out.last_hidden_state, return_dict=False)
    assert sample.shape == x.shape and last.shape == (2, n, 32)


def test_selfcond_dit_rope_non_square_and_bad_inputs():
    model = randomize_(tiny_selfcond("rope"))
    x, t, y = inputs(height=8, width=4)
    with torch.no_grad():
        assert model(x, t, y).sample.shape == (2, 4, 8, 4)
        with pytest.raises(ValueError, match="divisible by the patch size"):
            model(randn(2, 4, 7, 8), t, y)
        with pytest.raises(ValueError, match=r"\(B, N, D\)"):
            model(x, t, y, self_cond=torch.zeros(2, 3, 32))
        with pytest.raises(ValueError, match="self_conditioning=False"):
            tiny_selfcond(self_conditioning=False)(x, t, y, self_cond=torch.zeros(2, 8, 32))
    with pytest.raises(ValueError, match="rope"):
        SelfConditionedDiT(pos_embed="alibi")
    with pytest.raises(ValueError, match="adaLN-Zero"):
        SelfConditionedDiT(norm_type="layer_norm")


def test_selfcond_dit_init_and_null_class():
    model = tiny_selfcond().train()
    assert model.emb.class_embedder.dropout_prob == 0.0
    assert model.emb.class_embedder.embedding_table.num_embeddings == NUM_CLASSES + 1
    assert torch.count_nonzero(model.self_cond_proj.weight) == 0 and model.self_cond_proj.bias is None
    x, t, _ = inputs()
    out = model(x, t, torch.tensor([NUM_CLASSES, 3]))
    assert torch.count_nonzero(out.sample) == 0  # adaLN-Zero
    # Zero gates make every block the identity, so the last-block activations (before the final norm) are the
    # patch tokens themselves.
    torch.testing.assert_close(out.last_hidden_state, model.patch_embed(x))
    randomize_(model)
    y = torch.tensor([NUM_CLASSES, 3])
    torch.testing.assert_close(model(x, t, y).sample, model(x, t, y).sample, rtol=0, atol=0)  # no label dropout


def _identity_rope(head_dim, height, width, theta=10000.0, device=None):
    return torch.ones(height * width, head_dim, device=device), torch.zeros(height * width, head_dim, device=device)


def test_rope_makes_the_model_position_dependent(monkeypatch):
    model = randomize_(tiny_selfcond("rope", patch_size=1))
    x, t, y = inputs()

    def flip_equivariance_gap():
        with torch.no_grad():
            return (model(x.flip(-1), t, y).sample - model(x, t, y).sample.flip(-1)).abs().max().item()

    assert flip_equivariance_gap() > 1e-3
    # Control: without the rotation the model has no position information and commutes with permutations.
    monkeypatch.setattr(selfcond_module, "rope_2d", _identity_rope)
    assert flip_equivariance_gap() < 1e-5


def test_rope_scores_depend_only_on_offsets():
    head_dim, height, width = 16, 5, 6
    cos, sin = rope_2d(head_dim, height, width)
    assert cos.shape == sin.shape == (height * width, head_dim)
    q = randn(head_dim, seed=0).expand(1, 1, height * width, head_dim)
    k = randn(head_dim, seed=1).expand(1, 1, height * width, head_dim)
    rq, rk = apply_rotary_emb(q, (cos, sin))[0, 0], apply_rotary_emb(k, (cos, sin))[0, 0]  # (N, head_dim)
    scores = (rq @ rk.T).reshape(height, width, height, width)  # [row_q, col_q, row_k, col_k]
    torch.testing.assert_close(scores[0, 0, 1, 2], scores[3, 2, 4, 4])  # offset (+1, +2)
    torch.testing.assert_close(scores[2, 5, 0, 1], scores[4, 4, 2, 0])  # offset (-2, -4)
    assert not torch.allclose(scores[0, 0, 1, 2], scores[0, 0, 2, 1])
    # Which half encodes what: the first head_dim / 2 channels follow the row, the rest the column.
    grid = rq.reshape(height, width, head_dim)
    torch.testing.assert_close(grid[2, 0, : head_dim // 2], grid[2, 5, : head_dim // 2])  # same row
    torch.testing.assert_close(grid[0, 3, head_dim // 2 :], grid[4, 3, head_dim // 2 :])  # same column
    assert not torch.allclose(grid[0, 3, : head_dim // 2], grid[4, 3, : head_dim // 2])
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d(6, 2, 2)


def test_self_cond_proj_is_zero_initialised():
    model = randomize_(tiny_selfcond(), skip=("self_cond_proj",))
    x, t, y = inputs()
    self_cond = randn(2, 16, 32, seed=3)
    with torch.no_grad():
        plain = model(x, t, y).sample
        torch.testing.assert_close(model(x, t, y, self_cond=self_cond).sample, plain, rtol=0, atol=0)
        for p in model.self_cond_proj.parameters():  # as after training
            p.normal_(0, 0.1)
        assert not torch.allclose(model(x, t, y, self_cond=self_cond).sample, plain)
        # Bias-free: zeros mean "no self-conditioning" even after training, so scripts can mask per sample.
        torch.testing.assert_close(model(x, t, y, self_cond=torch.zeros_like(self_cond)).sample, plain, rtol=0, atol=0)


def test_self_conditioning_training_step_has_no_gradient_through_auxiliary_pass():
    model = randomize_(tiny_selfcond(), skip=("self_cond_proj",)).train()
    with torch.no_grad():
        model.self_cond_proj.weight.normal_(0, 0.1)
    x, t, y = inputs()
    target = randn(*x.shape, seed=5)
    with torch.no_grad():
        aux = model(x, t, y).last_hidden_state
    assert not aux.requires_grad and aux.grad_fn is None
    loss = (model(x, t, y, self_cond=aux).sample - target).pow(2).mean()
    loss.backward()
    assert model.self_cond_proj.weight.grad is not None and model.self_cond_proj.weight.grad.abs().sum() > 0
    # Gradients come from the main pass only: the same step with the auxiliary output as a constant agrees.
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (model(x, t, y, self_cond=aux.clone()).sample - target).pow(2).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n])


def test_gradient_checkpointing_matches():
    model = randomize_(tiny_selfcond())
    x, t, y = inputs()
    sc = randn(2, 16, 32, seed=4)
    model(x, t, y, self_cond=sc).sample.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t, y, self_cond=sc).sample.square().mean().backward()
    for g, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------------------------- saving and loading


@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
def test_save_pretrained_round_trip(tmp_path, pos_embed):
    model = randomize_(tiny_selfcond(pos_embed)).eval()
    model.save_pretrained(tmp_path)
    loaded = SelfConditionedDiT.from_pretrained(tmp_path).eval()
    assert loaded.config.pos_embed == pos_embed and loaded.config.self_conditioning
    x, t, y = inputs()
    with torch.no_grad():
        a, b = model(x, t, y), loaded(x, t, y)
        torch.testing.assert_close(a.sample, b.sample, rtol=0, atol=0)
        sc = a.last_hidden_state
        torch.testing.assert_close(model(x, t, y, self_cond=sc).sample, loaded(x, t, y, self_cond=sc).sample)


def test_stock_dit_round_trip_needs_dropout_fix_again(tmp_path):
    model = build_dit("DiT-tiny/2", sample_size=8, num_classes=NUM_CLASSES, init_weights=False)
    model.save_pretrained(tmp_path)
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob == pytest.approx(0.1)
    disable_label_dropout(loaded)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y).sample, loaded.train()(x, t, y).sample)


def test_model_file_is_self_contained_and_loads_standalone(tmp_path, monkeypatch):
    path = selfcond_module.__file__
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    roots = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert all(node.level == 0 for node in ast.walk(tree) if isinstance(node, ast.ImportFrom))
    assert roots <= {"torch", "diffusers", "math", "typing", "dataclasses"}

    model = randomize_(tiny_selfcond()).eval()
    model.save_pretrained(tmp_path)
    # Block the package so that any import of it from the copied file fails.
    monkeypatch.setitem(sys.modules, "diffusability_hf", None)
    spec = importlib.util.spec_from_file_location("standalone_selfcond_dit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loaded = module.SelfConditionedDiT.from_pretrained(tmp_path).eval()
    assert type(loaded) is not SelfConditionedDiT
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y).sample, model(x, t, y).sample, rtol=0, atol=0)


def test_count_parameters_on_tiny():
    model = tiny_selfcond()
    assert count_parameters(model) == count_parameters(model, trainable_only=True) > 0


def test_the_training_scripts_transformer_from_a_size_or_a_config_file(tmp_path):
    """transformer_config (a size, or a config file checked against the latents) and build_transformer."""
    config = transformer_config([4, 8, 8], 3, "DiT-tiny/2")
    assert config == dit_config("DiT-tiny/2", 4, 8, 3)
    paper = build_transformer(config, pos_embed="sincos", self_conditioning=False)
    assert type(paper) is SelfConditionedDiT and paper.config.pos_embed == "sincos"
    assert not paper.config.self_conditioning
    stock = build_transformer(config, stock_dit=True)
    assert type(stock) is DiTTransformer2DModel
    assert {m.dropout_prob for m in stock.modules() if hasattr(m, "dropout_prob")} == {0.0}
    for model in (stock, paper):
        model.save_config(tmp_path / type(model).__name__)
        read = transformer_config([4, 8, 8], 3, config_path=str(tmp_path / type(model).__name__))
        assert transformer_class(read) is type(model)
        again = build_transformer(read, from_config=True)
        public = [{k: v for k, v in m.config.items() if not k.startswith("_")} for m in (again, model)]
        assert type(again) is type(model) and public[0] == public[1]
    assert {m.dropout_prob for m in again.modules() if hasattr(m, "dropout_prob")} <= {0.0}
    with pytest.raises(ValueError, match=r"takes 4x8\^2 latents, but lat holds 16x8\^2 ones"):
        transformer_config([16, 8, 8], 3, config_path=str(tmp_path / "DiTTransformer2DModel"), latents="lat")


def test_video_latents_get_the_video_dit_through_the_image_entry_points():
    """transformer_config / build_transformer / transformer_class (what train_dit_flow.py calls) dispatch
    (C, T', h, w) latents and SelfConditionedVideoDiT configs to the video DiT."""
    from diffusability_hf.models.factory import build_transformer, transformer_class, transformer_config
    from diffusability_hf.models.video_dit import SelfConditionedVideoDiT

    config = transformer_config([4, 3, 8, 8], 5, "DiT-tiny/2")
    assert (config["num_frames"], config["sample_size"], config["in_channels"]) == (3, 8, 4)
    model = build_transformer(config, pos_embed="rope", self_conditioning=False)
    assert isinstance(model, SelfConditionedVideoDiT) and not model.config.self_conditioning
    out = model(torch.randn(2, 4, 3, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([0, 5])).sample
    assert out.shape == (2, 4, 3, 8, 8)
    assert transformer_class(json.loads(model.to_json_string())) is SelfConditionedVideoDiT  # a saved config.json
    assert "num_frames" not in transformer_config([4, 8, 8], 5, "DiT-tiny/2")  # images stay on the image DiT


def test_class_embed_init_std_sets_only_the_label_table_and_rope_plus_sincos_has_both_positions():
    """The init option of the DiTs (DiT's 0.02 by default, e.g. 1.0 for short runs): it scales the label table and
    nothing else; ``pos_embed="rope+sincos"`` adds DiT's absolute table to RoPE (RoPE alone is translation
    invariant: a shifted input gives a shifted output)."""
    from diffusability_hf.models.video_dit import SelfConditionedVideoDiT

    config = dit_config("DiT-tiny/2", 4, 8, 3)
    video = {k: v for k, v in config.items() if k != "norm_type"}
    for cls, kwargs in ((SelfConditionedDiT, config), (SelfConditionedVideoDiT, {**video, "num_frames": 2})):
        torch.manual_seed(0)
        dit = cls(**kwargs).state_dict()
        torch.manual_seed(0)
        wide = cls(**kwargs, class_embed_init_std=1.0).state_dict()
        table = "emb.class_embedder.embedding_table.weight"
        assert 0.5 < wide[table].std() < 1.5 and dit[table].std() < 0.04
        assert torch.allclose(wide[table] / 1.0, dit[table] / 0.02)  # the same draw, scaled
        assert all(torch.equal(dit[k], wide[k]) for k in dit if k != table)
        with pytest.raises(ValueError, match="class_embed_init_std must be positive"):
            cls(**kwargs, class_embed_init_std=0.0)

    # rope+sincos: the patch tokens carry DiT's absolute table (RoPE alone adds nothing to them) and attention still
    # rotates q and k (the same weights without RoPE give another output)
    zeros = torch.zeros(1, 4, 8, 8)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.tensor([1])
    models = {}
    for pos_embed in ("rope", "rope+sincos", "sincos"):
        torch.manual_seed(0)
        models[pos_embed] = SelfConditionedDiT(**config, pos_embed=pos_embed, self_conditioning=False)
        for p in models[pos_embed].parameters():  # adaLN-Zero starts at 0: give every layer weights
            p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    with torch.no_grad():
        tokens = {k: m.patch_embed(zeros) - m.patch_embed.proj.bias for k, m in models.items()}
        out = {k: m(x, t, y).sample for k, m in models.items()}
    assert tokens["rope"].abs().max() < 1e-6 and tokens["rope+sincos"].abs().max() > 0.1
    assert torch.allclose(tokens["rope+sincos"], tokens["sincos"])
    assert not torch.allclose(out["rope+sincos"], out["sincos"], atol=1e-4)
    assert not torch.allclose(out["rope+sincos"], out["rope"], atol=1e-4)


def test_stock_dit_gets_dits_init_from_a_preset_and_from_a_config_file(tmp_path):
    """--stock_dit builds diffusers' DiT with DiT's init on both paths (from_config alone skips it: PyTorch's default
    init, a label table at std ~1 and a non-zero output layer), with the label table's std as asked."""
    config = transformer_config([4, 8, 8], 3, "DiT-tiny/2")
    DiTTransformer2DModel(**config).save_config(tmp_path / "stock")
    from_file = transformer_config([4, 8, 8], 3, config_path=str(tmp_path / "stock"))
    for built in (
        build_transformer(config, stock_dit=True),
        build_transformer(from_file, from_config=True, stock_dit=True),
        build_transformer(from_file, from_config=True),
    ):
        assert type(built) is DiTTransformer2DModel
        assert built.proj_out_2.weight.abs().sum() == 0 and built.proj_out_1.weight.abs().sum() == 0
        tables = [b.norm1.emb.class_embedder.embedding_table.weight for b in built.transformer_blocks]
        assert all(t.std() < 0.04 for t in tables)
    for cfg, kw in ((config, {}), (from_file, {"from_config": True})):
        wide = build_transformer(cfg, stock_dit=True, class_embed_init_std=1.0, **kw)
        assert all(
            0.5 < b.norm1.emb.class_embedder.embedding_table.weight.std() < 1.5 for b in wide.transformer_blocks
        )
        assert wide.proj_out_2.weight.abs().sum() == 0
    paper = build_transformer(config, class_embed_init_std=1.0)
    assert paper.config.class_embed_init_std == 1.0
    paper.save_config(tmp_path / "paper")
    read = transformer_config([4, 8, 8], 3, config_path=str(tmp_path / "paper"))
    assert build_transformer(read, from_config=True).config.class_embed_init_std == 1.0
    assert build_transformer(read, from_config=True, class_embed_init_std=0.5).config.class_embed_init_std == 0.5
    with pytest.raises(ValueError, match="--stock_dit trains diffusers' DiTTransformer2DModel, but the config names"):
        build_transformer(read, from_config=True, stock_dit=True)
