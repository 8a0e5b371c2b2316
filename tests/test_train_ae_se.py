"""End-to-end runs of train_scripts/train_ae_se.py on tiny autoencoders (CPU, offline): one plain process, as the
one-process CPU config starts it; the README's Quickstart and the exit-code contract through `accelerate launch`."""

import glob
import io
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from diffusability_hf import autoencoders as ae
from diffusability_hf.errors import UsageError
from diffusability_hf.files import check_output_dir
from diffusability_hf.training.launch import describe_global_batch, split_global_batch

from testing_utils import ACCELERATE_CPU, CPU_CONFIG, ROOT, Forked, load_script, run_in_process

TINY_CONFIGS = os.path.join(ROOT, "diffusability_hf", "assets", "tiny_configs")
QUIET = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", CPU_CONFIG]


@pytest.fixture(scope="module")
def script():
    """train_ae_se.py as a module, for the tests of its argument handling (the runs go through `run_script`)."""
    return load_script("train_ae_se")


FAST = [
    "--resolution",
    32,
    "--train_batch_size",
    2,
    "--report_to",
    "none",
    "--validation_steps",
    2,
    "--num_validation_images",
    2,
    "--learning_rate",
    1e-3,
]


def fast(model_dir):
    """Small, quick settings; LPIPS stays on, with its trunk read from a local file next to the tiny model."""
    return FAST + ["--lpips_trunk_path", os.path.join(model_dir, "alexnet_trunk.pth")]


def train_tiny(run_script, model_dir, out, *extra, launcher=None, check=True):
    """Fine-tune the tiny model into ``out`` with the quick settings plus ``extra`` flags (which win)."""
    args = ["--pretrained_model_name_or_path", model_dir, "--output_dir", out, *fast(model_dir), *extra]
    return run_script("train_ae_se.py", args, check=check, launcher=launcher)


def weights(path):
    return load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))


