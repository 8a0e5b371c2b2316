"""The accelerate configs: each loads with accelerate's own loader and means what its name says; docs/hardware.md gives a
command line for each; and data parallelism is exact: 2 CPU processes (gloo) give the weights of 1 process with
twice the per-process batch."""

import glob
import os

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from testing_utils import ROOT, Forked, load_script

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "accelerate_configs", "*.yaml")))
EXPECTED = {  # name: (distributed type, mixed precision, use_cpu)
    "cpu": (DistributedType.NO, "no", True),
    "single_gpu": (DistributedType.NO, "bf16", False),
    "multi_gpu": (DistributedType.MULTI_GPU, "bf16", False),
    "fsdp": (DistributedType.FSDP, "bf16", False),
    "deepspeed_zero2": (DistributedType.DEEPSPEED, "no", False),  # the scripts refuse DeepSpeed with bf16/fp16
}


def name_of(path):
    return os.path.splitext(os.path.basename(path))[0]


def test_every_expected_config_exists():
    assert sorted(map(name_of, CONFIGS)) == sorted(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=name_of)
def test_config_loads_with_accelerate_and_means_its_name(path):
    config = load_config_from_file(path)  # unknown keys raise here: the files hold only accelerate's own fields
    distributed, precision, cpu = EXPECTED[name_of(path)]
    assert (config.distributed_type, config.mixed_precision, bool(config.use_cpu)) == (distributed, precision, cpu)
    assert config.num_machines == 1 and config.num_processes >= 1
    if distributed == DistributedType.FSDP:
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2  # the scripts run FSDP2 (fully_shard) only
        assert fsdp["fsdp_reshard_after_forward"] is True and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if distributed == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] == 2


@pytest.mark.parametrize("name", ["multi_gpu", "fsdp"])
def test_launcher_turns_the_config_into_its_environment(name):
    """What `accelerate launch --config_file ...` hands the training processes (no GPU needed to build it)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = os.path.join(ROOT, "accelerate_configs", f"{name}.yaml")
    args = launch_command_parser().parse_args(["--config_file", path, "train_scripts/train_ae_se.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    if name == "fsdp":
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    else:
        assert "ACCELERATE_USE_FSDP" not in env


def test_launcher_turns_the_deepspeed_config_into_its_environment():
    """What the training processes of the DeepSpeed config see: the flags ``check_launcher`` reads, fp32, and no
    clipping or accumulation of the config's own (the scripts' flags give them)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    path = os.path.join(ROOT, "accelerate_configs", "deepspeed_zero2.yaml")
    args = launch_command_parser().parse_args(["--config_file", path, "train_scripts/train_ae_se.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.use_deepspeed and not args.cpu  # launch_command's test for its DeepSpeed launcher
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command sets it
    env = prepare_deepspeed_cmd_env(args)[1]
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2" and "ACCELERATE_USE_FSDP" not in env
    assert "ACCELERATE_GRADIENT_CLIPPING" not in env and "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env


def test_the_docs_give_a_command_line_for_every_config():
    with open(os.path.join(ROOT, "docs", "hardware.md")) as fh:
        readme = fh.read()
    for path in CONFIGS:
        assert f"accelerate launch --config_file accelerate_configs/{os.path.basename(path)}" in readme, path


def test_two_process_ddp_equals_one_process_with_twice_the_batch(tmp_path, tiny_vae_dir, run_script):
    """Same global batch (the seedable sampler gives rank r the r-th half of the 1-process batch), the same SE
    factor per step, DDP's gradient mean = the big batch's mean: the weights agree to float round-off. The posterior
    mean is decoded (``--latent_sampling mode``) because posterior noise is drawn per process."""
    common = [
        "--pretrained_model_name_or_path", tiny_vae_dir, "--resolution", 32, "--report_to", "none",
        "--validation_steps", 100, "--num_validation_images", 2, "--learning_rate", 1e-3, "--lpips_weight", 0,
        "--latent_sampling", "mode", "--max_train_steps", 4, "--seed", 3,
    ]  # fmt: skip
    run_script("train_ae_se.py", [*common, "--train_batch_size", 4, "--output_dir", tmp_path / "one"])
    launcher = Forked(29541)
    two = [*common, "--train_batch_size", 2, "--output_dir", tmp_path / "two"]
    proc = run_script("train_ae_se.py", two, launcher=launcher, extra_env={"ACCELERATE_USE_CPU": "1"})
    assert "global batch 4 images (2 per process x 2 processes" in proc.stdout + proc.stderr
    one, two = (load_file(str(tmp_path / d / "diffusion_pytorch_model.safetensors")) for d in ("one", "two"))
    start = load_file(os.path.join(tiny_vae_dir, "diffusion_pytorch_model.safetensors"))
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # training changed the weights ...
    for key in one:  # ... and both runs changed them the same way
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=2e-5)


@pytest.mark.parametrize("script", ["train_ae_se", "train_dit_flow"])
def test_training_scripts_refuse_fsdp1_up_front(script, monkeypatch, tmp_path):
    module = load_script(script)
    data = ["--latents_dir", str(tmp_path)] if script == "train_dit_flow" else []
    args = module.parse_args([*data, "--output_dir", str(tmp_path / "out")])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config ...
    monkeypatch.setenv("FSDP_VERSION", "1")  # ... with `fsdp_version: 1`
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        module.main(args)
    assert not (tmp_path / "out").exists()
