"""DeepSpeed ZeRO-2 in the training scripts, on 2 CPU processes (gloo): accelerate's real DeepSpeed path
(``deepspeed.initialize``, the ZeRO-2 optimizer, the engine stepping inside ``accelerator.backward``, DeepSpeed's own
checkpoints), entered through ``tests/deepspeed_on_cpu.py`` (accelerate picks no backend for CPU processes) and
launched by ``accelerate launch`` with a CPU copy of ``accelerate_configs/deepspeed_zero2.yaml``. The model trained
under ZeRO-2 equals the one DDP trains from the same seed (to float noise; with --max_grad_norm small enough to clip),
saves as a stock diffusers model and resumes exactly; a step with a non-finite loss is skipped as under DDP; bf16 and
fp16 are refused before any weights load. DeepSpeed's CPU communication op is compiled on first use (once a machine).
"""

import os
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffusability_hf.errors import UsageError
from diffusability_hf.training.launch import check_launcher, configure_deepspeed
from diffusability_hf.training.steps import NonFiniteGuard, NonFiniteLossError

from testing_utils import (
    DIT_TINY,
    ROOT,
    Forked,
    accelerate_launcher,
    distributed_dit_args,
    distributed_se_args,
    load_script,
    transformer_weights,
)

SHIM = os.path.join(ROOT, "tests", "deepspeed_on_cpu.py")
CPU = {"ACCELERATE_USE_CPU": "1"}  # DDP only: with it, accelerate would drop DeepSpeed and run DDP


def deepspeed_config(tmp_path):
    """accelerate_configs/deepspeed_zero2.yaml for 2 CPU processes (it is fp32 already)."""
    with open(os.path.join(ROOT, "accelerate_configs", "deepspeed_zero2.yaml")) as fh:
        config = yaml.safe_load(fh)
    assert config["mixed_precision"] == "no"
    config.update(num_processes=2)
    path = tmp_path / "deepspeed_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def assert_same_weights(got, want, rtol=1e-4, atol=2e-6):
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=key)


def test_dit_under_deepspeed_equals_ddp_saves_a_stock_model_and_resumes_exactly(
    tmp_path, embedded_latents, ddp_reference, run_script
):
    config = deepspeed_config(tmp_path)
    common = distributed_dit_args(embedded_latents)  # --max_grad_norm 0.05: DeepSpeed must clip at it, not at 1.0
    ddp_dir = ddp_reference("train_dit_flow.py", common, 29571)
    proc = run_script("train_dit_flow.py", [*common, "--output_dir", tmp_path / "ds"],
                      launcher=accelerate_launcher(config, 29572, SHIM))  # fmt: skip
    assert "Distributed environment: DistributedType.DEEPSPEED" in proc.stderr  # DeepSpeed's path, not DDP
    assert "'gradient_clipping': 0.05" in proc.stdout + proc.stderr  # --max_grad_norm, not accelerate's 1.0
    ds, ddp = transformer_weights(tmp_path / "ds"), transformer_weights(ddp_dir)
    assert_same_weights(ds, ddp)
    snap = os.path.join("snapshots", "step-2")  # the EMA pipeline at step 2 too
    assert_same_weights(transformer_weights(tmp_path / "ds" / snap), transformer_weights(ddp_dir / snap))
    # DeepSpeed's checkpoint format: the ZeRO-2 optimizer states, one partition per process
    zero = sorted(os.listdir(tmp_path / "ds" / "checkpoint-2" / "pytorch_model"))
    assert zero == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # fmt: skip

    from diffusability_hf.pipelines import DiTFlowMatchPipeline

    pipe = DiTFlowMatchPipeline.from_pretrained(str(tmp_path / "ds"))
    key = next(iter(ds))
    torch.testing.assert_close(pipe.transformer.state_dict()[key], ds[key])

    # Resume from checkpoint-2 under DeepSpeed: the straight run's final weights
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "ds" / "checkpoint-2", resumed / "checkpoint-2")
    proc = run_script("train_dit_flow.py", [*common, "--output_dir", resumed, "--resume_from_checkpoint", "latest"],
                      launcher=Forked(29573, config=config, shim=SHIM))  # fmt: skip
    assert f"Resuming from {resumed / 'checkpoint-2'}" in proc.stderr
    assert_same_weights(transformer_weights(resumed), ds, rtol=1e-5, atol=1e-6)


