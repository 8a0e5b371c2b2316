"""``--compile`` in the training scripts: the trained network is compiled in place (dynamo traces it: its graph is
logged), trains to the weights eager training gives from the same seed, and saves under the same names; refused
under FSDP. The ``aot_eager`` backend keeps this fast (no code generation); benchmarks/bench_compile.py's smoke test
runs inductor on the same steps."""

import sys

import pytest
import torch
from safetensors.torch import load_file

from testing_utils import load_script

# their own processes where the traced-graph check reads stderr: TORCH_LOGS is read when torch is imported
PYTHON, CPU = [sys.executable], {"ACCELERATE_USE_CPU": "1"}

TRACE = {"TORCH_LOGS": "graph_code"}  # dynamo prints each graph it captured ("TRACED GRAPH") to stderr


def close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def test_dit_compile_trains_like_eager(tmp_path, run_script, tiny_vae_dir):
    latents = tmp_path / "latents"
    run_script(
        "extract_latents.py",
        ["--pretrained_model_name_or_path", tiny_vae_dir, "--output_dir", latents, "--max_samples", 8,
         "--resolution", 32],
    )  # fmt: skip
    common = ["--latents_dir", latents, "--pretrained_vae_model_name_or_path", tiny_vae_dir, "--model", "DiT-tiny/2",
              "--train_batch_size", 4, "--max_train_steps", 3, "--report_to", "none", "--num_inference_steps", 2,
              "--learning_rate", 1e-3, "--lr_warmup_steps", 1, "--validation_steps", 2]  # fmt: skip
    eager = run_script(
        "train_dit_flow.py", [*common, "--output_dir", tmp_path / "eager"], launcher=PYTHON, extra_env={**TRACE, **CPU}
    )
    assert "TRACED GRAPH" not in eager.stderr
    proc = run_script(
        "train_dit_flow.py", [*common, "--output_dir", tmp_path / "compiled", "--compile", "--compile_backend",
                              "aot_eager"], launcher=PYTHON, extra_env={**TRACE, **CPU},
    )  # fmt: skip
    assert "TRACED GRAPH" in proc.stderr and "selfcond_dit.py" in proc.stderr  # the DiT's own code was traced
    weights = [load_file(tmp_path / d / "transformer" / "diffusion_pytorch_model.safetensors")
               for d in ("eager", "compiled")]  # fmt: skip
    close(*weights)  # same names (no `_orig_mod.` prefix), same training


def test_ae_compile_trains_like_eager(tmp_path, run_script, tiny_vae_dir):
    common = ["--pretrained_model_name_or_path", tiny_vae_dir, "--resolution", 32, "--train_batch_size", 2,
              "--max_train_steps", 2, "--validation_steps", 100, "--num_validation_images", 1, "--learning_rate", 1e-3,
              "--report_to", "none", "--latent_sampling", "mode", "--lpips_weight", 0, "--latent_stats_num_samples",
              2]  # fmt: skip
    run_script("train_ae_se.py", [*common, "--output_dir", tmp_path / "eager"], extra_env=CPU)  # in this process
    proc = run_script(
        "train_ae_se.py", [*common, "--output_dir", tmp_path / "compiled", "--compile", "--compile_backend",
                           "aot_eager"], launcher=PYTHON, extra_env={**TRACE, **CPU},
    )  # fmt: skip
    # The encoder's and the decoder's own forward were traced (diffusers' vae.py), at the SE branch's sizes too
    assert "TRACED GRAPH" in proc.stderr and "autoencoders/vae.py" in proc.stderr
    weights = [load_file(tmp_path / d / "diffusion_pytorch_model.safetensors") for d in ("eager", "compiled")]
    close(*weights)
    assert "error:" not in proc.stderr


def test_compile_is_refused_under_fsdp(tmp_path, monkeypatch, capsys):
    module = load_script("train_ae_se")
    args = module.parse_args(["--output_dir", str(tmp_path / "out"), "--compile"])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="--compile is not supported under FSDP"):
        module.main(args)
    assert not (tmp_path / "out").exists()
