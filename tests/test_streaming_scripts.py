"""The scripts on streams (diffusability_hf.data.streaming): train_ae_se.py and extract_latents.py on tiny webdataset tar
shards written here and on local HF datasets read with ``streaming=True`` (CPU, offline, tiny models)."""

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from safetensors.torch import load_file

from diffusability_hf.data import shards as sh
from diffusability_hf.errors import UsageError

from testing_utils import ROOT, Forked, load_script, torchrun

TINY_CONFIGS = os.path.join(ROOT, "diffusability_hf", "assets", "tiny_configs")


@pytest.fixture(scope="module")
def train_script():
    return load_script("train_ae_se")


@pytest.fixture(scope="module")
def extract_script():
    return load_script("extract_latents")


def crops(n: int):
    """``n`` different 40 x 48 crops of the astronaut photograph (uint8 RGB)."""
    image = skimage.data.astronaut()
    return [image[37 * i : 37 * i + 40, 53 * i : 53 * i + 48].copy() for i in range(n)]


def encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def write_tar(path, samples):
    """A webdataset shard: ``samples`` is ``[(key, {extension: bytes}), ...]``, members in that order."""
    with tarfile.open(path, "w") as tf:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """3 shards x 3 labelled photographs (JPEG and PNG); sample 1 of shard 1 is a corrupt JPEG and sample 1 of
    shard 2 has no image: 7 readable samples, the first 2 of shard 0 held out by validation."""
    root = tmp_path_factory.mktemp("image_shards")
    images = crops(9)
    for s in range(3):
        samples = []
        for p in range(3):
            i = 3 * s + p
            fields = {"png" if i % 2 else "jpg": encode(images[i], "PNG" if i % 2 else "JPEG"), "cls": b"%d" % (i % 3)}
            if (s, p) == (1, 1):
                fields = {"jpg": b"\xff\xd8 not a JPEG", "cls": b"0"}
            elif (s, p) == (2, 1):
                fields = {"cls": b"1"}
            samples.append((f"photo/{s}_{p}", fields))
        write_tar(root / f"{s:06d}.tar", samples)
    return root


def tiny_train_args(vae_dir, out, *extra):
    return [
        "--pretrained_model_name_or_path", vae_dir, "--output_dir", out, "--resolution", 32, "--train_batch_size", 2,
        "--report_to", "none", "--validation_steps", 100, "--num_validation_images", 2, "--learning_rate", 1e-3,
        "--lpips_weight", 0, "--shuffle_buffer_size", 4, "--latent_stats_num_samples", 8, *extra,
    ]  # fmt: skip


def weights(path):
    return load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# train_ae_se.py


def test_train_on_tar_shards_resumes_exactly_and_counts_corrupt_samples(tmp_path, tiny_vae_dir, image_shards,
                                                                        run_script):  # fmt: skip
    """A folder of tar shards streams; 2 + 2 resumed steps (the shards named by a brace spec) train on exactly the
    samples of 4 straight steps: the same final weights. 4 steps x 2 images pass the 5 training samples' epoch, so
    both unreadable ones are met, skipped and counted once."""
    common = ["--checkpointing_steps", 2, "--ema_halflife_steps", 3]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = run_script(
        "train_ae_se.py", tiny_train_args(tiny_vae_dir, straight, "--train_data_dir", image_shards, *common,
                                          "--max_train_steps", 4),
    )  # fmt: skip
    files = ["--train_data_files", f"{image_shards}/{{000000..000002}}.tar"]
    run_script("train_ae_se.py", tiny_train_args(tiny_vae_dir, resumed, *files, *common, "--max_train_steps", 2))
    state = json.loads((resumed / "checkpoint-2" / "image_stream" / "stream_state_rank0.json").read_text())
    assert (state["epoch"], state["num_excluded"], state["buffer_size"]) == (0, 2, 4)
    assert 4 <= state["consumed"] <= 6  # 4 items handed out, and the unreadable samples met before them
    resumed_proc = run_script(
        "train_ae_se.py", tiny_train_args(tiny_vae_dir, resumed, *files, *common, "--max_train_steps", 4,
                                          "--resume_from_checkpoint", "latest"),
    )  # fmt: skip
    assert "Resuming from" in resumed_proc.stderr and "stream position" not in resumed_proc.stderr
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(a["encoder.conv_in.weight"], weights(tiny_vae_dir)["encoder.conv_in.weight"])

    metrics = json.loads((straight / "metrics.json").read_text())
    validation = metrics["validation"]
    assert validation["num_held_out"] == 2 and validation["held_out_sample_ids"] == [0, 1]
    assert "never trained on" in validation["source"]
    assert metrics["skipped_images"] == 2 and metrics["unreadable_files"]["skip_events"] >= 2
    assert sorted(metrics["unreadable_files"]["unreadable_examples"]) == [
        f"{image_shards}/000001.tar#photo/1_1",
        f"{image_shards}/000002.tar#photo/2_1",
    ]
    warned = [line for line in proc.stderr.splitlines() if "Skipping unreadable file" in line]
    assert len(warned) == 2
    assert metrics["latent_normalization"]["num_samples"] == 5  # one unshuffled pass over the training samples
    assert (straight / "checkpoint-4" / "image_stream" / "stream_state_rank0.json").is_file()


