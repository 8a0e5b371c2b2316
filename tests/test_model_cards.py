"""Model card templates and the helpers that fill them: front matter (license from the base model, base_model only
for Hub repo ids) and the SE autoencoder's card from a run's metrics; the scripts' end-to-end tests check the
rendered cards of real runs (rendering raises on a placeholder without a value)."""

import os
import re

import pytest
from huggingface_hub import ModelCard

from diffusability_hf.hub import (
    MODEL_CARDS_DIR,
    card_license,
    compatibility_text,
    dataset_description,
    dit_pipeline_card_fields,
    hub_repo_id,
    license_sentence,
    metadata_yaml,
    parse_front_matter,
    read_card_metadata,
    render_model_card,
    render_template,
    se_autoencoder_card_fields,
    usage_snippet,
)

TEMPLATES = ["dit_pipeline", "se_autoencoder"]


def placeholders(name):
    with open(os.path.join(MODEL_CARDS_DIR, f"{name}.md")) as fh:
        return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", fh.read()))


def run_metrics(video=False, cross=True):
    """A metrics.json as train_ae_se.py writes it (images at the top level, clips under "video")."""

    def entry(kind, n):
        psnrs = dict(base_encoder_base_decoder=30.0, base_encoder_new_decoder=25.0, new_encoder_base_decoder=24.0,
                     new_encoder_new_decoder=30.5)  # fmt: skip
        out = {"before": {"psnr": 30.0, "hf_share": 0.2}, "after": {"psnr": 30.5, "hf_share": 0.1},
               f"num_validation_{kind}s": n, "validation": {"source": "held out, never trained on"}}  # fmt: skip
        return {**out, "cross_decoding_psnr": psnrs} if cross else out

    norm = {"num_samples": 8, "kind": "images", "normalized_std_with_base_values": 0.5, "reestimated": True,
            "form": "global scale", "normalized_std_with_saved_values": 1.0, "saved": {"scaling_factor": 0.4}}  # fmt: skip
    metrics = {"base_model": "owner/base", "base_weights_fingerprint": "b" * 16, "weights_fingerprint": "f" * 16,
               **entry("image", 8), "latent_normalization": {"base": {"scaling_factor": 0.2}, **norm},
               "train_steps": 300}  # fmt: skip
    return {**metrics, "video": entry("video", 4)} if video else metrics


def card_fields(metrics, **overrides):
    kwargs = dict(class_name="AutoencoderKL", se_weight=0.25, scale_factors="2 4", num_frames=17,
                  decode_timestep=0.05, timestep_conditioning=False, global_batch="32 images", trainable=1000,
                  total=2000, dataset="local image folder", base_id="owner/base", license_fields={"license": "mit"})  # fmt: skip
    return se_autoencoder_card_fields(metrics, {"learning_rate": 1e-5, "lora_rank": None}, **{**kwargs, **overrides})


@pytest.mark.parametrize("video", [False, True])
def test_the_se_card_fills_every_placeholder_of_its_template(video):
    fields = card_fields(run_metrics(video=video), class_name="AutoencoderKLCogVideoX" if video else "AutoencoderKL")
    assert set(fields) == placeholders("se_autoencoder")
    card = render_model_card("se_autoencoder", fields)
    assert ModelCard(card).data.to_dict()["base_model"] == "owner/base" and "{{" not in card
    assert "| PSNR (dB) | 30.00 | 30.50 |" in card and "| `learning_rate` | `1e-05` |" in card
    assert "lora_rank" not in card  # unset settings are left out
    assert "8 images (held out, never trained on)" in card and "| this encoder -> base decoder | 24.00 |" in card
    assert "re-estimated (global scale) on posterior samples of 8 training images" in card
    assert ("PSNR (clips) (dB)" in card and "4 clips of 17 frames" in card and "reconstruction.gif" in card) == video
    assert "trainable parameters: 1,000 of 2,000" in card


def test_the_se_card_of_a_random_init_has_no_cross_decoding_and_clip_only_runs_work():
    assert "there is no base to cross-decode with" in card_fields(run_metrics(cross=False))["compatibility"]
    assert "there is no base to cross-decode with" in compatibility_text(None)
    clips_only = {k: v for k, v in run_metrics(video=True).items() if k not in ("before", "after")}
    fields = card_fields(clips_only)
    assert "PSNR (dB)" not in fields["results_table"] and "PSNR (clips) (dB)" in fields["results_table"]


def test_card_parts_say_what_the_run_trained_on_and_how_to_use_it():
    assert dataset_description() == "scikit-image sample photographs (embedded)"
    assert dataset_description("ILSVRC/imagenet-1k") == "ILSVRC/imagenet-1k"
    assert dataset_description(train_data_dir="d", video=True) == (
        "local image folder; clips: camera pans over the embedded photographs and scikit-image's GIF"
    )
    assert dataset_description(video_data_dir="v", video=True, images=False) == "no images; clips: local video folder"
    snippet = usage_snippet("AutoencoderKLLTXVideo", 9, 0.05, timestep_conditioning=True)
    assert "torch.rand(1, 3, 9, 256, 256)" in snippet and "temb=torch.tensor([0.05])" in snippet
    assert "vae.enable_tiling()" in usage_snippet("AutoencoderKLAllegro", 17)
    assert "torch.rand(1, 3, 256, 256)" in usage_snippet("AutoencoderKL")


