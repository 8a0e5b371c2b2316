"""FSDP2 in the training scripts, on 2 CPU processes (gloo): accelerate's real FSDP path entered through
``tests/fsdp_on_cpu.py`` (accelerate only picks FSDP for accelerator devices), launched by ``accelerate launch`` with
a CPU copy of ``accelerate_configs/fsdp.yaml``. The model trained under FSDP equals the one DDP trains from the same
seed (to float noise), saves as a stock diffusers model, and resumes exactly; the library's gather and EMA shards are
checked against whole tensors."""

import os
import subprocess
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from testing_utils import (
    ROOT,
    Forked,
    accelerate_launcher,
    distributed_dit_args,
    distributed_se_args,
    forked_processes,
    transformer_weights,
)

SHIM = os.path.join(ROOT, "tests", "fsdp_on_cpu.py")


def fsdp_config(tmp_path):
    """accelerate_configs/fsdp.yaml for 2 CPU processes in float32."""
    with open(os.path.join(ROOT, "accelerate_configs", "fsdp.yaml")) as fh:
        config = yaml.safe_load(fh)
    config.update(num_processes=2, mixed_precision="no", use_cpu=False)
    path = tmp_path / "fsdp_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


CPU = {"ACCELERATE_USE_CPU": "1"}


def test_the_library_gathers_full_weights_and_keeps_the_ema_over_shards(tmp_path):
    """``fully_shard`` on 2 processes: ``gather_into`` gives the main process the full weights and the full EMA, equal
    to an EMA of the whole tensors; the EMA shards saved per process load back exactly."""
    program = tmp_path / "prog.py"
    program.write_text(
        textwrap.dedent(
            f"""
            import os, torch, torch.distributed as dist, torch.nn as nn
            from torch.distributed.fsdp import fully_shard
            from diffusability_hf.training.ema import EMA
            from diffusability_hf.training import fsdp as F

            class Acc:  # the few Accelerator attributes the library reads
                from accelerate.utils import DistributedType
                distributed_type = DistributedType.FSDP
                num_processes, process_index = 2, int(os.environ["RANK"])
                is_main_process, device = process_index == 0, torch.device("cpu")

            dist.init_process_group("gloo")
            acc = Acc()
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))  # 10 rows: 5 per process
            model[2].weight.requires_grad_(False)
            plain = F.plain_copy(model, acc)
            whole = [p.detach().clone() for p in model.parameters() if p.requires_grad]
            fully_shard(model[0]); fully_shard(model)
            trainable = [p for p in model.parameters() if p.requires_grad]
            ema, ema_whole = EMA(trainable, 2.0), EMA(whole, 2.0)
            opt = torch.optim.SGD(trainable, lr=0.1)
            for step in range(1, 4):
                torch.manual_seed(step)  # the same batch on both processes
                model(torch.randn(4, 6)).square().mean().backward()
                opt.step(); opt.zero_grad()
                ema.update(trainable, step)
                ema_whole.update([p.full_tensor() for p in trainable], step)
            F.save_ema_state(ema, "{tmp_path}", acc)
            dist.barrier()
            copy = F.gather_into(plain, model, ema, trainable_only=True)
            full = F.full_state_dict(model)
            reloaded = EMA(trainable, 2.0)
            F.load_ema_state(reloaded, "{tmp_path}", acc)
            assert reloaded.num_updates == 3
            for a, b in zip(reloaded.shadow, ema.shadow):
                assert torch.equal(a.to_local(), b.to_local())
            assert ema.shadow[0].to_local().shape == (5, 6)  # a shard, not the whole tensor
            if acc.is_main_process:
                assert F.local_checksum(model.parameters()).shape == (1,)
                tracked = [p for p in copy.parameters() if p.requires_grad]
                for p, s in zip(tracked, ema_whole.shadow):
                    torch.testing.assert_close(p.detach(), s, rtol=0, atol=1e-6)
                torch.testing.assert_close(copy[2].weight, full["2.weight"], rtol=0, atol=0)  # frozen: the weights
                assert not any(torch.equal(p.detach(), s) for p, s in zip(tracked, whole))  # training moved them
                print("GATHER-OK")
            else:
                assert copy is None
            dist.destroy_process_group()
            """
        )
    )
    proc = forked_processes(2, 29561, [str(program)], dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "GATHER-OK" in proc.stdout


def test_dit_under_fsdp_equals_ddp_saves_a_stock_model_and_resumes_exactly(
    tmp_path, embedded_latents, ddp_reference, run_script
):
    config = fsdp_config(tmp_path)
    common = distributed_dit_args(embedded_latents)
    ddp_dir = ddp_reference("train_dit_flow.py", common, 29562)
    proc = run_script("train_dit_flow.py", [*common, "--output_dir", tmp_path / "fsdp"],
                      launcher=Forked(29563, config=config, shim=SHIM), extra_env=CPU)  # fmt: skip
    assert "Distributed environment: DistributedType.FSDP" in proc.stderr  # accelerate's own FSDP path, not DDP
    assert "FSDP2: 2 processes; each SelfConditionedDiTBlock sharded on its own" in proc.stderr
    ddp, fsdp = transformer_weights(ddp_dir), transformer_weights(tmp_path / "fsdp")
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=2e-6, msg=key)
    # The EMA shards are per process; the snapshot at step 2 (gathered EMA weights) equals DDP's too
    assert sorted(os.listdir(tmp_path / "fsdp" / "checkpoint-2")).count("ema_rank1.safetensors") == 1
    snap = os.path.join("snapshots", "step-2")
    for key, value in transformer_weights(ddp_dir / snap).items():
        torch.testing.assert_close(transformer_weights(tmp_path / "fsdp" / snap)[key], value, rtol=1e-4, atol=2e-6)

    # Saved as a plain diffusers model: the toolkit's pipeline class loads it, no DTensor anywhere
    from diffusability_hf.pipelines import DiTFlowMatchPipeline

    pipe = DiTFlowMatchPipeline.from_pretrained(str(tmp_path / "fsdp"))
    assert all(type(p) is torch.nn.Parameter for p in pipe.transformer.parameters())
    torch.testing.assert_close(pipe.transformer.state_dict()[next(iter(fsdp))], next(iter(fsdp.values())))

    # Resume from checkpoint-2 under FSDP: the same final weights as the straight FSDP run (EMA shards included)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    subprocess.run(["cp", "-r", str(tmp_path / "fsdp" / "checkpoint-2"), str(resumed)], check=True)
    proc = run_script("train_dit_flow.py", [*common, "--output_dir", resumed, "--resume_from_checkpoint", "latest"],
                      launcher=Forked(29564, config=config, shim=SHIM), extra_env=CPU)  # fmt: skip
    assert f"Resuming from {resumed / 'checkpoint-2'}" in proc.stderr
    for key, value in transformer_weights(resumed).items():
        torch.testing.assert_close(value, fsdp[key], rtol=1e-5, atol=1e-6, msg=key)


