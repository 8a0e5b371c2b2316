"""train_scripts/extract_latents.py end to end on a tiny autoencoder (CPU, offline)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusability_hf.autoencoders import weights_fingerprint
from diffusability_hf.data.images import open_and_crop
from diffusability_hf.data.latents import check_existing_latents
from diffusability_hf.errors import UsageError

from testing_utils import ROOT, Forked, load_script, run_in_process

# The script itself, without `accelerate launch` (whose own traceback and exit code 1 follow)
PYTHON = [sys.executable]


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
    labels = torch.cat([s["labels"] for s in shards])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    # Per-channel statistics of what the DiT sees: posterior samples of the images and of their mirrors, in numpy
    # from the shards by drawing eps (the script computes the same moments in closed form)
    rng = np.random.default_rng(0)
    mu = np.concatenate([s[k].double().numpy() for s in shards for k in ("mean", "mean_flip")])  # (2N, C, h, w)
    sd = np.concatenate([s[k].double().numpy() for s in shards for k in ("std", "std_flip")])
    draws = mu[None] + sd[None] * rng.standard_normal((4000, *mu.shape))  # (S, 2N, C, h, w)
    flat = draws.transpose(2, 0, 1, 3, 4).reshape(mu.shape[1], -1)  # (C, S * 2N * h * w)
    np.testing.assert_allclose(meta["latents_mean"], flat.mean(1), rtol=0, atol=3e-3 * flat.std(1).max())
    np.testing.assert_allclose(meta["latents_std"], flat.std(1), rtol=3e-3)
    means = mu.transpose(1, 0, 2, 3).reshape(mu.shape[1], -1)  # the posterior means alone: recorded, not used
    np.testing.assert_allclose(meta["posterior_means_std"], means.std(1), rtol=1e-6)
    assert np.all(np.array(meta["latents_std"]) > np.array(meta["posterior_means_std"]))
    assert "posterior samples" in meta["latent_statistics"]

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


def other_weights(src, dst):
    """A copy of the AE in ``src`` with the same config and other encoder weights (as a fine-tune would have)."""
    vae = AutoencoderKL.from_pretrained(src)
    with torch.no_grad():
        vae.encoder.conv_out.bias.add_(0.1)
    vae.save_pretrained(dst)
    return str(dst)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def header(path):
    """The extraction record of a shard's safetensors header."""
    with safe_open(str(path), "pt") as fh:
        return json.loads(fh.metadata()["extraction"])


