"""Latent DiTs for the diffusability experiments (paper Section 4, Appendix B)."""

from .dit import (
    DIT_PRESETS,
    PATCH_SIZES,
    build_dit,
    build_selfcond_dit,
    build_transformer,
    count_parameters,
    disable_label_dropout,
    dit_config,
    dit_meta_parameter_count,
    init_dit_weights,
    parse_dit_name,
    transformer_class,
    transformer_config,
)
from .selfcond_dit import SelfConditionedDiT, SelfConditionedDiTOutput, rope_2d

__all__ = [
    "DIT_PRESETS",
    "PATCH_SIZES",
    "SelfConditionedDiT",
    "SelfConditionedDiTOutput",
    "build_dit",
    "build_selfcond_dit",
    "build_transformer",
    "count_parameters",
    "disable_label_dropout",
    "dit_config",
    "dit_meta_parameter_count",
    "init_dit_weights",
    "parse_dit_name",
    "rope_2d",
    "transformer_class",
    "transformer_config",
]