def test_se_fine_tuning_under_fsdp_equals_ddp_and_resumes_exactly(tmp_path, tiny_vae_dir, ddp_reference, run_script):
    """train_ae_se.py: the paper's setting (FSDP) on the tiny AutoencoderKL (``testing_utils.distributed_se_args``:
    output layers frozen, LPIPS on, every step clipped)."""
    from diffusers import AutoencoderKL

    config = fsdp_config(tmp_path)
    common = distributed_se_args(tiny_vae_dir)
    ddp_dir = ddp_reference("train_ae_se.py", common, 29565)
    proc = run_script("train_ae_se.py", [*common, "--output_dir", tmp_path / "fsdp"],
                      launcher=accelerate_launcher(config, 29566, SHIM), extra_env=CPU)  # fmt: skip
    assert "Distributed environment: DistributedType.FSDP" in proc.stderr
    assert "FSDP2: 2 processes; each DownEncoderBlock2D, ResnetBlock2D, UpDecoderBlock2D sharded" in proc.stderr
    assert "step 2: val image PSNR" in proc.stderr  # validation ran on the gathered EMA weights

    def weights(folder):
        return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))

    ddp, fsdp, base = weights(ddp_dir), weights(tmp_path / "fsdp"), weights(tiny_vae_dir)
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=2e-6, msg=key)
    assert torch.equal(fsdp["decoder.conv_out.weight"], base["decoder.conv_out.weight"])  # frozen (Sec. 3.3)
    assert not torch.equal(fsdp["encoder.conv_in.weight"], base["encoder.conv_in.weight"])  # trained
    assert isinstance(AutoencoderKL.from_pretrained(str(tmp_path / "fsdp")), AutoencoderKL)  # stock diffusers

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    subprocess.run(["cp", "-r", str(tmp_path / "fsdp" / "checkpoint-2"), str(resumed)], check=True)
    run_script("train_ae_se.py", [*common, "--output_dir", resumed, "--resume_from_checkpoint", "latest"],
               launcher=Forked(29567, config=config, shim=SHIM), extra_env=CPU)  # fmt: skip
    for key, value in weights(resumed).items():
        torch.testing.assert_close(value, fsdp[key], rtol=1e-5, atol=1e-6, msg=key)


