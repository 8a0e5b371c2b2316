"""train_scripts/train_dit_flow.py end to end: extract latents, train a tiny DiT, save, load, sample (CPU, offline)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from diffusability_hf.autoencoders import EMBEDDED_AE, weights_fingerprint
from diffusability_hf.data.images import collate_labelled
from diffusability_hf.data.latents import read_latents_metadata
from diffusability_hf.errors import UsageError
from diffusability_hf.models.factory import build_transformer, transformer_config
from diffusability_hf.pipelines import DiTFlowMatchPipeline

from testing_utils import ROOT, load_script, run_in_process, run_script_in_process, transformer_weights

# The script itself, without `accelerate launch` (whose own traceback and exit code 1 follow)
PYTHON = [sys.executable]
FAST = ["--model", "DiT-tiny/2", "--train_batch_size", 8, "--report_to", "none", "--num_inference_steps", 4,
        "--validation_steps", 3, "--lr_warmup_steps", 2, "--learning_rate", 1e-3]  # fmt: skip


@pytest.fixture
def latents(tmp_path_factory, run_script):
    """56 crops of the embedded photographs (7 classes), encoded by the embedded autoencoder, with flips: extracted
    once per session (metadata.json is written last), then shared read-only (tests copy before they change it)."""
    out = tmp_path_factory.getbasetemp() / "dit_flow_latents"
    if not (out / "metadata.json").is_file():
        run_script("extract_latents.py", ["--output_dir", out, "--max_samples", 56, "--flip", "--shard_size", 32])
    return str(out)


def train(run_script, latents, out, *extra, check=True, launcher=None):
    args = ["--latents_dir", latents, "--output_dir", out, *FAST, *extra]
    return run_script("train_dit_flow.py", args, check=check, launcher=launcher)


def tree(folder):
    """Every file under ``folder`` -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(proc, *fragments):
    """A refusal: exit code 2, one ``error: ...`` line naming ``fragments``, no traceback, no training step."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "loss=" not in proc.stderr  # the progress bar never showed a training step
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_train_save_and_sample_through_both_loaders(tmp_path, latents, run_script):
    out = tmp_path / "dit"
    proc = train(run_script, latents, out, "--max_train_steps", 6, "--guidance_scale", 2.0, "--stock_dit")
    assert json.loads((out / "model_index.json").read_text())["transformer"] == ["diffusers", "DiTTransformer2DModel"]
    for name in ("model_index.json", "pipeline.py", "README.md", "samples.png"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "{{" not in card
    assert "DiT-tiny/2" in card and "trust_remote_code=True" in card
    meta = ModelCard(card).data.to_dict()  # the Hub's own parser
    assert meta["library_name"] == "diffusers" and {"diffusability", "scale-equivariance"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and "base_model" not in meta  # the toolkit's embedded AE
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())  # the atomic save left nothing behind
    assert f"Wrote to {out}: model_index.json, pipeline.py, transformer, vae, scheduler, README.md" in proc.stderr
    run = json.loads((out / "metrics.json").read_text())  # throughput, to compare with published figures
    assert run["train_steps"] == 6 and run["nonfinite_steps"] == 0 and run["global_batch"].startswith("8 latents")
    throughput = run["throughput"]
    assert throughput["samples_per_step"] == 8 and throughput["steps_measured"] == 5  # the first step is warm-up
    assert throughput["samples_per_second"] > 0 and 0 <= throughput["data_wait_fraction"] < 1

    # Provenance: the fingerprint of the weights that encoded the latents, and of the pipeline's own vae
    fingerprint = json.loads(open(os.path.join(latents, "metadata.json")).read())["ae_weights_fingerprint"]
    assert fingerprint == weights_fingerprint(AutoencoderKL.from_pretrained(EMBEDDED_AE))
    provenance = json.loads((out / "model_index.json").read_text())["provenance"]
    assert provenance["latents_ae_weights_fingerprint"] == provenance["vae_weights_fingerprint"] == fingerprint
    assert provenance["latents"] == os.path.abspath(latents) and f"`{fingerprint}`" in card

    # samples.png: one labelled row of two 64 px samples per class (7 classes), a label margin on the left
    grid = Image.open(out / "samples.png")
    assert grid.height == 7 * (64 + 2) and grid.width > 2 * (64 + 2)

    # The toolkit's class, and the remote-code layout in an interpreter that never imports the toolkit
    pipe = DiTFlowMatchPipeline.from_pretrained(out)
    assert weights_fingerprint(pipe.vae) == fingerprint and pipe.config.provenance == provenance
    ours = pipe(["astronaut", 1], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert ours.images.shape == (2, 64, 64, 3) and 0 <= ours.images.min() and ours.images.max() <= 1
    code = (
        "import sys, torch, numpy; from diffusers import DiffusionPipeline; "
        f"p = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True); "
        "x = p(['astronaut', 1], num_inference_steps=4, generator=torch.Generator().manual_seed(0), "
        "output_type='np').images; numpy.save(sys.argv[1], x); "
        "assert not any(m.startswith('diffusability_hf') for m in sys.modules); "
        "assert p.config.provenance['vae_weights_fingerprint'] == sys.argv[2]"
    )
    remote = [sys.executable, "-c", code, str(tmp_path / "remote.npy"), fingerprint]
    proc = subprocess.run(remote, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import numpy as np

    np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), ours.images, atol=1e-6)

    # The saved pipeline carries the extraction statistics and class names
    meta = json.loads(open(os.path.join(latents, "metadata.json")).read())
    assert pipe.config.id2label == meta["id2label"] and pipe.config.latents_mean == meta["latents_mean"]

    # A second run into the finished folder is refused before any work; the first pipeline stays as it was
    before = tree(out)
    # (as its own process: the command's exit-code contract; the other refusals here run in-process)
    proc = train(run_script, latents, out, "--max_train_steps", 2, check=False, launcher=PYTHON)
    assert_one_error_line(
        proc, "already holds the results of another run", "model_index.json", "--overwrite_output_dir"
    )
    assert tree(out) == before


def test_resume_skips_an_incomplete_checkpoint_and_matches_the_straight_run(tmp_path, latents, run_script):
    # The learning-rate schedule depends on --max_train_steps, so the interrupted run is the straight run's
    # checkpoints resumed with the same settings
    common = ["--checkpointing_steps", 1, "--ema_halflife_steps", 3, "--max_train_steps", 4]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(run_script, latents, straight, *common)
    # Checkpoints are complete (marker file) and rotated to the default --checkpoints_total_limit of 3
    names = sorted(p.name for p in straight.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert all((straight / n / "training_state.json").is_file() for n in names)

    # A newest checkpoint without its marker (a save killed before it completed): `latest` skips it with a warning
    resumed.mkdir()
    for name in ("checkpoint-3", "checkpoint-4"):
        shutil.copytree(straight / name, resumed / name)
    (resumed / "checkpoint-4" / "training_state.json").unlink()
    (resumed / ".tmp-checkpoint-5").mkdir()  # and the temporary folder of a save killed midway (as kill -9 leaves)
    (resumed / ".tmp-checkpoint-5" / "custom_checkpoint_0.pkl").write_bytes(b"")
    proc = train(run_script, latents, resumed, *common, "--resume_from_checkpoint", "latest")
    assert f"Skipping {resumed / 'checkpoint-4'}: it is incomplete" in proc.stderr
    assert f"Resuming from {resumed / 'checkpoint-3'}" in proc.stderr
    assert not (resumed / ".tmp-checkpoint-5").exists()  # removed, so that it is never uploaded or mistaken
    a = load_file(straight / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)

    # Resumed from the last step's checkpoint (a run killed during its final save, or a finished one): nothing is
    # trained, and the final pipeline is the straight run's, bit for bit
    finished = tmp_path / "finished"
    finished.mkdir()
    shutil.copytree(straight / "checkpoint-4", finished / "checkpoint-4")
    proc = train(run_script, latents, finished, *common, "--resume_from_checkpoint", "latest")
    assert "is at step 4 of 4: nothing left to train" in proc.stderr
    assert json.loads((finished / "metrics.json").read_text())["train_steps"] == 4
    c = load_file(finished / "transformer" / "diffusion_pytorch_model.safetensors")
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)

    # A damaged checkpoint named explicitly (a truncated weights file): one clear line, no training
    damaged = tmp_path / "damaged" / "checkpoint-2"
    shutil.copytree(straight / "checkpoint-2", damaged)
    (damaged / "model.safetensors").write_bytes((damaged / "model.safetensors").read_bytes()[:100])
    proc = train(run_script, latents, tmp_path / "damaged", *common, "--resume_from_checkpoint", damaged, check=False)
    assert_one_error_line(proc, f"Checkpoint {damaged} is damaged", "--resume_from_checkpoint latest")
    assert not (tmp_path / "damaged" / "model_index.json").exists()


def test_the_papers_dit_is_the_default_and_trains_and_loads(tmp_path, latents, run_script):
    # App. B's DiT (RoPE, self-conditioning at 90%) with no architecture flag. Into the folder of an earlier run, replaced with --overwrite_output_dir: its checkpoints are deleted first
    out = tmp_path / "sc"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "training_state.json").write_text('{"step": 7}')
    (out / "model_index.json").write_text("{}")
    args = ["--max_train_steps", 3, "--overwrite_output_dir"]
    proc = train(run_script, latents, out, *args)
    assert "Removed checkpoint-7 of the earlier run" in proc.stderr and not (out / "checkpoint-7").exists()
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["selfcond_dit", "SelfConditionedDiT"]
    assert (out / "transformer" / "selfcond_dit.py").is_file()
    pipe = DiTFlowMatchPipeline.from_pretrained(out)
    assert pipe.transformer.config.self_conditioning and pipe.transformer.config.pos_embed == "rope"
    assert "`self_conditioning_prob` | `0.9`" in (out / "README.md").read_text()
    images = pipe([0, 6], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 64, 64, 3) and np_finite(images)


def np_finite(x):
    import numpy as np

    return bool(np.isfinite(x).all())


def test_bad_input_fails_before_training(tmp_path, latents, tiny_vae_dir, run_script, capsys):
    # Latents of the embedded AE with an AE of the same config and other weights (as its SE fine-tune would be)
    other = tmp_path / "other_vae"
    vae = AutoencoderKL.from_pretrained(EMBEDDED_AE)
    fingerprint = weights_fingerprint(vae)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)
    vae.save_pretrained(other)
    proc = train(
        run_script, latents, tmp_path / "e", "--pretrained_vae_model_name_or_path", other, "--max_train_steps", 2,
        check=False,
    )  # fmt: skip
    line = assert_one_error_line(proc, "holds latents of other autoencoder weights", str(other))
    assert fingerprint in line and weights_fingerprint(vae) in line
    assert not (tmp_path / "e").exists()
    # In process (the same checks, without three more interpreters): a patch size that does not divide the 8x8
    # latent (DiT patches are 1, 2 or 4, so a 3-patch config), another autoencoder config, no data at all
    script = load_script("train_dit_flow")
    for out, extra, match in [
        ("a", ["--model", "DiT-tiny/3"], "Unknown DiT name 'DiT-tiny/3'"),
        ("b", ["--pretrained_vae_model_name_or_path", tiny_vae_dir], "another autoencoder .*16 channels.*4 channels"),
        (
            "f",
            ["--train_batch_size", "64"],
            "holds 56 latents, fewer than one batch .*--train_batch_size to at most 56",
        ),
    ]:
        args = script.parse_args(["--latents_dir", latents, "--output_dir", str(tmp_path / out), *map(str, extra)])
        with pytest.raises(ValueError, match=match):
            script.main(args)
    with pytest.raises(SystemExit):
        script.parse_args(["--output_dir", str(tmp_path / "c")])
    assert "extract_latents.py" in capsys.readouterr().err
    # Offline push: refused before training, with what to do
    code, stderr = run_in_process(
        "train_dit_flow.py",
        ["--latents_dir", latents, "--output_dir", tmp_path / "d", *FAST, "--push_to_hub", "--hub_model_id", "me/dit"],
    )
    assert code == 2 and "HF_HUB_OFFLINE=1" in stderr
    for out in ("a", "b", "c", "d", "e", "f"):
        assert not (tmp_path / out / "model_index.json").exists()


def test_checks_without_training(tmp_path, latents, capsys):
    """Cheap refusals, in process: flags, latents of an older version, shards of other weights."""
    script = load_script("train_dit_flow")
    args = script.parse_args(["--latents_dir", latents])
    assert args.checkpoints_total_limit == 3 and args.overwrite_output_dir is False
    # The paper's DiT by default (App. B), the stock diffusers one a flag away; flags of the one for the other refused
    assert (args.pos_embed, args.self_conditioning_prob, args.stock_dit) == ("rope", 0.9, False)
    stock = script.parse_args(["--latents_dir", latents, "--stock_dit"])
    assert (stock.pos_embed, stock.self_conditioning_prob) == ("sincos", 0.0)
    config = transformer_config([16, 8, 8], 7, args.model)
    model = build_transformer(config, pos_embed=args.pos_embed, self_conditioning=args.self_conditioning_prob > 0)
    assert type(model).__name__ == "SelfConditionedDiT" and model.config.self_conditioning
    assert type(build_transformer(config, stock_dit=True)).__name__ == "DiTTransformer2DModel"
    # Explicit flag > the embedded demo's preset > the argparse default (App. B's), all three shown by --help
    assert (args.max_train_steps, args.lr_warmup_steps, args.validation_steps, args.checkpointing_steps) == (
        500, 50, 250, 500
    )  # fmt: skip
    explicit = script.parse_args(["--latents_dir", latents, "--max_train_steps", "7"])
    assert (explicit.max_train_steps, explicit.lr_warmup_steps) == (7, 50)
    other = script.parse_args(["--latents_dir", latents, "--pretrained_vae_model_name_or_path", "x"])
    assert (other.max_train_steps, other.lr_warmup_steps, other.train_batch_size) == (400_000, 10_000, 32)
    with pytest.raises(SystemExit):
        script.parse_args(
            ["--latents_dir", latents, "--stock_dit", "--pos_embed", "sincos", "--self_conditioning_prob", "0.5"]
        )
    assert "drop --self_conditioning_prob, or drop --stock_dit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "Keep this many newest complete checkpoints (default: 3)" in shown
    assert "(default: 400000; the embedded demo: 500)" in shown and "(default: 10000; the embedded demo: 50)" in shown
    assert "dataloader_num_workers" not in shown
    with pytest.raises(SystemExit):
        script.parse_args(["--latents_dir", latents, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"])
    assert "give one of them" in capsys.readouterr().err

    old = tmp_path / "old"
    shutil.copytree(latents, old)
    meta = json.loads((old / "metadata.json").read_text())
    fingerprint = meta.pop("ae_weights_fingerprint")
    (old / "metadata.json").write_text(json.dumps({**meta, "ae_fingerprint": "0123456789abcdef"}))
    with pytest.raises(UsageError, match="older version of extract_latents.py .*extract them again"):
        read_latents_metadata(str(old))
    # metadata.json of one AE, a shard of another (copied in by hand)
    (old / "metadata.json").write_text(json.dumps({**meta, "ae_weights_fingerprint": fingerprint[::-1]}))
    with pytest.raises(
        UsageError, match=f"shard-00000.safetensors was encoded by other autoencoder weights \\({fingerprint}\\)"
    ):
        read_latents_metadata(str(old))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        read_latents_metadata(str(tmp_path / "missing"))


def test_on_the_fly_encoding_from_an_image_folder(tmp_path, tiny_vae_dir, run_script):
    gen = torch.Generator().manual_seed(0)
    for name in ("cats", "dogs"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(6):
            arr = (torch.rand(20, 24, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / "data" / name / f"{i}.png")
    (tmp_path / "data" / "dogs" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "dit"
    args = ["--train_data_dir", tmp_path / "data", "--pretrained_vae_model_name_or_path", tiny_vae_dir]
    args += ["--resolution", 16, "--random_flip", "--stats_batches", 2, "--max_train_steps", 3, "--output_dir", out]
    proc = run_script("train_dit_flow.py", [*args, *FAST])
    assert "Latent statistics (of posterior samples) estimated on 13 images" in proc.stdout + proc.stderr
    pipe = DiTFlowMatchPipeline.from_pretrained(out)
    assert pipe.config.id2label == {"0": "cats", "1": "dogs"} and len(pipe.config.latents_std) == 4
    fingerprint = weights_fingerprint(AutoencoderKL.from_pretrained(tiny_vae_dir))
    provenance = pipe.config.provenance
    assert provenance["latents_ae_weights_fingerprint"] == provenance["vae_weights_fingerprint"] == fingerprint
    assert provenance["latents"].startswith("encoded on the fly")
    images = pipe(["dogs"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 16, 16)


def test_bf16_autocast_keeps_fp32_weights_and_finite_loss(tmp_path, latents, run_script):
    out = tmp_path / "bf16"
    proc = train(run_script, latents, out, "--max_train_steps", 2, "--mixed_precision", "bf16")
    assert "loss=" in proc.stderr and "loss=nan" not in proc.stderr  # tqdm postfix of every step
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


def test_on_the_fly_statistics_are_those_of_posterior_samples(tiny_vae_dir):
    """latents.estimate_latent_statistics (the script's on-the-fly statistics): per-channel mean/std of
    z = mean + std * eps (what the DiT sees), against numpy draws."""
    import numpy as np

    from diffusability_hf.data.latents import estimate_latent_statistics

    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    gen = torch.Generator().manual_seed(3)
    items = [(torch.rand(3, 16, 16, generator=gen) * 2 - 1, i % 2, None, True) for i in range(6)]
    mean, std = estimate_latent_statistics(vae, items, 6, 3, 0, "cpu", collate_labelled)
    with torch.no_grad():
        post = vae.encode(torch.stack([it[0] for it in items])).latent_dist
    mu, sd = post.mean.double().numpy(), post.std.double().numpy()  # (6, C, h, w)
    draws = mu[None] + sd[None] * np.random.default_rng(0).standard_normal((4000, *mu.shape))
    flat = draws.transpose(2, 0, 1, 3, 4).reshape(mu.shape[1], -1)  # (C, draws * 6 * h * w)
    np.testing.assert_allclose(mean, flat.mean(1), rtol=0, atol=3e-3 * flat.std(1).max())
    np.testing.assert_allclose(std, flat.std(1), rtol=3e-3)
    assert np.all(np.array(std) > mu.transpose(1, 0, 2, 3).reshape(mu.shape[1], -1).std(1))  # not the means' std


def test_pipeline_snapshots_hold_the_ema_weights_of_their_step(tmp_path, latents, run_script):
    from diffusers import DiffusionPipeline

    # Steps inside a long warmup (lr = step / warmup, whatever --max_train_steps) and a short EMA half-life without
    # ramp (the EMA far from the raw weights): a 2-step run's final pipeline is what a 4-step run has at step 2
    common = ["--ema_halflife_steps", 3, "--ema_rampup_ratio", 0, "--lr_warmup_steps", 100, "--checkpointing_steps", 2]
    full, short, resumed = tmp_path / "full", tmp_path / "short", tmp_path / "resumed"
    proc = train(run_script, latents, full, *common, "--max_train_steps", 4, "--pipeline_snapshot_steps", 1)
    snapshots = full / "snapshots"
    assert sorted(os.listdir(snapshots)) == ["step-1", "step-2", "step-3"]  # not the last step: the main save
    assert f"Saved the EMA pipeline at step 2 to {snapshots / 'step-2'}" in proc.stderr
    assert "README.md, samples.png, metrics.json, checkpoint-4, snapshots" in proc.stderr
    final = json.loads((full / "model_index.json").read_text())
    index = json.loads((snapshots / "step-2" / "model_index.json").read_text())
    assert final["provenance"]["step"] == 4 and index["provenance"] == {**final["provenance"], "step": 2}
    assert index["_class_name"] == final["_class_name"] and index["transformer"] == final["transformer"]
    for name in ("model_index.json", "pipeline.py", "transformer/selfcond_dit.py", "vae", "scheduler"):
        assert (snapshots / "step-2" / name).exists(), name
    assert not (snapshots / "step-2" / "samples.png").exists()

    # The EMA of checkpoint-2 (the same step), not its raw weights
    snap = transformer_weights(snapshots / "step-2")
    raw = load_file(full / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(snap[k], raw[f"transformer.{k}"]) for k in snap)
    pipe = DiTFlowMatchPipeline.from_pretrained(snapshots / "step-2")
    ema = load_file(full / "checkpoint-2" / "ema.safetensors")  # the EMA is saved without pickle
    shadow = [ema[f"shadow.{i}"] for i in range(len(ema))]
    for (key, param), ema in zip(pipe.transformer.named_parameters(), shadow, strict=True):
        torch.testing.assert_close(param.detach(), ema, rtol=0, atol=0, msg=key)
    assert pipe.config.provenance["step"] == 2
    images = pipe([0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np_finite(images)
    remote = DiffusionPipeline.from_pretrained(snapshots / "step-1", trust_remote_code=True)
    assert remote.config.provenance["step"] == 1 and type(remote).__name__ == "DiTFlowMatchPipeline"

    # A 2-step run's final pipeline: the weights of the 4-step run's snapshot at step 2. Into the folder of an
    # earlier run, replaced with --overwrite_output_dir: its snapshots are deleted at the start
    (short / "snapshots" / "step-9").mkdir(parents=True)
    (short / "model_index.json").write_text("{}")
    proc = train(run_script, latents, short, *common, "--max_train_steps", 2, "--overwrite_output_dir")
    assert "Removed snapshots of the earlier run (--overwrite_output_dir)" in proc.stderr
    assert not (short / "snapshots").exists()  # none asked for this time
    assert json.loads((short / "model_index.json").read_text())["provenance"]["step"] == 2
    ref = transformer_weights(short)
    assert snap.keys() == ref.keys()
    for key in snap:
        torch.testing.assert_close(snap[key], ref[key], rtol=0, atol=0, msg=key)

    # Resumed from checkpoint-2: existing snapshots are kept, the one of a step trained again is replaced (here a
    # stale copy of another step's), the leftover of a killed snapshot save is removed
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    shutil.copytree(snapshots / "step-1", resumed / "snapshots" / "step-1")
    (resumed / "snapshots" / "step-1" / "kept.txt").write_text("kept")
    shutil.copytree(snapshots / "step-1", resumed / "snapshots" / "step-3")
    (resumed / "snapshots" / ".tmp-save-x" / "step-3").mkdir(parents=True)
    args = [*common, "--max_train_steps", 4, "--pipeline_snapshot_steps", 1, "--resume_from_checkpoint", "latest"]
    proc = train(run_script, latents, resumed, *args)
    assert "Removed snapshots/.tmp-save-x, left by a save that was interrupted" in proc.stderr
    assert sorted(os.listdir(resumed / "snapshots")) == ["step-1", "step-3"]
    assert (resumed / "snapshots" / "step-1" / "kept.txt").is_file()
    a, b = transformer_weights(snapshots / "step-3"), transformer_weights(resumed / "snapshots" / "step-3")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert json.loads((resumed / "snapshots" / "step-3" / "model_index.json").read_text())["provenance"]["step"] == 3


def test_pipeline_snapshot_flag_checks(tmp_path, latents, capsys):
    script = load_script("train_dit_flow")
    assert script.parse_args(["--latents_dir", latents]).pipeline_snapshot_steps is None  # off by default
    for bad in ("0", "-5"):
        with pytest.raises(SystemExit):
            script.parse_args(["--latents_dir", latents, "--pipeline_snapshot_steps", bad])
        assert "--pipeline_snapshot_steps must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    assert "FD versus training steps" in " ".join(capsys.readouterr().out.split())
    # Snapshots alone (a run killed before its first checkpoint) belong to a run: refused, or resumed into not at all
    out = tmp_path / "dit"
    (out / "snapshots" / "step-5").mkdir(parents=True)
    with pytest.raises(UsageError, match="already holds the results of another run \\(snapshots\\)"):
        script.main(script.parse_args(["--latents_dir", latents, "--output_dir", str(out)]))
    args = script.parse_args(
        ["--latents_dir", latents, "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    )
    with pytest.raises(UsageError, match="would replace the earlier run's snapshots there"):
        script.main(args)
    assert os.listdir(out) == ["snapshots"]


def test_the_loss_the_script_trains_with_is_the_library_objective(tmp_path, latents, run_script):
    """Step 1's logged training loss equals diffusability_hf.flow.FlowMatchingLoss evaluated here on the same batch
    (the seedable sampler's first batch of --seed, with its flips), the same initial weights (--seed) and the same
    step generator (training.steps.step_generator): the objective the script runs is the library's, which
    test_flow.py checks against the formula. A stock DiT config (no self-conditioning) gets DiT's init like a preset:
    adaLN-Zero outputs 0 at step 1, so step 1's loss is that of the targets alone (the label dropout and the noise
    levels it draws are checked in test_flow.py); it still depends on every noise the step generator draws."""
    from accelerate.utils import set_seed
    from diffusers import DiTTransformer2DModel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffusability_hf.data.latents import LatentShards
    from diffusability_hf.flow import FlowMatchingLoss
    from diffusability_hf.models.dit import dit_config
    from diffusability_hf.training.steps import step_generator

    DiTTransformer2DModel(**dit_config("DiT-tiny/2", 16, 8, 7)).save_config(tmp_path / "config")
    out = tmp_path / "dit"
    extra = ["--model_config_name_or_path", tmp_path / "config", "--max_train_steps", 1, "--report_to", "tensorboard"]
    extra += ["--seed", 3, "--class_dropout_prob", 0.5, "--logit_mean", 0.5]
    proc = train(run_script, latents, out, *extra)
    assert "has no self-conditioning: training without it" in proc.stderr
    events = EventAccumulator(str(out / "logs" / "train_dit_flow")).Reload()
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1]
    for tag in ("train/samples_per_second", "train/step_time_s", "train/data_wait_s", "train/peak_memory_gb"):
        assert events.Scalars(tag)[0].value > 0 or tag == "train/data_wait_s", tag

    script = load_script("train_dit_flow")
    args = script.parse_args(["--latents_dir", latents, *map(str, FAST), *map(str, extra)])
    meta = read_latents_metadata(latents)
    shards = LatentShards(latents, meta, seed=3)
    order = torch.randperm(len(shards), generator=torch.Generator().manual_seed(3))  # the sampler's epoch 0
    batch = torch.utils.data.default_collate([shards[i] for i in order[: args.train_batch_size].tolist()])
    set_seed(3)
    config = transformer_config(meta["latent_shape"], meta["num_classes"], config_path=str(tmp_path / "config"))
    transformer = build_transformer(config, from_config=True)
    mean, std = (torch.tensor(meta[k]).view(1, -1, 1, 1) for k in ("latents_mean", "latents_std"))

    def step_1_loss(**settings):
        gen = step_generator("cpu", 3, 0, 0, 0)  # --seed, step 0, process 0, micro-batch 0
        eps = torch.randn(batch["mean"].shape, generator=gen)
        x0 = (batch["mean"] + batch["std"] * eps - mean) / std  # the posterior sample, normalised
        objective = FlowMatchingLoss(transformer, meta["num_classes"], **settings)
        with torch.no_grad():
            return objective(x0, batch["label"], gen).mean().item()

    loss = step_1_loss(class_dropout_prob=0.5, logit_mean=0.5, self_conditioning_prob=0.0)
    assert logged[0].value == pytest.approx(loss, rel=1e-6, abs=0)
    assert transformer.proj_out_2.weight.abs().sum() == 0  # DiT's init, as the script built it from the config file
    # The comparison sees the noise: another step generator's draws give another loss
    other = step_generator("cpu", 4, 0, 0, 0)
    x0 = (batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=other) - mean) / std
    with torch.no_grad():
        elsewhere = FlowMatchingLoss(transformer, meta["num_classes"], class_dropout_prob=0.5)(
            x0, batch["label"], other
        )
    assert logged[0].value != pytest.approx(elsewhere.mean().item(), rel=1e-4)


@pytest.fixture(scope="module")
def video_latents(tmp_path_factory):
    """A random-init tiny CogVideoX-class AE and its latents of 16 embedded camera pans (9 frames, 32 px: latents
    (4, 3, 4, 4), 8 classes), extracted once for this module."""
    from diffusability_hf import autoencoders as ae

    root = tmp_path_factory.mktemp("video_dit")
    torch.manual_seed(0)
    config = ae.read_config(os.path.join(ROOT, "diffusability_hf", "assets", "tiny_configs", "cogvideox.json"))
    ae.load_autoencoder(config, None).save_pretrained(root / "vae")
    args = ["--pretrained_model_name_or_path", root / "vae", "--output_dir", root / "latents", "--resolution", 32,
            "--max_samples", 16, "--batch_size", 4]  # fmt: skip
    proc = run_script_in_process("extract_latents.py", args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(root / "vae"), str(root / "latents")


def test_video_latents_train_the_video_dit_save_a_video_pipeline_and_resume(tmp_path, video_latents, run_script):
    """Video latents train SelfConditionedVideoDiT and save a DiTFlowMatchVideoPipeline that a fresh interpreter
    loads with trust_remote_code (frames out); 2 + 2 resumed steps equal 4 straight ones; --stock_dit and another
    autoencoder are refused in one line before training."""
    from diffusers import DiffusionPipeline

    vae, latents = video_latents
    video = ["--pretrained_vae_model_name_or_path", vae, "--train_batch_size", 4, "--checkpointing_steps", 2]
    out, straight = tmp_path / "dit", tmp_path / "straight"
    train(run_script, latents, straight, *video, "--max_train_steps", 4)
    index = json.loads((straight / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "DiTFlowMatchVideoPipeline"]  # the remote-code layout
    assert index["transformer"][1] == "SelfConditionedVideoDiT" and (straight / "samples.png").is_file()
    card = (straight / "README.md").read_text()
    assert "SelfConditionedVideoDiT" in card and ').frames\nexport_to_gif(frames[0], "sample.gif")' in card
    pipe = DiffusionPipeline.from_pretrained(str(straight), trust_remote_code=True)
    assert type(pipe.transformer).__name__ == "SelfConditionedVideoDiT" and pipe.transformer.config.num_frames == 3
    frames = pipe([0, 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert frames.shape == (2, 9, 32, 32, 3) and 0 <= frames.min() and frames.max() <= 1
    train(run_script, latents, out, *video, "--max_train_steps", 2)
    train(run_script, latents, out, *video, "--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    a, b = transformer_weights(out), transformer_weights(straight)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    refused = tmp_path / "refused"
    assert_one_error_line(train(run_script, latents, refused, *video, "--stock_dit", check=False),
                          "holds video latents", "--stock_dit")  # fmt: skip
    other = ["--pretrained_vae_model_name_or_path", EMBEDDED_AE]
    assert_one_error_line(train(run_script, latents, refused, *other, check=False),
                          "holds latents of another autoencoder", "AutoencoderKLCogVideoX")  # fmt: skip
    assert not refused.exists()


def test_non_finite_losses_are_skipped_and_a_diverged_run_stops_with_a_checkpoint(tmp_path, latents, run_script):
    """A learning rate of 1e37 makes the first AdamW update blow the weights up: every later loss is not finite, so
    those steps make no optimizer or EMA update, and after --max_nonfinite_steps in a row the run stops in one error
    line that says what to try, with a complete checkpoint."""
    out = tmp_path / "dit"
    proc = train(run_script, latents, out, "--max_train_steps", 8, "--max_nonfinite_steps", 2, "--learning_rate",
                 1e37, "--max_grad_norm", 0, "--lr_warmup_steps", 0, check=False)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "not finite for 2 optimizer steps in a row (up to step 3; 2 skipped in all)" in lines[0]
    assert "lower --learning_rate" in lines[0] and "--resume_from_checkpoint latest" in lines[0]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert (out / "checkpoint-3" / "training_state.json").is_file()  # complete
    assert not (out / "model_index.json").exists()
    # The checkpoint holds the weights of the last finite loss (the initial ones: step 1 blew them up), not the
    # diverged ones, and an optimizer that never stepped
    weights = load_file(out / "checkpoint-3" / "model.safetensors")
    assert max(float(w.abs().max()) for w in weights.values()) < 10
    assert torch.load(out / "checkpoint-3" / "optimizer.bin", weights_only=True)["state"] == {}
    # Following the printed advice (a lower --learning_rate, then --resume_from_checkpoint latest) finishes finite
    proc = train(run_script, latents, out, "--max_train_steps", 8, "--max_nonfinite_steps", 2, "--learning_rate",
                 1e-3, "--max_grad_norm", 0, "--lr_warmup_steps", 0, "--resume_from_checkpoint", "latest")  # fmt: skip
    assert "--learning_rate 0.001 replaces the checkpoint's 1e+37" in proc.stderr
    final = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in final.values())
    assert json.loads((out / "metrics.json").read_text())["nonfinite_steps"] == 0  # none after the resume


def damaged_copy(latents, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(latents, folder)
    return folder


def test_damaged_latents_are_refused_in_one_line_before_training(tmp_path, latents):
    """What a damaged or edited latents folder gave (tracebacks, NaN rows skipped as non-finite steps, training on a
    shortened shard list, a zero std that failed only at the final save) is refused by the readers with one line."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from diffusability_hf.data.latents import LatentShards, read_latent_rows, read_latents_metadata
    from diffusability_hf.errors import UsageError

    meta = read_latents_metadata(latents)
    first = sorted(meta["shards"])[0]
    assert meta["shard_files"][first]["rows"] == 32 and len(meta["shard_files"][first]["sha256"]) == 64

    def refused(folder, match):
        with pytest.raises(UsageError, match=match) as err:
            m = read_latents_metadata(str(folder))
            LatentShards(str(folder), m)[0]
        assert "\n" not in str(err.value)

    bad = damaged_copy(latents, tmp_path, "json")
    (bad / "metadata.json").write_text((bad / "metadata.json").read_text()[:-20])
    refused(bad, r"metadata.json is damaged \(JSONDecodeError")

    bad = damaged_copy(latents, tmp_path, "truncated")
    data = (bad / first).read_bytes()
    (bad / first).write_bytes(data[: len(data) // 2])
    refused(bad, rf"{first} is damaged \(SafetensorError")

    bad = damaged_copy(latents, tmp_path, "header")
    data = bytearray((bad / first).read_bytes())
    data[10] = ord("}")  # a flipped byte in the JSON header
    (bad / first).write_bytes(bytes(data))
    refused(bad, rf"{first} is damaged")

    bad = damaged_copy(latents, tmp_path, "classes")
    edited = json.loads((bad / "metadata.json").read_text())
    edited["num_classes"] = 2
    (bad / "metadata.json").write_text(json.dumps(edited))
    refused(bad, r"row \d+, has class \d, outside the 2 classes")

    bad = damaged_copy(latents, tmp_path, "shortened")
    edited = json.loads((bad / "metadata.json").read_text())
    edited["shards"] = edited["shards"][:1]
    (bad / "metadata.json").write_text(json.dumps(edited))
    refused(bad, r"lists 1 shards but .* holds 1 more")

    bad = damaged_copy(latents, tmp_path, "zero_std")
    edited = json.loads((bad / "metadata.json").read_text())
    edited["latents_std"] = [0.0] * len(edited["latents_std"])
    (bad / "metadata.json").write_text(json.dumps(edited))
    refused(bad, r"latents_std must be finite and positive")

    bad = damaged_copy(latents, tmp_path, "nan")
    with safe_open(str(bad / first), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["mean"][5] = float("nan")
    save_file(tensors, str(bad / first), metadata=header)  # the same size: only the values changed
    m = read_latents_metadata(str(bad))
    shards = LatentShards(str(bad), m)
    shards[4]
    with pytest.raises(UsageError, match=rf"{first}, row 5, holds non-finite latents"):
        shards[5]
    with pytest.raises(UsageError, match=rf"{first}, row 5, holds non-finite latents"):
        read_latent_rows(str(bad), m, 16)


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, latents, run_script):
    """Two runs started at once into one --output_dir: the second is refused in one line (here the test holds the
    folder as a running first run would) and writes nothing there."""
    from diffusability_hf.files import lock_output_dir

    out = tmp_path / "busy"
    lock_output_dir(str(out))  # this process holds it: the run must be another process to be refused
    proc = train(run_script, latents, out, "--max_train_steps", 2, check=False, launcher=PYTHON)
    assert_one_error_line(proc, f"--output_dir {out} is in use by another run", "choose another --output_dir")
    assert os.listdir(out) == []


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_a_learning_rate_that_cannot_train_is_refused_by_the_parser(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_script("train_dit_flow").parse_args(["--latents_dir", str(tmp_path), "--learning_rate", value])
    assert exit_.value.code == 2 and "--learning_rate must be a positive number" in capsys.readouterr().err
