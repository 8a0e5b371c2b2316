"""``--compile`` in the training scripts: the trained network is compiled in place (dynamo traces it: its graph is
logged), trains to the weights eager training gives from the same seed, and saves under the same names; refused
under FSDP. The ``aot_eager`` backend keeps this fast (no code generation); benchmarks/bench_compile.py's smoke test
runs inductor on the same steps."""

import os

import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    eager = run_script("train_dit_flow.py", [*common, "--output_dir", tmp_path / "eager"], extra_env=TRACE)
    assert "TRACED GRAPH" not in eager.stderr
    proc = run_script(
        "train_dit_flow.py", [*common, "--output_dir", tmp_path / "compiled", "--compile", "--compile_backend",
                              "aot_eager"], extra_env=TRACE,
    )  # fmt: skip
    assert "TRACED GRAPH" in proc.stderr and "selfcond_dit.py" in proc.stderr  # the DiT's own code was traced
    weights = [load_file(tmp_path / d / "transformer" / "diffusion_pytorch_model.safetensors")
               for d in ("eager", "compiled")]  # fmt: skip
    close(*weights)  # same names (no `_orig_mod.` prefix), same training