def assert_one_error_line(proc, *fragments):
    """A refusal: exit code 2, one ``error: ...`` line naming ``fragments``, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_extract_resumes_the_same_weights_and_refuses_other_weights_or_settings(tmp_path, tiny_vae_dir, run_script):
    make_classes(tmp_path / "data", per_class=4)
    out = tmp_path / "latents"
    fingerprint = weights_fingerprint(AutoencoderKL.from_pretrained(tiny_vae_dir))
    proc = extract(run_script, tiny_vae_dir, tmp_path / "data", out, "--shard_size", 3)
    assert "Wrote to " in proc.stderr and "metadata.json, shard-00000.safetensors" in proc.stderr
    names = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert len(names) == 3
    # The weights fingerprint (and the settings) in metadata.json and in every shard's header
    meta = json.loads((out / "metadata.json").read_text())
    assert (
        meta["ae_weights_fingerprint"] == fingerprint and meta["extraction"]["ae_weights_fingerprint"] == fingerprint
    )
    for name in names:
        settings = header(out / name)["settings"]
        assert settings["ae_weights_fingerprint"] == fingerprint and settings == meta["extraction"]
        assert (settings["resolution"], settings["flip"], settings["shard_size"]) == (16, False, 3)

    # The same weights and settings resume: only the missing shard is encoded
    before = snapshot(out)
    stamps = {n: os.stat(out / n).st_mtime_ns for n in names}
    (out / names[1]).unlink()  # as if the run had been killed before this shard
    proc = extract(run_script, tiny_vae_dir, tmp_path / "data", out, "--shard_size", 3)
    assert "2 already written, 1 for this process" in proc.stdout + proc.stderr
    assert snapshot(out) == before  # the same content, rewritten
    assert os.stat(out / names[0]).st_mtime_ns == stamps[names[0]]  # untouched

    # Other weights, same config: refused before any shard changes
    other = other_weights(tiny_vae_dir, tmp_path / "other_vae")
    other_fingerprint = weights_fingerprint(AutoencoderKL.from_pretrained(other))
    proc = extract(run_script, other, tmp_path / "data", out, "--shard_size", 3, check=False)
    assert_one_error_line(proc, "another autoencoder", fingerprint, other_fingerprint, "--overwrite_output_dir")
    assert snapshot(out) == before

    # Without metadata.json (a first run killed before it), the shards' headers are checked: other settings refused
    (out / "metadata.json").unlink()
    proc = extract(run_script, tiny_vae_dir, tmp_path / "data", out, "--shard_size", 3, "--flip", check=False)
    assert_one_error_line(proc, "shard-00000.safetensors", "flip False there, True in this run")
    assert snapshot(out) == {k: v for k, v in before.items() if k != "metadata.json"}

    # --overwrite_output_dir deletes the old latents and extracts again with the other weights
    extract(run_script, other, tmp_path / "data", out, "--shard_size", 3, "--overwrite_output_dir")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["ae_weights_fingerprint"] == other_fingerprint and sorted(meta["shards"]) == names
    assert all(header(out / n)["settings"]["ae_weights_fingerprint"] == other_fingerprint for n in names)
    assert all((out / n).read_bytes() != before[n] for n in names)  # encoded again


def test_extract_refuses_latents_of_an_older_version_and_damaged_shards(tmp_path):
    """Folders without weights fingerprints (written before it existed) cannot be checked: refused with what to do."""
    settings = {"ae_weights_fingerprint": "abc", "resolution": 16}
    out = tmp_path / "old"
    out.mkdir()
    save_file(
        {"labels": torch.zeros(2, dtype=torch.int64)}, out / "shard-00000.safetensors", metadata={"skipped": "0"}
    )
    with pytest.raises(UsageError, match="older version of extract_latents.py .*shard-00000.*--overwrite_output_dir"):
        check_existing_latents(str(out), settings, "ae")
    (out / "shard-00000.safetensors").unlink()
    (out / "metadata.json").write_text(json.dumps({"ae": "x", "ae_fingerprint": "0123456789abcdef"}))
    with pytest.raises(UsageError, match=r"older version .*\(metadata.json\)"):
        check_existing_latents(str(out), settings, "ae")
    (out / "metadata.json").unlink()
    (out / "shard-00001.safetensors").write_bytes(b"\x00" * 5)  # not a safetensors file
    with pytest.raises(UsageError, match="shard-00001.safetensors is damaged"):
        check_existing_latents(str(out), settings, "ae")
    (out / "shard-00001.safetensors").unlink()
    assert check_existing_latents(str(out), settings, "ae") == 0  # an empty folder is a new one


def test_extract_two_processes_write_disjoint_shards(tmp_path, tiny_vae_dir, run_script):
    make_classes(tmp_path / "data", per_class=4)
    out = tmp_path / "latents"
    launcher = Forked(29523)
    extract(
        run_script, tiny_vae_dir, tmp_path / "data", out, "--shard_size", 2,
        launcher=launcher, extra_env={"ACCELERATE_USE_CPU": "1"},
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
    code, stderr = run_in_process("extract_latents.py", ["--output_dir", tmp_path / "x", "--resolution", 60])
    assert code == 2 and "not divisible by the AE's compression 8" in stderr


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--resolution", "0"], "must be positive"),
        (
            ["--dataset_name", "a", "--train_data_dir", "b"],
            "Give one data source, not --dataset_name and --train_data_dir",
        ),
        (
            ["--train_data_dir", "a", "--video_data_dir", "b"],
            "Give one data source, not --train_data_dir and --video_data_dir",
        ),
        (["--train_data_dir", "no/such/folder"], "error: --train_data_dir no/such/folder is not a folder."),
    ],
)
def test_extract_bad_arguments(tmp_path, bad, message):
    code, stderr = run_in_process("extract_latents.py", ["--output_dir", tmp_path / "x", *bad])
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "x").exists()


def test_a_launched_bad_argument_exits_2_with_one_line(tmp_path, run_script):
    """The command's exit-code contract, once through a real process (the cases above run in-process)."""
    proc = run_script("extract_latents.py", ["--output_dir", tmp_path / "x", "--resolution", "0"], check=False,
                      launcher=PYTHON)  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if "error: " in line]
    assert proc.returncode == 2 and len(errors) == 1 and "must be positive" in errors[0]


def test_extract_settings_are_flag_then_embedded_preset_then_default():
    script = load_script("extract_latents")
    embedded = script.parse_args([])
    assert (embedded.resolution, embedded.max_samples, embedded.embedded_data) == (64, 1024, True)
    assert script.parse_args(["--resolution", "32"]).resolution == 32
    folder = script.parse_args(["--train_data_dir", "d"])
    assert (folder.resolution, folder.max_samples, folder.embedded_data) == (256, None, False)


@pytest.fixture(scope="module")
def tiny_video_ae_dirs(tmp_path_factory):
    """Random-init tiny CogVideoX and LTX autoencoders (the shipped tiny configs), saved as diffusers folders."""
    from diffusability_hf import autoencoders as ae

    root = tmp_path_factory.mktemp("video_aes")
    dirs = {}
    for name in ("cogvideox", "ltx"):
        torch.manual_seed(0)
        config = ae.read_config(os.path.join(ROOT, "diffusability_hf", "assets", "tiny_configs", f"{name}.json"))
        ae.load_autoencoder(config, None).save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