def test_a_non_finite_step_under_deepspeed_is_skipped_as_under_ddp(tmp_path, embedded_latents, run_script):
    """One latent of 16 is 1e38 (finite on disk, so the readers take it; the loss overflows to inf): the steps that
    draw it skip their backward on both processes (the engine, which steps inside the backward, does not step) and
    move the schedule on; the finite steps train as under DDP."""
    broken = tmp_path / "some_nan"
    shutil.copytree(embedded_latents, broken)
    for shard in sorted(broken.glob("shard-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        tensors["mean"][:1] = 1e38  # in one step of each epoch
        save_file(tensors, str(shard), metadata=header)
    common = ["--latents_dir", broken, *DIT_TINY, "--max_train_steps", 4, "--validation_steps", 100,
              "--max_nonfinite_steps", 0]  # fmt: skip
    run_script("train_dit_flow.py", [*common, "--output_dir", tmp_path / "ddp"], launcher=Forked(29574),
               extra_env=CPU)  # fmt: skip
    run_script("train_dit_flow.py", [*common, "--output_dir", tmp_path / "ds"],
               launcher=Forked(29575, config=deepspeed_config(tmp_path), shim=SHIM))  # fmt: skip
    runs = [yaml.safe_load((tmp_path / d / "metrics.json").read_text()) for d in ("ddp", "ds")]
    assert runs[0]["nonfinite_steps"] == runs[1]["nonfinite_steps"]
    assert runs[1]["nonfinite_steps"] == 2  # 2 epochs of 2 steps: one skipped in each
    assert_same_weights(transformer_weights(tmp_path / "ds"), transformer_weights(tmp_path / "ddp"))


def test_se_fine_tuning_under_deepspeed_equals_ddp_and_resumes_exactly(
    tmp_path, tiny_vae_dir, ddp_reference, run_script
):
    """train_ae_se.py on the tiny AutoencoderKL (``testing_utils.distributed_se_args``: LPIPS on, a frozen network
    inside the engine's module; output layers frozen; every step clipped)."""
    from diffusers import AutoencoderKL

    config = deepspeed_config(tmp_path)
    common = distributed_se_args(tiny_vae_dir)
    ddp_dir = ddp_reference("train_ae_se.py", common, 29576)
    proc = run_script("train_ae_se.py", [*common, "--output_dir", tmp_path / "ds"],
                      launcher=Forked(29577, config=config, shim=SHIM))  # fmt: skip
    assert "Distributed environment: DistributedType.DEEPSPEED" in proc.stderr
    assert "step 2: val image PSNR" in proc.stderr

    def weights(folder):
        return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))

    ds, base = weights(tmp_path / "ds"), weights(tiny_vae_dir)
    assert_same_weights(ds, weights(ddp_dir))
    assert torch.equal(ds["decoder.conv_out.weight"], base["decoder.conv_out.weight"])  # frozen (Sec. 3.3)
    assert not torch.equal(ds["encoder.conv_in.weight"], base["encoder.conv_in.weight"])  # trained
    assert isinstance(AutoencoderKL.from_pretrained(str(tmp_path / "ds")), AutoencoderKL)  # stock diffusers

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "ds" / "checkpoint-2", resumed / "checkpoint-2")
    run_script("train_ae_se.py", [*common, "--output_dir", resumed, "--resume_from_checkpoint", "latest"],
               launcher=Forked(29578, config=config, shim=SHIM))  # fmt: skip
    assert_same_weights(weights(resumed), ds, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("script", ["train_ae_se", "train_dit_flow"])
@pytest.mark.parametrize("config_precision, flag", [("bf16", None), ("no", "fp16"), ("no", "bf16")])
def test_deepspeed_with_bf16_or_fp16_is_refused_up_front(script, config_precision, flag, monkeypatch, tmp_path):
    module = load_script(script)
    data = ["--latents_dir", str(tmp_path)] if script == "train_dit_flow" else []
    precision = ["--mixed_precision", flag] if flag else []
    args = module.parse_args([*data, *precision, "--output_dir", str(tmp_path / "out")])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", config_precision)  # ... and its mixed_precision
    with pytest.raises(ValueError, match=f"DeepSpeed with {flag or config_precision} is not supported.*fsdp.yaml"):
        module.main(args)
    assert not (tmp_path / "out").exists()


def test_a_deepspeed_config_file_with_bf16_is_refused(monkeypatch, tmp_path):
    (tmp_path / "ds.json").write_text('{"bf16": {"enabled": true}, "zero_optimization": {"stage": 2}}')
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "ds.json"))
    with pytest.raises(UsageError, match="DeepSpeed with bf16"):
        check_launcher()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    check_launcher()  # not DeepSpeed: nothing to refuse


class DeepSpeedAccelerator:
    """The few attributes of a prepared-for-DeepSpeed ``Accelerator`` the library reads."""

    from accelerate.utils import DistributedType

    distributed_type, num_processes = DistributedType.DEEPSPEED, 1

    def __init__(self, config, accumulation=1):
        self.gradient_accumulation_steps = accumulation
        self.state = type("State", (), {"deepspeed_plugin": type("Plugin", (), {"deepspeed_config": config})})


def test_deepspeed_takes_the_scripts_clipping_and_batch_and_refuses_another_clipping():
    config = {"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto"}
    configure_deepspeed(DeepSpeedAccelerator(config), 4, 16.0)
    assert config == {"gradient_clipping": 16.0, "train_micro_batch_size_per_gpu": 4}
    configure_deepspeed(DeepSpeedAccelerator({"gradient_clipping": 16.0}), 4, 16.0)  # the same value: fine
    later = {"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto"}
    configure_deepspeed(DeepSpeedAccelerator(later), None, 16.0)  # make_accelerator: the batch is not known yet
    assert later == {"gradient_clipping": 16.0, "train_micro_batch_size_per_gpu": "auto"}
    with pytest.raises(UsageError, match="clips gradients at 1.0 and --max_grad_norm is 16.0"):
        configure_deepspeed(DeepSpeedAccelerator({"gradient_clipping": 1.0}), 4, 16.0)


def test_a_non_finite_micro_batch_under_deepspeed_with_accumulation_stops_the_run():
    nan, ok = torch.tensor(float("nan")), torch.tensor(1.0)
    guard = NonFiniteGuard(max_in_a_row=3)
    assert not guard.finite(nan, DeepSpeedAccelerator({}, accumulation=1))  # skipped, as under DDP
    assert guard.finite(ok, DeepSpeedAccelerator({}, accumulation=2))
    with pytest.raises(NonFiniteLossError, match="--gradient_accumulation_steps 1"):
        guard.finite(nan, DeepSpeedAccelerator({}, accumulation=2))
