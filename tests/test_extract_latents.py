"""train_scripts/extract_latents.py end to end on a tiny autoencoder (CPU, offline)."""

import json
import os
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

from diffusability_hf.data import open_and_crop


def make_classes(root, per_class=3, size=24):
    """An image folder with two class subfolders of random images, plus one corrupt file."""
    gen = torch.Generator().manual_seed(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            arr = (torch.rand(size, size + 4, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(root / name / f"{i}.png")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")


def extract(run_script, vae_dir, data, out, *extra, **kw):
    args = ["--pretrained_model_name_or_path", vae_dir, "--train_data_dir", data, "--resolution", 16]
    return run_script("extract_latents.py", [*args, "--output_dir", out, "--batch_size", 2, *extra], **kw)


def test_extract_writes_shards_labels_and_statistics(tmp_path, tiny_vae_dir, run_script):
    make_classes(tmp_path / "data")
    out = tmp_path / "latents"
    extract(run_script, tiny_vae_dir, tmp_path / "data", out, "--shard_size", 4, "--flip")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["id2label"] == {"0": "cats", "1": "dogs"} and meta["num_classes"] == 2
    assert meta["num_samples"] == 6 and meta["skipped_images"] == 1
    assert meta["latent_shape"] == [4, 4, 4] and meta["shards"] == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
    ]

    shards = [load_file(out / s) for s in meta["shards"]]
    mean = torch.cat([s["mean"] for s in shards]).double()
    labels = torch.cat([s["labels"] for s in shards])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # Per-channel statistics of the stored posterior means
    torch.testing.assert_close(torch.tensor(meta["latents_mean"]), mean.mean((0, 2, 3)).float(), rtol=1e-4, atol=1e-5)
    std = mean.transpose(0, 1).flatten(1).std(1, unbiased=False).float()
    torch.testing.assert_close(torch.tensor(meta["latents_std"]), std, rtol=1e-4, atol=1e-5)

    # The stored mean/std are the AE's posterior of the centre crop (and of its mirror image)
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "data"), split="train")
    ds = ds.cast_column("image", datasets.Image(decode=False))
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    first = shards[0]
    index = int(first["indices"][0])
    x = open_and_crop(ds[index]["image"], 16)[None]
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        flipped = vae.encode(x.flip(-1)).latent_dist
    torch.testing.assert_close(first["mean"][0], post.mean[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first["std"][0], post.std[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first["mean_flip"][0], flipped.mean[0], rtol=1e-4, atol=1e-5)


def test_extract_resumes_only_missing_shards_and_refuses_another_autoencoder(tmp_path, tiny_vae_dir, run_script):
    make_classes(tmp_path / "data", per_class=4)
    out = tmp_path / "latents"
    extract(run_script, tiny_vae_dir, tmp_path / "data", out, "--shard_size", 3)
    names = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert len(names) == 3
    before = {n: (out / n).read_bytes() for n in names}
    stamps = {n: os.stat(out / n).st_mtime_ns for n in names}
    (out / names[1]).unlink()  # as if the run had been killed before this shard
    proc = extract(run_script, tiny_vae_dir, tmp_path / "data", out, "--shard_size", 3)
    assert "2 already written, 1 for this process" in proc.stdout + proc.stderr
    assert {n: (out / n).read_bytes() for n in names} == before  # the same content, rewritten
    assert os.stat(out / names[0]).st_mtime_ns == stamps[names[0]]  # untouched

    other = tmp_path / "other_vae"
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    AutoencoderKL.from_config({**vae.config, "latent_channels": 8}).save_pretrained(other)
    proc = extract(run_script, str(other), tmp_path / "data", out, check=False)
    assert proc.returncode != 0 and "holds latents of another autoencoder" in proc.stderr


def test_extract_two_processes_write_disjoint_shards(tmp_path, tiny_vae_dir, run_script):
    make_classes(tmp_path / "data", per_class=4)
    out = tmp_path / "latents"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523"]
    extract(
        run_script, tiny_vae_dir, tmp_path / "data", out, "--shard_size", 2,
        launcher=torchrun, extra_env={"ACCELERATE_USE_CPU": "1"},
    )  # fmt: skip
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["num_samples"] == 8 and len(meta["shards"]) == 5  # 9 files (one corrupt) in shards of 2
    indices = torch.cat([load_file(out / s)["indices"] for s in meta["shards"]])
    assert sorted(indices.tolist()) == sorted(set(indices.tolist())) and len(indices) == 8


def test_extract_embedded_default_and_bad_resolution(tmp_path, run_script):
    out = tmp_path / "latents"
    run_script("extract_latents.py", ["--output_dir", out, "--max_samples", 14, "--batch_size", 7])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["num_classes"] == 7 and meta["latent_shape"] == [16, 8, 8] and meta["num_samples"] == 14
    labels = load_file(out / "shard-00000.safetensors")["labels"]
    assert labels.tolist() == [i % 7 for i in range(14)]  # class = source photograph
    proc = run_script("extract_latents.py", ["--output_dir", tmp_path / "x", "--resolution", 60], check=False)
    assert proc.returncode != 0 and "not divisible by the AE's compression 8" in proc.stderr


@pytest.mark.parametrize("bad", [["--resolution", "0"], ["--dataset_name", "a", "--train_data_dir", "b"]])
def test_extract_bad_arguments(tmp_path, run_script, bad):
    proc = run_script("extract_latents.py", ["--output_dir", tmp_path / "x", *bad], check=False)
    assert proc.returncode != 0 and ("must be positive" in proc.stderr or "not both" in proc.stderr)