def test_two_processes_train_on_their_own_shards_and_resume_exactly(tmp_path, tiny_vae_dir, image_shards, run_script):
    """2 processes (DDP) on 3 tar shards: each reads its own shards and saves its own stream position; a run resumed
    from step 2 with 2 processes ends with the straight run's weights, and the ranks stay in sync."""
    launcher = Forked(29536)
    cpu = {"ACCELERATE_USE_CPU": "1"}
    common = ["--train_data_dir", image_shards, "--checkpointing_steps", 2, "--ema_halflife_steps", 3,
              "--max_train_steps", 4]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script("train_ae_se.py", tiny_train_args(tiny_vae_dir, straight, *common), launcher=launcher, extra_env=cpu)
    states = [json.loads((straight / "checkpoint-2" / "image_stream" / f"stream_state_rank{r}.json").read_text())
              for r in range(2)]  # fmt: skip
    assert [(s["rank"], s["world_size"], s["num_shards"]) for s in states] == [(0, 2, 3), (1, 2, 3)]
    read = [{shard for shard, _ in s["shard_sizes"]} for s in states]
    assert read[0] and read[1] and not read[0] & read[1]  # each shard read by one process
    metrics = json.loads((straight / "metrics.json").read_text())
    checksums = metrics["rank_weight_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # DDP kept the ranks in sync

    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    proc = run_script("train_ae_se.py", tiny_train_args(tiny_vae_dir, resumed, *common, "--resume_from_checkpoint",
                                                        "latest"), launcher=launcher, extra_env=cpu)  # fmt: skip
    assert "Resuming from" in proc.stderr and "stream position" not in proc.stderr
    a, b = weights(straight), weights(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_sigterm_to_the_whole_job_stops_both_processes_with_one_checkpoint(tmp_path, tiny_vae_dir, run_script):
    """A scheduler's SIGTERM goes to every process of the job: the launcher (which forwards it, so each worker gets
    it twice), the 2 training processes and their DataLoader workers. Both processes finish the step, save one
    complete checkpoint and say so; the resume finishes the run."""
    import signal
    import subprocess
    import time

    from diffusability_hf.training.checkpoints import is_complete_checkpoint

    (tmp_path / "photos").mkdir()
    for i, image in enumerate(crops(6)):
        Image.fromarray(image).save(tmp_path / "photos" / f"{i}.png")
    out = tmp_path / "out"
    args = tiny_train_args(tiny_vae_dir, out, "--train_data_dir", tmp_path / "photos", "--max_train_steps", 400,
                           "--checkpointing_steps", 1000, "--dataloader_num_workers", 1)  # fmt: skip
    launcher = torchrun(29537)
    log = open(tmp_path / "job.log", "w+")
    cmd = launcher + [os.path.join(ROOT, "train_scripts", "train_ae_se.py"), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    job = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log,
                           start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while "loss=" not in (tmp_path / "job.log").read_text():  # both processes are in the training loop
        assert job.poll() is None and time.time() < deadline, (tmp_path / "job.log").read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGTERM)  # as `scancel` or a preemption does: the whole process group
    job.wait(timeout=300)
    text = (tmp_path / "job.log").read_text()
    lines = [line for line in text.splitlines() if line.startswith("stopped: ")]
    assert len(lines) == 2 and "KeyboardInterrupt" not in text and "killed by signal" not in text, text[-4000:]
    steps = {int(line.split("after step ")[1].split(",")[0]) for line in lines}
    assert len(steps) == 1, lines  # the processes agreed on the step
    step = steps.pop()
    assert 0 < step < 400 and is_complete_checkpoint(str(out / f"checkpoint-{step}"))
    assert not (out / "diffusion_pytorch_model.safetensors").exists()
    run_script("train_ae_se.py", [*args, "--resume_from_checkpoint", "latest", "--max_train_steps", step + 2],
               launcher=launcher, extra_env={"ACCELERATE_USE_CPU": "1"})  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == step + 2


def test_train_streams_a_local_parquet_dataset(tmp_path, tiny_vae_dir, run_script):
    """--streaming --dataset_name parquet --train_data_files: HF's packaged builder with load_dataset(streaming=True),
    two data files = two shards."""
    import datasets

    (tmp_path / "data").mkdir()
    images = [Image.fromarray(c) for c in crops(8)]
    for k in range(2):
        ds = datasets.Dataset.from_dict({"image": images[4 * k : 4 * k + 4], "caption": ["a photo"] * 4})
        ds.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "data" / f"train-{k}.parquet"))
    out = tmp_path / "out"
    args = ["--streaming", "--dataset_name", "parquet", "--train_data_files", f"{tmp_path}/data/*.parquet"]
    run_script("train_ae_se.py", tiny_train_args(tiny_vae_dir, out, *args, "--max_train_steps", 2,
                                                 "--checkpointing_steps", 2))  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and metrics["skipped_images"] == 0
    assert metrics["validation"]["held_out_sample_ids"] == [0, 1]  # shard 0 rows 0 and 1
    state = json.loads((out / "checkpoint-2" / "image_stream" / "stream_state_rank0.json").read_text())
    assert state["num_shards"] == 2 and state["consumed"] == 4
    assert "webdataset" not in (out / "README.md").read_text() and "parquet" in (out / "README.md").read_text()


