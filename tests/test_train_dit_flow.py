"""train_scripts/train_dit_flow.py end to end: extract latents, train a tiny DiT, save, load, sample (CPU, offline)."""

import json
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from diffusability_hf.pipelines import DiTFlowMatchPipeline

FAST = ["--model", "DiT-tiny/2", "--train_batch_size", 8, "--report_to", "none", "--num_inference_steps", 4,
        "--validation_steps", 3, "--lr_warmup_steps", 2, "--learning_rate", 1e-3]  # fmt: skip


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """56 crops of the embedded photographs (7 classes), encoded by the embedded autoencoder, with flips."""
    import os

    out = tmp_path_factory.mktemp("latents")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "train_scripts", "extract_latents.py"), "--output_dir", str(out)]
    cmd += ["--max_samples", "56", "--flip", "--shard_size", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(out)


def train(run_script, latents, out, *extra, check=True):
    return run_script("train_dit_flow.py", ["--latents_dir", latents, "--output_dir", out, *FAST, *extra], check=check)


def test_train_save_and_sample_through_both_loaders(tmp_path, latents, run_script):
    out = tmp_path / "dit"
    train(run_script, latents, out, "--max_train_steps", 6, "--guidance_scale", 2.0)
    for name in ("model_index.json", "pipeline.py", "README.md", "samples.png"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "{{" not in card
    assert "DiT-tiny/2" in card and "trust_remote_code=True" in card
    meta = ModelCard(card).data.to_dict()  # the Hub's own parser
    assert meta["library_name"] == "diffusers" and {"diffusability", "scale-equivariance"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0" and "base_model" not in meta  # the toolkit's embedded AE

    # The toolkit's class, and the remote-code layout in an interpreter that never imports the toolkit
    pipe = DiTFlowMatchPipeline.from_pretrained(out)
    ours = pipe(["astronaut", 1], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np")
    assert ours.images.shape == (2, 64, 64, 3) and 0 <= ours.images.min() and ours.images.max() <= 1
    code = (
        "import sys, torch, numpy; from diffusers import DiffusionPipeline; "
        f"p = DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True); "
        "x = p(['astronaut', 1], num_inference_steps=4, generator=torch.Generator().manual_seed(0), "
        "output_type='np').images; numpy.save(sys.argv[1], x); "
        "assert not any(m.startswith('diffusability_hf') for m in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "remote.npy")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import numpy as np

    np.testing.assert_allclose(np.load(tmp_path / "remote.npy"), ours.images, atol=1e-6)

    # The saved pipeline carries the extraction statistics and class names
    import os

    meta = json.loads(open(os.path.join(latents, "metadata.json")).read())
    assert pipe.config.id2label == meta["id2label"] and pipe.config.latents_mean == meta["latents_mean"]


def test_resume_matches_straight_run(tmp_path, latents, run_script):
    import shutil

    # The learning-rate schedule depends on --max_train_steps, so the interrupted run is the straight run's
    # checkpoint-2 resumed with the same settings
    common = ["--checkpointing_steps", 2, "--ema_halflife_steps", 3, "--max_train_steps", 4]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(run_script, latents, straight, *common)
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train(run_script, latents, resumed, *common, "--resume_from_checkpoint", "latest")
    a = load_file(straight / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_self_conditioning_and_rope_train_and_load(tmp_path, latents, run_script):
    out = tmp_path / "sc"
    train(run_script, latents, out, "--max_train_steps", 3, "--self_conditioning_prob", 0.9, "--pos_embed", "rope")
    index = json.loads((out / "model_index.json").read_text())
    assert index["transformer"] == ["selfcond_dit", "SelfConditionedDiT"]
    assert (out / "transformer" / "selfcond_dit.py").is_file()
    pipe = DiTFlowMatchPipeline.from_pretrained(out)
    assert pipe.transformer.config.self_conditioning and pipe.transformer.config.pos_embed == "rope"
    images = pipe([0, 6], num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 64, 64, 3) and np_finite(images)


def np_finite(x):
    import numpy as np

    return bool(np.isfinite(x).all())


def test_bad_input_fails_before_training(tmp_path, latents, tiny_vae_dir, run_script):
    # A patch size that does not divide the 8x8 latent... DiT patches are 1, 2 or 4, so use a 3-patch config
    proc = train(run_script, latents, tmp_path / "a", "--model", "DiT-tiny/3", "--max_train_steps", 2, check=False)
    assert proc.returncode != 0 and "patch" in proc.stderr
    # Latents of another autoencoder than the one given
    proc = train(run_script, latents, tmp_path / "b", "--pretrained_vae_model_name_or_path", tiny_vae_dir, check=False)
    assert proc.returncode != 0 and "holds latents of another autoencoder" in proc.stderr
    proc = run_script("train_dit_flow.py", ["--output_dir", tmp_path / "c"], check=False)
    assert proc.returncode != 0 and "extract_latents.py" in proc.stderr
    # Offline push: refused before training, with what to do
    proc = train(run_script, latents, tmp_path / "d", "--push_to_hub", "--hub_model_id", "me/dit", check=False)
    assert proc.returncode != 0 and "HF_HUB_OFFLINE=1" in proc.stderr
    for out in ("a", "b", "c", "d"):
        assert not (tmp_path / out / "model_index.json").exists()


def test_on_the_fly_encoding_from_an_image_folder(tmp_path, tiny_vae_dir, run_script):
    from PIL import Image

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
    assert "Latent statistics estimated on 13 images" in proc.stdout + proc.stderr
    pipe = DiTFlowMatchPipeline.from_pretrained(out)
    assert pipe.config.id2label == {"0": "cats", "1": "dogs"} and len(pipe.config.latents_std) == 4
    images = pipe(["dogs"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 16, 16)


def test_bf16_autocast_keeps_fp32_weights_and_finite_loss(tmp_path, latents, run_script):
    out = tmp_path / "bf16"
    proc = train(run_script, latents, out, "--max_train_steps", 2, "--mixed_precision", "bf16")
    assert "loss=" in proc.stderr and "loss=nan" not in proc.stderr  # tqdm postfix of every step
    weights = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
