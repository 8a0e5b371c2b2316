"""DiT presets over diffusers' ``DiTTransformer2DModel`` (paper Appendix B; Peebles & Xie, 2023, Table 1).

The paper uses "the same model sizes for DiT-S, DiT-B, DiT-L and DiT-XL as the original work"; a name such as
``"DiT-XL/2"`` is a preset plus the patch size (1, 2 or 4; the paper uses /2 for image AEs and /1 for LTX-AE).

Conventions for the latent flow-matching DiT:
    * the model predicts the velocity ``noise - x0`` (``diffusability_hf.flow``), so ``out_channels = in_channels``
      (DiT's ``learn_sigma`` is off);
    * timesteps are ``sigma * 1000``;
    * ``num_embeds_ada_norm = num_classes``; label ``num_classes`` is the null class of classifier-free guidance;
    * diffusers gives every block its own ``CombinedTimestepLabelEmbeddings`` whose ``LabelEmbedding`` drops labels
      with p = 0.1 independently per block in train mode; :func:`disable_label_dropout` turns that off so the
      training script drops labels once per sample, consistently for the whole network.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Tuple

# hidden size, depth and heads of Peebles & Xie (2023), Table 1 = paper Appendix B; "tiny" is for tests.
DIT_PRESETS: Dict[str, Dict[str, int]] = {
    "S": {"hidden_size": 384, "num_layers": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "num_layers": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "num_layers": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "num_layers": 28, "num_heads": 16},
    "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
}
PATCH_SIZES = (1, 2, 4)

_NAME_RE = re.compile(r"^DiT-(?P<preset>[A-Za-z]+)/(?P<patch>\d+)$")


def parse_dit_name(name: str) -> Tuple[str, int]:
    """``"DiT-XL/2" -> ("XL", 2)``; raises a ``ValueError`` that lists the valid names."""
    match = _NAME_RE.match(name)
    if match is None or match["preset"] not in DIT_PRESETS or int(match["patch"]) not in PATCH_SIZES:
        valid = ", ".join(f"DiT-{p}/{k}" for p in DIT_PRESETS for k in PATCH_SIZES)
        raise ValueError(f"Unknown DiT name {name!r}; valid names are {valid}.")
    return match["preset"], int(match["patch"])


def _check_patch_size(sample_size: int, patch_size: int) -> None:
    if sample_size % patch_size:
        ok_sizes = [sample_size - sample_size % patch_size, sample_size + patch_size - sample_size % patch_size]
        ok_patches = [p for p in PATCH_SIZES if sample_size % p == 0]
        raise ValueError(
            f"Patch size {patch_size} does not divide the latent size {sample_size}: use a latent size that is a "
            f"multiple of {patch_size} (e.g. {ok_sizes[0] or ok_sizes[1]} or {ok_sizes[1]}) or a patch size in "
            f"{ok_patches}."
        )


# App. B's DiT for short runs (experiments/dit_recipe): a position scheme and the label table's init std (DiT's 0.02,
# or 1.0: see SelfConditionedDiT). The bench trains one of these, and diffusability_score.py's probe its default.
RECIPES = {
    "rope_std0.02": dict(pos_embed="rope", class_embed_init_std=0.02),  # App. B as printed, with DiT's init
    "rope_std1": dict(pos_embed="rope", class_embed_init_std=1.0),
    "rope+sincos_std0.02": dict(pos_embed="rope+sincos", class_embed_init_std=0.02),
    "rope+sincos_std1": dict(pos_embed="rope+sincos", class_embed_init_std=1.0),
}


def dit_config(name: str, in_channels: int = 4, sample_size: int = 32, num_classes: int = 1000) -> Dict[str, Any]:
    """``DiTTransformer2DModel`` keyword arguments for a named preset (paper Appendix B).

    Args:
        name: ``"DiT-{S,B,L,XL,tiny}/{1,2,4}"``.
        in_channels: latent channels ``C`` (4 for SD-VAE, 16 for FluxAE, ...).
        sample_size: latent height = width (the stock DiT wants square inputs).
        num_classes: number of real classes; label ``num_classes`` is the null (unconditional) class.

    Returns:
        A dict for ``DiTTransformer2DModel(**config)``: ``out_channels = in_channels`` (velocity prediction),
        ``num_embeds_ada_norm = num_classes``, ``norm_type = "ada_norm_zero"``, ``attention_head_dim =
        hidden // heads``.
    """
    preset, patch_size = parse_dit_name(name)
    _check_patch_size(sample_size, patch_size)
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1 (use 1 for an unconditional model), got {num_classes}.")
    p = DIT_PRESETS[preset]
    return {
        "num_attention_heads": p["num_heads"],
        "attention_head_dim": p["hidden_size"] // p["num_heads"],
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_layers": p["num_layers"],
        "sample_size": sample_size,
        "patch_size": patch_size,
        "num_embeds_ada_norm": num_classes,
        "norm_type": "ada_norm_zero",
    }