def video_shards(out):
    meta = json.loads((out / "metadata.json").read_text())
    return meta, {s: load_file(out / s) for s in meta["shards"]}


def test_extract_video_latents_embedded_pans_two_processes_and_resume(tmp_path, tiny_video_ae_dirs, run_script):
    """A video AE with no data encodes random clips of the camera pans: (N, C, T', h, w) posteriors labelled by
    photograph; two processes write what one does; a rerun after a lost shard writes it again, bit-equal."""
    args = ["--pretrained_model_name_or_path", tiny_video_ae_dirs["cogvideox"], "--resolution", 32, "--max_samples",
            8, "--shard_size", 3, "--batch_size", 2, "--per_position_statistics"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("extract_latents.py", [*args, "--output_dir", one])
    meta, shards = video_shards(one)
    assert meta["video"] and meta["num_frames"] == 9 and meta["latent_shape"] == [4, 3, 4, 4]  # 1 + (9 - 1) / 4
    assert meta["num_samples"] == 8 and meta["num_classes"] == 8 and meta["statistics_per"] == "position"
    assert np.array(meta["latents_mean"]).shape == (4, 3, 4, 4)
    assert shards["shard-00000.safetensors"]["mean"].shape == (3, 4, 3, 4, 4)
    labels = torch.cat([s["labels"] for s in shards.values()])
    assert labels.tolist() == [i % 8 for i in range(8)]  # class = source photograph (the GIF last)
    launcher = Forked(29524)
    run_script(
        "extract_latents.py", [*args, "--output_dir", two], launcher=launcher, extra_env={"ACCELERATE_USE_CPU": "1"}
    )
    meta2, shards2 = video_shards(two)
    assert meta2["latents_mean"] == meta["latents_mean"] and shards2.keys() == shards.keys()
    for name in shards:
        for key in shards[name]:
            torch.testing.assert_close(shards2[name][key], shards[name][key], rtol=0, atol=1e-6, msg=f"{name}/{key}")
    before = (one / "shard-00001.safetensors").read_bytes()
    (one / "shard-00001.safetensors").unlink()
    proc = run_script("extract_latents.py", [*args, "--output_dir", one])
    assert "2 already written, 1 for this process" in proc.stderr
    assert (one / "shard-00001.safetensors").read_bytes() == before


def test_extract_video_latents_from_class_folders_and_refusals(tmp_path, tiny_video_ae_dirs, tiny_vae_dir, run_script):
    """LTX-class AE on a video folder whose subfolders are the classes; a corrupt video is skipped and counted; a bad
    frame count and video data for an image AE are refused in one line before anything is encoded."""
    frames = (np.random.default_rng(0).random((12, 40, 48, 3)) * 255).astype(np.uint8)
    for name in ("cats", "dogs"):
        (tmp_path / "videos" / name).mkdir(parents=True)
        for i in range(2):
            images = [Image.fromarray(np.roll(f, 3 * i, axis=1)) for f in frames]
            images[0].save(tmp_path / "videos" / name / f"{i}.gif", save_all=True, append_images=images[1:])
    (tmp_path / "videos" / "dogs" / "broken.mp4").write_bytes(b"not a video" * 20)
    base = ["--pretrained_model_name_or_path", tiny_video_ae_dirs["ltx"], "--video_data_dir", tmp_path / "videos",
            "--resolution", 32, "--batch_size", 2]  # fmt: skip
    out = tmp_path / "latents"
    run_script("extract_latents.py", [*base, "--num_frames", 9, "--frame_stride", 1, "--output_dir", out])
    meta, shards = video_shards(out)
    assert meta["id2label"] == {"0": "cats", "1": "dogs"} and meta["num_samples"] == 4 and meta["skipped_images"] == 1
    assert meta["latent_shape"] == [8, 2, 4, 4] and meta["statistics_per"] == "channel"  # LTX: 1 + (9 - 1) / 8
    assert sorted(torch.cat([s["labels"] for s in shards.values()]).tolist()) == [0, 0, 1, 1]
    for bad, message in (
        ([*base, "--num_frames", 8], "--num_frames 8 does not fit AutoencoderKLLTXVideo: it takes 1 + 8k frames"),
        (["--pretrained_model_name_or_path", tiny_vae_dir, "--video_data_dir", tmp_path / "videos"],
         "AutoencoderKL is an image autoencoder, but --video_data_dir"),
    ):  # fmt: skip
        code, stderr = run_in_process("extract_latents.py", [*bad, "--output_dir", tmp_path / "x"])
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and message in errors[0], stderr[-2000:]
        assert not (tmp_path / "x").exists()