@pytest.mark.parametrize("name", TEMPLATES)
def test_rendered_front_matter_parses_with_the_hubs_parser(name):
    fields = {key: f"value-of-{key}" for key in placeholders(name)}
    fields["card_metadata"] = metadata_yaml("black-forest-labs/FLUX.1-dev", {"license": "other", "license_name": "x"})
    card = render_model_card(name, fields)
    meta = ModelCard(card).data.to_dict()
    assert meta["library_name"] == "diffusers" and meta["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert {"diffusability", "scale-equivariance", "diffusers"} <= set(meta["tags"])
    assert (meta["license"], meta["license_name"]) == ("other", "x")
    assert "arxiv.org/abs/2502.14831" in card and "{{" not in card
    assert "## Usage" in card and "## Hyperparameters" in card


def test_render_refuses_a_missing_value():
    with pytest.raises(KeyError, match="needs values for \\['b'\\]"):
        render_template("{{ a }} and {{b}}", {"a": 1})
    assert render_template("{{ a }} and {{a}}", {"a": 1}) == "1 and 1"


def test_hub_repo_id_only_for_repo_names(tmp_path, monkeypatch):
    assert hub_repo_id("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    assert hub_repo_id(str(tmp_path)) is None and hub_repo_id("./local/dir/x") is None
    assert hub_repo_id("just-a-name") is None and hub_repo_id(None) is None
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    monkeypatch.chdir(tmp_path)  # a local folder named like a repo id is local
    assert hub_repo_id("owner/name") is None


def write_card(folder, front):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(f"---\n{front}---\n\n# A model\n")


def test_license_comes_from_the_base_models_card(tmp_path):
    write_card(tmp_path / "base", "license: mit\ntags:\n- x\n")
    assert card_license(None, str(tmp_path / "base")) == {"license": "mit"}
    # A pipeline's vae subfolder: the card is one level up
    write_card(tmp_path / "pipe", "license: other\nlicense_name: flux-1-dev\nlicense_link: https://x/LICENSE\n")
    (tmp_path / "pipe" / "vae").mkdir()
    fields = card_license(None, str(tmp_path / "pipe" / "vae"))
    assert fields == {"license": "other", "license_name": "flux-1-dev", "license_link": "https://x/LICENSE"}
    assert license_sentence(fields, "b") == "License: flux-1-dev (https://x/LICENSE)"
    # Given wins; no base = the toolkit's own weights; an unreadable base = unknown, and the card says so
    assert card_license("cc-by-4.0", str(tmp_path / "base")) == {"license": "cc-by-4.0"}
    assert card_license(None, None) == {"license": "apache-2.0"}
    assert card_license(None, str(tmp_path / "nothing-here")) == {}
    assert "check it" in license_sentence({}, "owner/model")


def test_offline_hub_base_without_cached_card_is_unknown_and_quick(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: nothing is fetched, the answer is "unknown"
    assert read_card_metadata("someone/not-cached", cache_dir=str(tmp_path), online=True) == {}


def test_front_matter_parsing_and_yaml_quoting():
    assert parse_front_matter("no front matter") == {} and parse_front_matter("---\nunclosed") == {}
    text = "---\n" + metadata_yaml("a/b", {"license": "other", "license_name": "name: with colon"}) + "---\nbody"
    assert parse_front_matter(text) == {"base_model": "a/b", "license": "other", "license_name": "name: with colon"}
    assert metadata_yaml("/local/path", {}) == ""


def test_the_dit_card_fills_every_placeholder_of_its_template():
    import torch

    meta = {"ae": "owner/vae", "ae_class": "AutoencoderKL", "ae_weights_fingerprint": "a" * 16, "num_classes": 2,
            "vae_weights_fingerprint": "b" * 16, "dataset": "d", "id2label": {"0": "cat", "1": "dog"}}  # fmt: skip
    fields = dit_pipeline_card_fields(
        meta, {"learning_rate": 3e-4, "hub_model_id": None}, transformer=torch.nn.Linear(1000, 1000), model="DiT-S/2",
        steps=10, seconds=90.0, final_loss=0.5, global_batch="8 latents", num_inference_steps=4, guidance_scale=1.5,
        shift=1.0, base_id="owner/vae", license_fields={"license": "mit"},
    )  # fmt: skip
    assert set(fields) == placeholders("dit_pipeline")
    card = render_model_card("dit_pipeline", fields)
    assert ModelCard(card).data.to_dict()["base_model"] == "owner/vae" and "{{" not in card
    assert "Linear, DiT-S/2, 1.0M parameters" in card and "Steps: 10 (1.5 min)" in card
    assert "final training loss 0.5000" in card and '["cat"]' in card
    assert "| `learning_rate` | `0.0003` |" in card and "hub_model_id" not in card