def test_fine_tune_writes_a_stock_diffusers_model(tmp_path, tiny_vae_dir, run_script):
    out = tmp_path / "out"
    train_tiny(run_script, tiny_vae_dir, out, "--max_train_steps", 3, "--ema_halflife_steps", 10)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "README.md", "spectrum.png", "metrics.json"):
        assert (out / name).is_file(), name

    # The stock class loads it in a fresh interpreter that never imports this package
    code = (
        "import sys, torch; from diffusers import AutoencoderKL; "
        f"vae = AutoencoderKL.from_pretrained({str(out)!r}); x = torch.rand(1, 3, 32, 32) * 2 - 1; "
        "y = vae.decode(vae.encode(x).latent_dist.mode()).sample; "
        "assert torch.isfinite(y).all() and y.shape == x.shape; "
        "assert not any(m.startswith('diffusability_hf') for m in sys.modules); print('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          cwd=str(tmp_path))  # fmt: skip
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["base_model"] == tiny_vae_dir
    for key in ("before", "after"):
        assert set(metrics[key]) >= {"psnr", "hf_share"}
        assert all(map(lambda v: v == v and abs(v) < 1e6, (metrics[key]["psnr"], metrics[key]["hf_share"])))
    assert metrics["train_steps"] == 3

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "scale-equivariance" in card
    meta = ModelCard(card).data.to_dict()  # the Hub's own parser
    assert meta["library_name"] == "diffusers" and {"diffusability", "scale-equivariance"} <= set(meta["tags"])
    # A local base is named in the text but not as base_model (the Hub accepts only repo ids there); it has no
    # model card, so its license is unknown and the card says where to look
    assert "base_model" not in meta and "license" not in meta and "{{" not in card
    assert f"fine-tuned from **{tiny_vae_dir}**" in card and f"that of the base model {tiny_vae_dir}" in card
    assert "| `learning_rate` | `0.001` |" in card and "| `se_weight` | `0.25` |" in card
    assert "| `max_train_steps` | `3` |" in card
    assert f"{metrics['after']['psnr']:.2f}" in card
    assert "{{" not in card
    assert "must be retrained" in card and "never trained on" in card


def test_saved_model_has_reestimated_latent_scaling_and_cross_decoding_is_measured(tmp_path, tiny_vae_dir, run_script):
    from diffusability_hf.data.images import EmbeddedPhotoCrops, embedded_validation_batch
    from diffusability_hf.metrics.quality import psnr

    out = tmp_path / "out"
    train_tiny(run_script, tiny_vae_dir, out, "--max_train_steps", 3, "--latent_stats_num_samples", 64)
    metrics = json.loads((out / "metrics.json").read_text())
    base, new = AutoencoderKL.from_pretrained(tiny_vae_dir), AutoencoderKL.from_pretrained(out)
    norm = metrics["latent_normalization"]
    # The base (scale only, SD convention) keeps its form; the saved scale normalises the training latents
    assert norm["reestimated"] and norm["form"] == "global scale" and new.config.shift_factor is None
    assert new.config.scaling_factor == norm["saved"]["scaling_factor"] != base.config.scaling_factor
    assert norm["base"]["scaling_factor"] == base.config.scaling_factor
    crops = torch.stack([EmbeddedPhotoCrops(32, seed=0)[i]["pixel_values"] for i in range(64)])
    with torch.no_grad():
        z = new.encode(crops).latent_dist.sample(torch.Generator().manual_seed(1))
    assert (z * new.config.scaling_factor).std().item() == pytest.approx(1.0, abs=0.1)
    assert abs((z * base.config.scaling_factor).std().item() - 1) > 0.3  # the base's value does not fit
    # Cross-decoding on the validation images, recomputed with the stock classes
    val = embedded_validation_batch(32, 2)
    with torch.no_grad():
        zb, zn = base.encode(val).latent_dist.mode(), new.encode(val).latent_dist.mode()
        got = {
            "base_encoder_base_decoder": psnr(base.decode(zb).sample.clamp(-1, 1), val),
            "base_encoder_new_decoder": psnr(new.decode(zb).sample.clamp(-1, 1), val),
            "new_encoder_base_decoder": psnr(base.decode(zn).sample.clamp(-1, 1), val),
            "new_encoder_new_decoder": psnr(new.decode(zn).sample.clamp(-1, 1), val),
        }
    for key, value in got.items():
        assert metrics["cross_decoding_psnr"][key] == pytest.approx(value.mean().item(), abs=1e-3), key
    assert metrics["base_weights_fingerprint"] != metrics["weights_fingerprint"]
    from diffusability_hf.autoencoders import weights_fingerprint

    assert weights_fingerprint(new) == metrics["weights_fingerprint"]
    assert weights_fingerprint(base) == metrics["base_weights_fingerprint"]


def test_finished_output_dir_is_refused_and_overwrite_replaces_it(tmp_path, tiny_vae_dir, run_script, script):
    out = tmp_path / "out"
    train_tiny(run_script, tiny_vae_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # (in this process: the launched command's exit-code contract is test_a_launched_bad_input_fails_with_one_error_line)
    proc = train_tiny(run_script, tiny_vae_dir, out, "--max_train_steps", 1, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--overwrite_output_dir" in errors[0] and "checkpoint-2" in errors[0], proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched
    train_tiny(run_script, tiny_vae_dir, out, "--max_train_steps", 1, "--overwrite_output_dir")
    assert not (out / "checkpoint-2").exists()  # the old run's checkpoints cannot be resumed by mistake
    assert json.loads((out / "metrics.json").read_text())["train_steps"] == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # `latest` with no checkpoint to resume would start a new run over the finished one: refused (as train_dit_flow)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    args = ["--pretrained_model_name_or_path", tiny_vae_dir, "--output_dir", str(out), *fast(tiny_vae_dir)]
    with pytest.raises(UsageError, match="no complete checkpoint to resume, and a new run would replace"):
        script.main(script.parse_args([*map(str, args), "--resume_from_checkpoint", "latest"]))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_resume_matches_straight_run_and_frozen_layers_stay(tmp_path, tiny_vae_dir, run_script):
    common = ["--checkpointing_steps", 2, "--num_frozen_up_blocks", 1, "--ema_halflife_steps", 3]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_tiny(run_script, tiny_vae_dir, straight, *common, "--max_train_steps", 4)
    train_tiny(run_script, tiny_vae_dir, resumed, *common, "--max_train_steps", 2)
    assert (resumed / "checkpoint-2").is_dir()
    # A save killed half-way (no marker, a 0-byte EMA file): 'latest' skips it, an explicit path is refused
    import shutil

    shutil.copytree(resumed / "checkpoint-2", resumed / "checkpoint-3")
    (resumed / "checkpoint-3" / "training_state.json").unlink()
    (resumed / "checkpoint-3" / "ema.safetensors").write_bytes(b"")
    proc = train_tiny(
        run_script, tiny_vae_dir, resumed, *common, "--max_train_steps", 4, "--resume_from_checkpoint", resumed / "checkpoint-3",
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "error: Checkpoint" in proc.stderr and "is damaged" in proc.stderr
    proc = train_tiny(
        run_script, tiny_vae_dir, resumed, *common, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"
    )
    assert "Skipping" in proc.stderr and "checkpoint-3" in proc.stderr and "Resuming from" in proc.stderr

    a, b, base = weights(straight), weights(resumed), weights(tiny_vae_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)

    # Resumed from the last step's checkpoint (killed during the final save, or finished): nothing is trained, and
    # the saved model is the straight run's, bit for bit
    finished = tmp_path / "finished"
    finished.mkdir()
    shutil.copytree(straight / "checkpoint-4", finished / "checkpoint-4")
    proc = train_tiny(
        run_script, tiny_vae_dir, finished, *common, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"
    )
    assert "is at step 4 of 4: nothing left to train" in proc.stderr
    c = weights(finished)
    assert c.keys() == a.keys() and all(torch.equal(a[k], c[k]) for k in a)
    assert json.loads((finished / "metrics.json").read_text())["train_steps"] == 4

    # Frozen: last norm, output conv and the up-block nearest the output (AutoencoderKL runs up_blocks in order)
    frozen = [k for k in a if k.startswith(("decoder.conv_norm_out", "decoder.conv_out", "decoder.up_blocks.2."))]
    assert frozen
    for key in frozen:
        assert torch.equal(a[key], base[key]), key
    changed = [k for k in a if k.startswith("encoder.") and not torch.equal(a[k], base[k])]
    assert changed, "the encoder should have trained"
    assert not torch.equal(
        a["decoder.up_blocks.0.resnets.0.conv1.weight"], base["decoder.up_blocks.0.resnets.0.conv1.weight"]
    )


def test_two_process_ddp_keeps_ranks_in_sync_and_splits_the_presets_global_batch(tmp_path, tiny_vae_dir, run_script):
    """Two processes with --preset flux: Table 5's global batch of 32 images is 16 per process, not 32 each."""
    out, data = tmp_path / "ddp", tmp_path / "data"
    data.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(36):
        Image.fromarray((torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()).save(data / f"{i}.png")
    launcher = Forked(29517)
    args = ["--pretrained_model_name_or_path", tiny_vae_dir, "--output_dir", out, "--preset", "flux",
            "--train_data_dir", data, "--resolution", 32, "--max_train_steps", 3, "--validation_steps", 2,
            "--num_validation_images", 2, "--learning_rate", 1e-3, "--report_to", "none", "--latent_stats_num_samples",
            4, "--lpips_trunk_path", os.path.join(tiny_vae_dir, "alexnet_trunk.pth")]  # fmt: skip
    proc = run_script("train_ae_se.py", args, launcher=launcher, extra_env={"ACCELERATE_USE_CPU": "1"})
    assert "MULTI_CPU" in proc.stdout + proc.stderr
    assert "global batch 32 images (16 per process x 2 processes x 1 accumulation steps; --preset flux's" in (
        proc.stdout + proc.stderr
    )
    batch = json.loads((out / "metrics.json").read_text())["global_batch"]
    assert (batch["images"], batch["per_process"]["images"], batch["num_processes"]) == (32, 16, 2)
    assert "global batch per step: 32 images (16 per process x 2 processes" in (out / "README.md").read_text()
    sums = json.loads((out / "metrics.json").read_text())["rank_weight_checksums"]
    assert len(sums) == 2
    assert sums[0] == pytest.approx(sums[1], rel=1e-6)
    assert sums[0] != pytest.approx(sum(v.double().sum().item() for v in weights(tiny_vae_dir).values()), rel=1e-9)


def test_corrupt_images_are_skipped_and_counted(tmp_path, tiny_vae_dir, run_script):
    data = tmp_path / "images"
    data.mkdir()
    rng = torch.Generator().manual_seed(0)
    for i in range(5):
        arr = (torch.rand(40, 48, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(data / f"img{i}.png")
    good = (data / "img0.png").read_bytes()
    (data / "broken.png").write_bytes(good[: len(good) // 3])  # truncated PNG
    (data / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    (data / "empty.png").write_bytes(b"")  # a zero-byte file counts like any other unreadable one
    out = tmp_path / "out"
    proc = train_tiny(
        run_script, tiny_vae_dir, out, "--train_data_dir", data, "--max_train_steps", 8
    )  # 3 passes over the data
    metrics = json.loads((out / "metrics.json").read_text())
    validation = metrics["validation"]
    # Validation images are held out of training: 2 readable ones, never repeated; unreadable ones examined on the
    # way are left out of training too
    assert validation["num_held_out"] == 2 and "held out" in validation["source"]
    assert len(set(validation["held_out_indices"])) == len(validation["held_out_indices"]) >= 2
    corrupt_in_training = 3 - len(validation["unreadable_held_out_indices"])
    # Unique files, not skip events; one warning per file
    assert metrics["skipped_images"] == metrics["unreadable_files"]["unreadable_files"] == corrupt_in_training
    assert metrics["unreadable_files"]["skip_events"] >= corrupt_in_training
    warned = [line for line in proc.stderr.splitlines() if "Skipping unreadable file" in line]
    assert len(warned) == corrupt_in_training
    assert "held out of the training data" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preset", "sdxl-turbo"], "invalid choice"),
        (["--se_scale_factors", "3"], "SE scale factor 3 does not divide the latent size 8x8"),
        (["--resolution", "34"], "not divisible by the autoencoder's spatial compression 4"),
        (["--pretrained_model_name_or_path", "no-such-org/no-such-vae", "--subfolder", "vae"], "hf download"),
        (["--pretrained_model_name_or_path", "./no-such-vae"], "folder ./no-such-vae does not exist"),
        (["--se_weight", "-1"], "non-negative"),
        (["--push_to_hub", "--hub_model_id", "me/vae"], "HF_HUB_OFFLINE=1"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(tmp_path, tiny_vae_dir, extra, message, caplog):
    """In-process (the command line's path, ``run_script(main, parse_args)``); the launched command's exit code is
    checked once, by the next test."""
    out = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", tiny_vae_dir, "--output_dir", out, *fast(tiny_vae_dir)]
    code, stderr = run_in_process("train_ae_se.py", [*argv, "--max_train_steps", 1000, *extra])
    assert code == 2 and message in stderr, stderr[-3000:]
    # One line that says what to do, no traceback (argparse's own errors print the usage first)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in stderr, stderr[-3000:]
    # Before any heavy work: training never started and nothing was checkpointed
    assert "SE fine-tuning:" not in caplog.text
    assert not (out / "checkpoint-500").exists()


def test_a_launched_bad_input_fails_with_one_error_line(tmp_path, tiny_vae_dir, run_script):
    """Through ``accelerate launch`` (which turns the script's exit code 2 into its own 1 under ``--quiet``)."""
    proc = train_tiny(run_script, tiny_vae_dir, tmp_path / "out", "--se_weight", "-1", check=False, launcher=QUIET)
    assert proc.returncode != 0, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ") or ": error: " in line]
    assert len(errors) == 1 and "non-negative" in errors[0] and "Traceback" not in proc.stderr


def test_missing_lpips_trunk_is_reported_before_training(tmp_path, tiny_vae_dir, monkeypatch):
    # No --lpips_trunk_path, and an empty torch hub cache (in-process: the command line's path)
    args = ["--pretrained_model_name_or_path", tiny_vae_dir, "--output_dir", tmp_path / "out", "--max_train_steps", 2]
    args += [*FAST, "--lpips_weight", "1"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    code, stderr = run_in_process("train_ae_se.py", args)
    assert code == 2
    assert "alexnet-owt-7be5be79.pth" in stderr and "--lpips_trunk_path" in stderr
    assert "--lpips_weight 0" in stderr
    # A wrong data path is reported first: it is the user's first mistake, and LPIPS may not even be wanted
    code, stderr = run_in_process("train_ae_se.py", [*args, "--train_data_dir", tmp_path / "no-such-folder"])
    assert code == 2 and "no-such-folder is not a folder" in stderr
    assert "alexnet-owt-7be5be79.pth" not in stderr


def test_lora_run_saves_merged_plain_model_and_adapter(tmp_path, tiny_vae_dir, run_script):
    out = tmp_path / "lora"
    train_tiny(
        run_script, tiny_vae_dir, out, "--max_train_steps", 2, "--use_lora", "--lora_rank", 2, "--ema_halflife_steps", 0,
        "--keep_base_latent_scaling",
    )  # fmt: skip
    assert (
        AutoencoderKL.load_config(out)["scaling_factor"] == AutoencoderKL.load_config(tiny_vae_dir)["scaling_factor"]
    )
    assert json.loads((out / "metrics.json").read_text())["latent_normalization"]["reestimated"] is False
    merged, base = weights(out), weights(tiny_vae_dir)
    assert merged.keys() == base.keys()  # plain diffusers keys: no lora_A/lora_B/base_layer left
    adapter = load_file(out / "lora" / "adapter_model.safetensors")
    assert adapter and all("lora" in k for k in adapter)
    assert any(not torch.equal(merged[k], base[k]) for k in merged)
    vae = AutoencoderKL.from_pretrained(out)
    assert torch.isfinite(vae.decode(torch.zeros(1, 4, 8, 8)).sample).all()


def test_presets_fill_table5_and_explicit_flags_win(script, tiny_vae_dir):
    x = tiny_vae_dir
    flux = script.parse_args(["--pretrained_model_name_or_path", x, "--preset", "flux", "--train_data_dir", "d"])
    # Paper Table 5 (FluxAE) and Appendix B
    assert (flux.learning_rate, flux.train_batch_size, flux.max_train_steps) == (1e-5, 32, 10_000)
    assert (flux.max_grad_norm, flux.num_frozen_up_blocks, flux.mse_weight, flux.lpips_weight) == (50.0, 1, 1.0, 1.0)
    assert (flux.adam_beta1, flux.adam_beta2, flux.adam_weight_decay) == (0.9, 0.99, 0.01)
    assert flux.se_weight == 0.25 and flux.se_scale_factors == [2, 4] and flux.ema_halflife_steps == 5000
    assert flux.kl_weight == 0.0  # SE on: KL off (Section 3.3)
    ft = script.parse_args(
        ["--pretrained_model_name_or_path", x, "--preset", "flux", "--se_weight", "0", "--train_data_dir", "d"]
    )
    assert ft.kl_weight == 1e-3  # the "+FT" baseline keeps Table 5's KL
    ltx = script.parse_args(
        ["--pretrained_model_name_or_path", x, "--preset", "ltx", "--learning_rate", "3e-5", "--train_data_dir", "d"]
    )
    assert ltx.learning_rate == 3e-5 and ltx.mse_weight == 5.0 and ltx.max_grad_norm == 50.0
    cosmos = script.parse_args(["--pretrained_model_name_or_path", x, "--preset", "cosmos", "--train_data_dir", "d"])
    assert cosmos.learning_rate == 1e-4 and cosmos.num_frozen_up_blocks == 3
    embedded = script.parse_args([])
    assert embedded.pretrained_model_name_or_path == ae.EMBEDDED_AE and embedded.lpips_weight == 0.0
    assert embedded.checkpoints_total_limit == 3 and not embedded.overwrite_output_dir
    # A flag given with the default's value is still given: it wins over the preset
    assert script.parse_args(["--pretrained_model_name_or_path", x, "--preset", "cosmos", "--train_data_dir", "d",
                              "--learning_rate", "1e-5"]).learning_rate == 1e-5  # fmt: skip
    assert (cosmos.validation_steps, cosmos.checkpointing_steps) == (500, 1000)  # not in Table 5: the defaults


def test_help_shows_the_defaults_the_presets_and_the_rule(script, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Peak learning rate (1e-05)" in text and "Square training crop side (256)" in text
    assert "a flag given on the command line wins; else, with no --dataset_name / --train_data_dir" in text
    assert "--preset flux: learning_rate=1e-05 train_batch_size=32" in text
    assert "no dataset, embedded AE: learning_rate=0.0002 train_batch_size=16 max_train_steps=300" in text


def test_checks_return_values_and_leave_the_arguments_alone(script, tiny_vae_dir):
    config = os.path.join(TINY_CONFIGS, "cogvideox.json")
    video = script.parse_args(["--model_config_name_or_path", config, "--train_data_dir", "d", "--resolution", "32"])
    image = script.parse_args(["--pretrained_model_name_or_path", tiny_vae_dir, "--resolution", "32"])
    before = {name: dict(vars(a)) for name, a in (("video", video), ("image", image))}
    for a in (video, image):
        clips = ae.check_se_video(a.vae_config, a.train_batch_size, a.video_batch_size, a.num_frames,
                                  a.se_temporal_scale_factors, script.video_flags(a))  # fmt: skip
        assert clips == (4 if a is video else 0)  # half of --train_batch_size 8 (Table 5's ratio); none for images
    assert ae.check_se_geometry(image.vae_config, 32, image.se_scale_factors, image.dct_block_size) == 4
    assert split_global_batch(image.preset_global_batch, 2, 1, image.preset) == {}
    assert {"video": vars(video), "image": vars(image)} == before


def test_presets_batch_sizes_are_global_and_explicit_ones_per_process(script, tiny_vae_dir):
    """Table 5's batch is the global one: split over processes x accumulation steps; refused when they do not
    divide it, with the flags that give it; an explicit --train_batch_size keeps diffusers' per-process meaning."""

    def split(args, num_processes):  # as main() calls it
        return split_global_batch(
            args.preset_global_batch, num_processes, args.gradient_accumulation_steps, args.preset
        )

    base = ["--pretrained_model_name_or_path", tiny_vae_dir, "--train_data_dir", "d"]
    flux = script.parse_args([*base, "--preset", "flux"])
    assert flux.preset_global_batch == {"train_batch_size": 32}
    assert [split(flux, n)["train_batch_size"] for n in (1, 2, 8, 32)] == [32, 16, 4, 1]
    accum = script.parse_args([*base, "--preset", "flux", "--gradient_accumulation_steps", "4"])
    assert split(accum, 2) == {"train_batch_size": 4}  # 4 x 2 processes x 4 steps = 32
    with pytest.raises(UsageError) as err:
        split(flux, 3)
    message = str(err.value)
    assert (
        "global batch of 32 images per step (Table 5)" in message
        and "launch with 1, 2, 4, 8, 16, 32 processes" in message
    )
    assert "--train_batch_size 10 (30 images per step) or --train_batch_size 11 (33 images per step)" in message
    with pytest.raises(UsageError, match="launch with 1, 2, 4, 8 processes"):
        split(accum, 3)
    with pytest.raises(UsageError, match="64 processes x 1"):
        split(flux, 64)
    # Explicit sizes are per process; the embedded CPU sizing is not Table 5's and is not split either
    assert script.parse_args([*base, "--preset", "flux", "--train_batch_size", "32"]).preset_global_batch == {}
    assert script.parse_args(["--preset", "flux"]).preset_global_batch == {}
    config = os.path.join(TINY_CONFIGS, "cogvideox.json")
    video = script.parse_args(
        ["--preset", "cogvideox", "--model_config_name_or_path", config, "--train_data_dir", "d"]
    )
    assert split(video, 8) == {"train_batch_size": 8, "video_batch_size": 4}  # 64 + 32 in all
    mixed = script.parse_args(
        [
            "--preset",
            "cogvideox",
            "--model_config_name_or_path",
            config,
            "--train_data_dir",
            "d",
            "--video_batch_size",
            "2",
        ]
    )
    assert split(mixed, 8) == {"train_batch_size": 8}  # the explicit clip batch stays per process
    for key, value in split(video, 8).items():
        setattr(video, key, value)
    per_process = {"images": video.train_batch_size, "clips": video.video_batch_size}
    described = describe_global_batch(per_process, 8, 1, video.preset, video.num_frames)
    assert (described["images"], described["clips"]) == (64, 32) and "cogvideox's Table 5 global batch" in described[
        "description"
    ]


def test_the_scripts_training_step_is_the_library_objective(tmp_path, tiny_vae_dir, run_script):
    """The loss and terms the script logs at step 1 are ``SEAutoencoderLoss`` (every term on) on that step's batch,
    scale factor, CHF ratio and generator: the objective that test_losses.py checks against eq. 2 is the one that
    trains. Four copies of one image: two are held out for validation, and step 1's batch is the other two, in
    whichever order the sampler draws them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffusability_hf.data.images import to_tensor
    from diffusability_hf.losses import ReconstructionDistance, SEAutoencoderLoss
    from diffusability_hf.training.steps import step_generator

    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    image = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    for i in range(4):
        image.save(data / f"{i}.png")
    seed, weights = 7, {"se_weight": 0.25, "kl_weight": 1e-3, "chf_weight": 0.5, "soft_penalty_weight": 0.1}
    args = ["--pretrained_model_name_or_path", tiny_vae_dir, "--train_data_dir", data, "--output_dir", out,
            "--resolution", 32, "--train_batch_size", 2, "--num_validation_images", 2, "--max_train_steps", 1,
            "--report_to", "tensorboard", "--lpips_weight", 0, "--dct_block_size", 4, "--seed", seed,
            "--latent_stats_num_samples", 2, *[v for k, w in weights.items() for v in (f"--{k}", w)]]  # fmt: skip
    run_script("train_ae_se.py", args)
    events = EventAccumulator(os.path.dirname(glob.glob(f"{out}/logs/**/events.out.tfevents.*", recursive=True)[0]))
    events.Reload()
    logged = {tag: events.Scalars(tag)[0].value for tag in events.Tags()["scalars"] if tag.startswith("train/")}

    # The same step with the library objective: the step's draws as the script makes them, the base weights
    step_rng = random.Random(seed * 100_003 + 0)
    scale, chf_ratio = step_rng.choice([2, 4]), step_rng.uniform(0.0, 0.9)
    objective = SEAutoencoderLoss(
        AutoencoderKL.from_pretrained(tiny_vae_dir), ReconstructionDistance(1.0, 0.0), **weights, dct_block_size=4
    )
    with torch.no_grad():
        loss, terms = objective(
            to_tensor(image).expand(2, -1, -1, -1), None, scale, chf_ratio=chf_ratio,
            generator=step_generator(torch.device("cpu"), seed, 0, 0, 0),
        )  # fmt: skip
    assert logged["train/scale_factor"] == scale
    assert logged["train/loss"] == pytest.approx(loss.mean().item(), rel=1e-6, abs=1e-9)
    assert {f"train/{k}" for k in terms} == {"train/rec", "train/se", "train/kl", "train/chf", "train/soft"}
    for key, value in terms.items():
        assert logged[f"train/{key}"] == pytest.approx(value.item(), rel=1e-6, abs=1e-9), key


def test_the_soft_penalty_uses_the_authors_normalisation_unless_asked(script, tiny_vae_dir):
    base = ["--pretrained_model_name_or_path", tiny_vae_dir, "--train_data_dir", "d"]
    assert script.parse_args(base).soft_penalty_normalization == "authors"
    assert script.parse_args([*base, "--soft_penalty_normalization", "paper"]).soft_penalty_normalization == "paper"


def test_bf16_autocast_step_is_finite_and_weights_stay_fp32(tmp_path, tiny_vae_dir, run_script):
    out = tmp_path / "bf16"
    train_tiny(
        run_script, tiny_vae_dir, out, "--max_train_steps", 2, "--mixed_precision", "bf16", "--ema_halflife_steps", 0
    )
    saved = weights(out)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in saved.values())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["psnr"] == metrics["after"]["psnr"]  # not NaN


def test_embedded_autoencoder_is_a_trained_flux_like_vae():
    from diffusability_hf.data.images import embedded_validation_batch
    from diffusability_hf.metrics.quality import psnr

    vae = AutoencoderKL.from_pretrained(ae.EMBEDDED_AE).eval()
    assert vae.config.latent_channels == 16 and len(vae.config.block_out_channels) == 4  # 16 channels, 8x down
    x = embedded_validation_batch(64)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample.clamp(-1, 1)
    assert z.shape == (8, 16, 8, 8)
    value = psnr(y, x).mean().item()
    assert value > 23.0, value  # a trained autoencoder, not a random one (~12 dB)


@pytest.mark.minutes
def test_no_argument_run_does_the_real_job(tmp_path, run_script):
    """The README's first Quickstart command: SE cuts the latent high-frequency share, PSNR stays within 1 dB."""
    out = tmp_path / "ae-se"
    run_script("train_ae_se.py", ["--output_dir", out], launcher=ACCELERATE_CPU)
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert after["hf_share"] <= 0.7 * before["hf_share"], (before, after)
    assert abs(after["psnr"] - before["psnr"]) <= 1.0, (before, after)
    assert (out / "spectrum.png").stat().st_size > 10_000
    assert AutoencoderKL.from_pretrained(out).config.latent_channels == 16


# ----------------------------------------------------------------------------------------------------------------
# Video autoencoders: joint image + clip batches (paper Table 5), tiny configs shipped with the package

VIDEO_FAST = [
    "--resolution", 32, "--dct_block_size", 4, "--se_scale_factors", 2, "--image_batch_size", 2,
    "--video_batch_size", 1, "--report_to", "none", "--validation_steps", 2, "--num_validation_images", 2,
    "--num_validation_videos", 2, "--learning_rate", 1e-3, "--lpips_weight", 0,
]  # fmt: skip


def train_video(run_script, stem, out, *extra, check=True):
    config = os.path.join(TINY_CONFIGS, f"{stem}.json")
    args = ["--model_config_name_or_path", config, "--output_dir", out, *VIDEO_FAST, *extra]
    return run_script("train_ae_se.py", args, check=check)


def write_videos(folder, num=3, frames=20, size=40):
    """An mp4, a GIF, a folder of PNG frames (moving gradients), plus a corrupt file and a too-short clip."""
    import imageio.v3 as iio
    import numpy as np

    folder.mkdir()
    yy, xx = np.mgrid[0:size, 0:size]
    clip = np.stack(
        [np.stack([(xx + 3 * t) % size * 6, (yy + 2 * t) % size * 6, (xx + yy) * 3], -1) for t in range(frames)]
    ).astype(np.uint8)  # (T, H, W, 3)
    iio.imwrite(folder / "a.mp4", clip, fps=8, codec="libx264")
    iio.imwrite(folder / "b.gif", clip[::-1], duration=100, loop=0)
    (folder / "frames").mkdir()
    for t, frame in enumerate(clip):
        iio.imwrite(folder / "frames" / f"{t:03d}.png", frame)
    (folder / "broken.mp4").write_bytes(b"not a video" * 50)
    iio.imwrite(folder / "short.gif", clip[:2], duration=100, loop=0)


@pytest.mark.parametrize(
    "stem, frames, extra",
    [
        (
            "cogvideox",
            17,
            ["--video_data_dir", "VIDEOS", "--se_temporal_scale_factors", 1, 2, "--report_to", "tensorboard"],
        ),
        ("ltx", 9, ["--gradient_checkpointing", "--lpips_weight", 1, "--lpips_trunk_path", "TRUNK"]),
        ("ltx_timestep", 9, ["--kl_weight", 1e-3]),
        ("wan", 9, ["--image_batch_size", 1]),
    ],
)
def test_video_autoencoders_fine_tune_on_joint_batches(tmp_path, tiny_vae_dir, stem, frames, extra, run_script):
    out = tmp_path / "out"
    if "VIDEOS" in extra:
        write_videos(tmp_path / "videos")
    extra = [
        {"VIDEOS": tmp_path / "videos", "TRUNK": os.path.join(tiny_vae_dir, "alexnet_trunk.pth")}.get(e, e)
        for e in extra
    ]
    proc = train_video(run_script, stem, out, "--num_frames", frames, "--max_train_steps", 2, *extra)
    log = proc.stdout + proc.stderr
    assert f"clips of {frames} frames" in log and "Peak memory" in log

    metrics = json.loads((out / "metrics.json").read_text())
    video = metrics["video"]
    assert video["num_validation_videos"] == 2 and metrics["num_validation_images"] == 2
    for key in ("before", "after"):
        assert 0 < video[key]["psnr"] < 100 and 0 <= video[key]["hf_share"] <= 1
        assert 0 < metrics[key]["psnr"] < 100  # the images, through the video AE as 1-frame videos
    assert video["before"]["psnr"] != video["after"]["psnr"]  # it trained
    assert len(video["after"]["frame_profiles"]) == 1 + (frames - 1) // (4 if stem in ("cogvideox", "wan") else 8)
    assert metrics["peak_memory_gb"] > 0 and metrics["nonfinite_steps"] == 0
    throughput = metrics["throughput"]  # global samples per step: images + clips over processes and accumulation
    assert throughput["samples_per_step"] == (1 if stem == "wan" else 2) + 1 and throughput["steps_measured"] >= 1
    assert throughput["samples_per_second"] > 0 and 0 <= throughput["data_wait_fraction"] < 1
    if stem == "cogvideox":
        assert metrics["skipped_images"] >= 1  # the corrupt and too-short videos were skipped and counted
        # TensorBoard got the validation clips as an animated GIF and the per-latent-frame spectra
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent)).Reload()
        tags = events.Tags()
        assert {"validation/reconstruction_clips", "validation/spectrum_per_frame"} <= set(tags["images"])
        clip = events.Images("validation/reconstruction_clips")[-1]
        assert Image.open(io.BytesIO(clip.encoded_image_string)).n_frames == frames
        assert {"val/video_psnr", "train/peak_memory_gb", "train/temporal_scale_factor"} <= set(tags["scalars"])
        assert {"train/samples_per_second", "train/step_time_s", "train/data_wait_s"} <= set(tags["scalars"])

    gif = Image.open(out / "reconstruction.gif")
    assert gif.n_frames == frames and gif.size == (2 * 32, 2 * 32)  # 2 clips side by side, originals over recons
    card = (out / "README.md").read_text()
    assert "PSNR (clips) (dB)" in card and f"{video['after']['psnr']:.2f}" in card and "{{" not in card

    # A stock diffusers class loads the result and reconstructs a clip of the same shape
    import diffusers

    config = json.loads((out / "config.json").read_text())
    vae = getattr(diffusers, config["_class_name"]).from_pretrained(out).eval()
    x = torch.rand(1, 3, frames, 32, 32) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        temb = torch.tensor([0.05]) if config.get("timestep_conditioning") else None
        y = vae.decode(z, temb).sample if temb is not None else vae.decode(z).sample
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_video_resume_matches_straight_run(tmp_path, run_script):
    # The timestep-conditioned LTX decoder: decode noise from the step generator, noise injection from torch's RNG
    common = ["--num_frames", 9, "--checkpointing_steps", 2, "--ema_halflife_steps", 3]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_video(run_script, "ltx_timestep", straight, *common, "--max_train_steps", 4)
    train_video(run_script, "ltx_timestep", resumed, *common, "--max_train_steps", 2)
    train_video(
        run_script, "ltx_timestep", resumed, *common, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"
    )
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "stem, extra, message",
    [
        ("cogvideox", ["--num_frames", 16], "--num_frames 16 does not fit AutoencoderKLCogVideoX: it takes 1 + 8k"),
        ("cogvideox", ["--resolution", 36], "use 32 or 40"),
        ("cogvideox", ["--se_temporal_scale_factors", 4], "Temporal SE factor 4 does not fit 17 frames"),
        ("allegro", ["--num_frames", 8], "cannot encode images as 1-frame videos. Pass --image_batch_size 0"),
        ("wan", ["--num_frames", 9, "--gradient_checkpointing"], "does not support gradient checkpointing"),
        ("ltx2", ["--se_scale_factors", 4], "needs latents of at least 2x2"),
        ("cogvideox", ["--video_data_dir", "no/such/folder"], "is not a folder"),
        (None, ["--video_batch_size", 2], "AutoencoderKL is an image autoencoder, but --video_batch_size"),
    ],
)
def test_video_bad_input_fails_before_training(tmp_path, tiny_vae_dir, script, stem, extra, message):
    model = ["--pretrained_model_name_or_path", tiny_vae_dir] if stem is None else []
    if stem is not None:
        model = ["--model_config_name_or_path", os.path.join(TINY_CONFIGS, f"{stem}.json")]
    args = [*model, "--output_dir", str(tmp_path / "out"), *map(str, VIDEO_FAST), *map(str, extra)]
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        script.main(script.parse_args(args))
    assert message in str(err.value)
    assert not (tmp_path / "out" / "diffusion_pytorch_model.safetensors").exists()


def test_video_two_process_ddp_keeps_ranks_in_sync(tmp_path, run_script):
    out = tmp_path / "ddp"
    launcher = Forked(29519)
    config = os.path.join(TINY_CONFIGS, "ltx.json")
    args = ["--model_config_name_or_path", config, "--output_dir", out, *VIDEO_FAST, "--num_frames", 9]
    proc = run_script("train_ae_se.py", [*args, "--max_train_steps", 2], launcher=launcher,
                      extra_env={"ACCELERATE_USE_CPU": "1"})  # fmt: skip
    assert "MULTI_CPU" in proc.stdout + proc.stderr and "global batch 4 images + 2 clips" in proc.stdout + proc.stderr
    sums = json.loads((out / "metrics.json").read_text())["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=1e-6)


def test_embedded_video_run_is_sized_for_a_cpu_and_explicit_flags_win(script):
    config = os.path.join(TINY_CONFIGS, "cogvideox.json")
    args = script.parse_args(["--preset", "cogvideox", "--model_config_name_or_path", config])
    # Table 5's CogVideoX-AE settings that are not about size stay; the size is the embedded CPU run's
    assert (args.learning_rate, args.max_grad_norm, args.num_frames) == (3e-4, 1.0, 17)
    assert (args.resolution, args.train_batch_size, args.video_batch_size, args.lpips_weight) == (64, 4, 2, 0.0)
    args = script.parse_args(
        ["--preset", "cogvideox", "--model_config_name_or_path", config, "--video_batch_size", "3"]
    )
    assert args.video_batch_size == 3
    # With a real dataset the preset's Table 5 batch sizes apply: 64 images + 32 clips
    args = script.parse_args(["--preset", "cogvideox", "--model_config_name_or_path", config, "--train_data_dir", "d"])
    assert (args.train_batch_size, args.video_batch_size, args.resolution) == (64, 32, 256)


def test_a_diverging_run_skips_non_finite_steps_and_stops_with_a_checkpoint(tmp_path, tiny_vae_dir, run_script):
    """A learning rate of 1e37 makes the first AdamW update blow the weights up: every later loss is not finite, so
    those steps make no optimizer or EMA update, and after --max_nonfinite_steps in a row the run stops in one error
    line with a checkpoint of the weights of the last finite loss (before the step that blew them up): its optimizer
    never stepped."""
    out = tmp_path / "out"
    proc = train_tiny(run_script, tiny_vae_dir, out, "--learning_rate", 1e37, "--max_grad_norm", 0, "--max_train_steps",
                      10, "--max_nonfinite_steps", 2, "--lr_warmup_steps", 0, check=False)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "not finite for 2 optimizer steps in a row (up to step 3; 2 skipped in all)" in lines[0]
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert torch.load(out / "checkpoint-3" / "optimizer.bin", weights_only=True)["state"] == {}
    from safetensors.torch import load_file

    saved, base = load_file(out / "checkpoint-3" / "model.safetensors"), weights(tiny_vae_dir)
    for key, value in base.items():  # the weights the run started from, not the blown-up ones
        assert torch.equal(saved[f"vae.{key}"], value), key
    assert not (out / "diffusion_pytorch_model.safetensors").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--learning_rate", "-1"], "--learning_rate must be a positive number, got -1.0"),
        (["--learning_rate", "nan"], "--learning_rate must be a positive number, got nan"),
        (["--checkpointing_steps", "-1"], "--checkpointing_steps must be positive, got -1"),
        (["--se_weight", "nan"], "finite and non-negative, got --se_weight nan"),
        (["--kl_weight", "inf"], "finite and non-negative, got --kl_weight inf"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(script, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(extra)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_files_where_folders_belong_and_impossible_resolutions_get_the_right_message(tmp_path):
    from diffusability_hf import autoencoders as ae

    a_file = tmp_path / "vae.safetensors"
    a_file.write_bytes(b"weights")
    with pytest.raises(FileNotFoundError, match=r"vae.safetensors is a file: give the diffusers model folder"):
        ae.pretrained_config(str(a_file))
    with pytest.raises(UsageError, match=r"--output_dir .*vae.safetensors is a file, not a folder"):
        check_output_dir(str(a_file), ["config.json"], overwrite=False)
    config = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 8, 8, 8]}
    with pytest.raises(ValueError, match=r"--resolution 7 is not divisible .* compression 8; use 8 or 16\."):
        ae.check_se_geometry(config, 7, [2], 8)
    with pytest.raises(ValueError, match=r"--resolution 34 is not divisible .* compression 8; use 32 or 40\."):
        ae.check_se_geometry(config, 34, [2], 8)
