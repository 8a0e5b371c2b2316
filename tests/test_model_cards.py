"""Model card templates and the helpers that fill their front matter (license from the base model, base_model only
for Hub repo ids); the scripts' end-to-end tests check the rendered cards of real runs."""

import os
import re

import pytest
from huggingface_hub import ModelCard

from diffusability_hf.hub import (
    MODEL_CARDS_DIR,
    card_license,
    hub_repo_id,
    license_sentence,
    metadata_yaml,
    parse_front_matter,
    read_card_metadata,
    render_model_card,
    render_template,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"se_autoencoder": "train_ae_se.py", "dit_pipeline": "train_dit_flow.py"}


def placeholders(name):
    with open(os.path.join(MODEL_CARDS_DIR, f"{name}.md")) as fh:
        return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", fh.read()))


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_placeholder_is_filled_by_its_script(name):
    """The script passes a value for each placeholder of its template (rendering raises on a missing one)."""
    with open(os.path.join(ROOT, "train_scripts", SCRIPTS[name])) as fh:
        source = fh.read()
    start = source.index(f'"{name}"')
    call = source[start : source.index("template_dir=MODEL_CARDS", start)]
    given = set(re.findall(r'^\s*"(\w+)":', call, flags=re.M))
    assert placeholders(name) == given


@pytest.mark.parametrize("name", sorted(SCRIPTS))
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


def test_hub_repo_id_only_for_repo_names(tmp_path):
    assert hub_repo_id("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    assert hub_repo_id(str(tmp_path)) is None and hub_repo_id("./local/dir/x") is None
    assert hub_repo_id("just-a-name") is None and hub_repo_id(None) is None
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    os.chdir(tmp_path)  # a local folder named like a repo id is local
    try:
        assert hub_repo_id("owner/name") is None
    finally:
        os.chdir(ROOT)


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