def test_lora_under_fsdp_equals_ddp(tmp_path, tiny_vae_dir, run_script):
    """train_ae_se.py --use_lora under FSDP: the LoRA factors train inside the sharded blocks beside their frozen base
    weights and the frozen output layers; the merged model and the adapter equal DDP's."""
    config = fsdp_config(tmp_path)
    common = ["--pretrained_model_name_or_path", tiny_vae_dir, "--resolution", 32, "--train_batch_size", 2,
              "--max_train_steps", 2, "--learning_rate", 1e-2, "--report_to", "none", "--latent_sampling", "mode",
              "--latent_stats_num_samples", 4, "--ema_halflife_steps", 2, "--seed", 3, "--lpips_weight", 0,
              "--use_lora", "--lora_rank", 2]  # fmt: skip
    run_script("train_ae_se.py", [*common, "--output_dir", tmp_path / "ddp"], launcher=Forked(29568),
               extra_env=CPU)  # fmt: skip
    proc = run_script("train_ae_se.py", [*common, "--output_dir", tmp_path / "fsdp"],
                      launcher=Forked(29569, config=config, shim=SHIM), extra_env=CPU)  # fmt: skip
    assert "Distributed environment: DistributedType.FSDP" in proc.stderr
    base = load_file(os.path.join(tiny_vae_dir, "diffusion_pytorch_model.safetensors"))
    for name in ["diffusion_pytorch_model.safetensors", os.path.join("lora", "adapter_model.safetensors")]:
        ddp, fsdp = load_file(tmp_path / "ddp" / name), load_file(tmp_path / "fsdp" / name)
        assert ddp.keys() == fsdp.keys() and ddp
        for key in ddp:
            torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=2e-6, msg=key)
    merged = load_file(tmp_path / "fsdp" / "diffusion_pytorch_model.safetensors")
    assert merged.keys() == base.keys()  # plain diffusers keys: the adapter merged
    assert torch.equal(merged["decoder.conv_out.weight"], base["decoder.conv_out.weight"])  # frozen, no LoRA
    assert not torch.equal(merged["encoder.conv_in.weight"], base["encoder.conv_in.weight"])  # LoRA merged in


def test_blocks_to_shard_and_scalar_parameters_refused():
    from accelerate.utils import DistributedType
    from diffusers import AutoencoderKL

    from diffusability_hf.autoencoders import EMBEDDED_AE
    from diffusability_hf.models.factory import build_transformer, transformer_config
    from diffusability_hf.training.fsdp import FSDPLaunchError, block_classes, shard_blocks

    dit = build_transformer(transformer_config([4, 8, 8], 3, "DiT-tiny/2", None, None), pos_embed="rope")
    assert block_classes(dit) == ["SelfConditionedDiTBlock"]  # not the layers inside a block's lists
    stock = build_transformer(transformer_config([4, 8, 8], 3, "DiT-tiny/2", None, None), stock_dit=True)
    assert block_classes(stock) == ["BasicTransformerBlock"]
    vae = AutoencoderKL.from_pretrained(EMBEDDED_AE)
    assert block_classes(vae) == ["DownEncoderBlock2D", "ResnetBlock2D", "UpDecoderBlock2D"]  # + the mid resnets

    class Accelerator:
        distributed_type = DistributedType.FSDP

    module = torch.nn.Sequential(torch.nn.Linear(2, 2))
    module.register_parameter("multiplier", torch.nn.Parameter(torch.tensor(1000.0)))
    with pytest.raises(FSDPLaunchError, match="scalar parameter multiplier .*multi_gpu.yaml"):
        shard_blocks(Accelerator(), module)
