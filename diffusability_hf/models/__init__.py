"""Latent DiTs for the diffusability experiments (paper Section 4, Appendix B): App. B's presets (:mod:`.dit`), the
models (:mod:`.selfcond_dit`, :mod:`.video_dit`: torch and diffusers only, they ship as remote code) and the toolkit's
builders (:mod:`.factory`)."""

from .dit import DIT_PRESETS, PATCH_SIZES, RECIPES, dit_config, parse_dit_name
from .factory import (
    build_dit,
    build_selfcond_dit,
    build_transformer,
    count_parameters,
    disable_label_dropout,
    dit_meta_parameter_count,
    init_dit_weights,
    transformer_class,
    transformer_config,
    video_transformer_config,
)
from .selfcond_dit import SelfConditionedDiT, SelfConditionedDiTOutput, rope_2d
from .video_dit import SelfConditionedVideoDiT, SelfConditionedVideoDiTOutput, rope_3d, rope_3d_axes_dims, sincos_3d

__all__ = [
    "DIT_PRESETS",
    "PATCH_SIZES",
    "RECIPES",
    "SelfConditionedDiT",
    "SelfConditionedDiTOutput",
    "SelfConditionedVideoDiT",
    "SelfConditionedVideoDiTOutput",
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
    "rope_3d",
    "rope_3d_axes_dims",
    "sincos_3d",
    "transformer_class",
    "transformer_config",
    "video_transformer_config",
]