def test_video_autoencoder_streams_images_and_clips_from_tar_shards(tmp_path, image_shards, run_script):
    """A video AE's joint batches from two streams, each with its own position in the checkpoint."""
    import av

    (tmp_path / "clips").mkdir()
    for s in range(2):
        samples = []
        for p in range(2):
            buf = io.BytesIO()
            with av.open(buf, "w", format="mp4") as container:
                stream = container.add_stream("mpeg4", rate=8)
                stream.width, stream.height, stream.pix_fmt = 48, 40, "yuv420p"
                for t in range(10):
                    frame = np.roll(crops(2 * s + p + 1)[-1], 3 * t, axis=1)
                    for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                        container.mux(packet)
                for packet in stream.encode():
                    container.mux(packet)
            samples.append((f"clip/{s}_{p}", {"mp4": buf.getvalue()}))
        write_tar(tmp_path / "clips" / f"{s:04d}.tar", samples)
    out = tmp_path / "out"
    args = [
        "--model_config_name_or_path", os.path.join(TINY_CONFIGS, "ltx.json"), "--output_dir", out,
        "--resolution", 32, "--dct_block_size", 4, "--se_scale_factors", 2, "--image_batch_size", 1,
        "--video_batch_size", 1, "--num_frames", 9, "--report_to", "none", "--validation_steps", 100,
        "--num_validation_images", 1, "--num_validation_videos", 1, "--latent_stats_num_samples", 2,
        "--lpips_weight", 0, "--max_train_steps", 1, "--checkpointing_steps", 1, "--train_data_dir", image_shards,
        "--video_data_files", f"{tmp_path}/clips/*.tar", "--shuffle_buffer_size", 2,
    ]  # fmt: skip
    run_script("train_ae_se.py", args)
    checkpoint = out / "checkpoint-1"
    images = json.loads((checkpoint / "image_stream" / "stream_state_rank0.json").read_text())
    clips = json.loads((checkpoint / "video_stream" / "stream_state_rank0.json").read_text())
    assert images["consumed"] >= 1 and clips["consumed"] == 1 and clips["num_excluded"] == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["video"]["num_validation_videos"] == 1 and metrics["train_steps"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--streaming"], "--streaming needs data to stream"),
        (["--train_data_files", "a.tar", "--train_data_dir", "d"], "either --train_data_dir or --train_data_files"),
        (["--dataset_name", "parquet", "--train_data_files", "a.parquet"], "add --streaming"),
        (["--train_data_files", "a.tar", "--dataloader_num_workers", "2"], "drop --dataloader_num_workers 2"),
        (["--video_data_files", "a.tar", "--video_data_dir", "d"], "not several"),
        (["--train_data_files", "a.tar", "--shuffle_buffer_size", "-1"], "must be >= 0"),
    ],
)
def test_train_refuses_bad_stream_flags_in_one_line(train_script, tiny_vae_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        train_script.parse_args(
            ["--pretrained_model_name_or_path", tiny_vae_dir, "--output_dir", str(tmp_path / "o"), *extra]
        )
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and message in errors[0]


def test_train_refusals_before_any_weights_load(train_script, tiny_vae_dir, image_shards, tmp_path, run_script):
    # A video AE's clips must stream when its images do (joint batches): refused before the accelerator starts
    config = os.path.join(TINY_CONFIGS, "ltx.json")
    args = train_script.parse_args(
        ["--model_config_name_or_path", config, "--output_dir", str(tmp_path / "v"), "--train_data_dir",
         str(image_shards), "--num_frames", "9", "--resolution", "32", "--dct_block_size", "4", "--se_scale_factors", "2"]
    )  # fmt: skip
    with pytest.raises(UsageError, match="images are streamed but the clips are not.*--video_batch_size 0"):
        train_script.main(args)
    assert not (tmp_path / "v").exists()
    # A missing shard: one line, no traceback, nothing trained
    out = tmp_path / "out"
    proc = run_script(
        "train_ae_se.py", tiny_train_args(tiny_vae_dir, out, "--train_data_files", f"{tmp_path}/no/{{0..1}}.tar"),
        check=False,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and f"The shard {tmp_path}/no/0.tar does not exist." in errors[0]
    assert "SE fine-tuning:" not in proc.stderr and not (out / "diffusion_pytorch_model.safetensors").exists()


# ----------------------------------------------------------------------------------------------------------------
# extract_latents.py


def extract(run_script, vae_dir, out, *extra, **kw):
    args = ["--pretrained_model_name_or_path", vae_dir, "--resolution", 16, "--batch_size", 2, "--output_dir", out]
    return run_script("extract_latents.py", [*args, *extra], **kw)


def test_extract_tar_shards_one_latent_shard_each_two_processes_equal_one_and_resume(
    tmp_path, tiny_vae_dir, image_shards, run_script
):
    one, two = tmp_path / "one", tmp_path / "two"
    extract(run_script, tiny_vae_dir, one, "--train_data_dir", image_shards)
    meta = json.loads((one / "metadata.json").read_text())
    assert meta["shards"] == [f"shard-{j:05d}.safetensors" for j in range(3)]
    assert meta["num_samples"] == 7 and meta["skipped_images"] == 2
    assert meta["id2label"] == {"0": "0", "1": "1", "2": "2"}  # the integer labels found
    assert meta["extraction"]["input_shards"] == 3 and meta["extraction"]["shard_size"] is None
    shards = {s: load_file(one / s) for s in meta["shards"]}
    ids = torch.cat([s["indices"] for s in shards.values()]).tolist()
    assert ids == [sh.sample_id(s, p) for s in range(3) for p in range(3) if (s, p) not in ((1, 1), (2, 1))]
    assert torch.cat([s["labels"] for s in shards.values()]).tolist() == [(sh.split_sample_id(i)[0] * 3 +
                                                                          sh.split_sample_id(i)[1]) % 3 for i in ids]  # fmt: skip
    assert shards["shard-00000.safetensors"]["mean"].shape == (3, 4, 4, 4)

    # Two processes (each input shard encoded once, by one of them), the shards named by a brace spec
    spec = f"{image_shards}/{{000000..000002}}.tar"
    extract(run_script, tiny_vae_dir, two, "--train_data_files", spec, launcher=Forked(29535),
            extra_env={"ACCELERATE_USE_CPU": "1"})  # fmt: skip
    meta2 = json.loads((two / "metadata.json").read_text())
    assert meta2["latents_mean"] == pytest.approx(meta["latents_mean"], abs=1e-6)
    for name, tensors in shards.items():
        other = load_file(two / name)
        for key in tensors:
            torch.testing.assert_close(other[key], tensors[key], rtol=0, atol=1e-6, msg=f"{name}/{key}")

    # Resume: the same shards from another spelling resume; only the missing latent shard is encoded, bit-equal
    before = (one / "shard-00001.safetensors").read_bytes()
    (one / "shard-00001.safetensors").unlink()
    proc = extract(run_script, tiny_vae_dir, one, "--train_data_files", spec)
    assert "2 already written, 1 for this process" in proc.stderr
    assert (one / "shard-00001.safetensors").read_bytes() == before


def test_extract_streams_an_image_folder_with_its_class_names(tmp_path, tiny_vae_dir, run_script):
    for k, name in enumerate(("cats", "dogs")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i, crop in enumerate(crops(3 * k + 3)[3 * k :]):
            Image.fromarray(crop).save(tmp_path / "data" / name / f"{i}.png")
    (tmp_path / "data" / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "latents"
    extract(run_script, tiny_vae_dir, out, "--streaming", "--train_data_dir", tmp_path / "data")
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["id2label"] == {"0": "cats", "1": "dogs"} and meta["num_samples"] == 6 and meta["skipped_images"] == 1
    labels = torch.cat([load_file(out / s)["labels"] for s in meta["shards"]])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--streaming"], "--streaming needs data to stream"),
        (["--train_data_files", "a.tar", "--max_samples", "3"], "--max_samples does not apply to a stream"),
        (["--train_data_files", "a.tar", "--shard_size", "3"], "--shard_size does not apply to a stream"),
        (["--dataset_name", "parquet", "--train_data_files", "a.parquet"], "add --streaming"),
        (["--train_data_files", "a.tar", "--video_data_files", "b.tar"], "Give one data source"),
    ],
)
def test_extract_refuses_bad_stream_flags_in_one_line(extract_script, capsys, extra, message):
    with pytest.raises(SystemExit):
        extract_script.parse_args(extra)
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and message in errors[0]
