"""Building the latent DiTs: App. B's DiT (``SelfConditionedDiT``), its video version (``SelfConditionedVideoDiT``) and
diffusers' ``DiTTransformer2DModel`` with DiT's initialisation, from a preset name (:mod:`.dit`) or a config file,
checked against the latents they will train on. The model files themselves import nothing of the toolkit (they ship
as a pipeline's remote code); this module is where the toolkit builds them.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from ..autoencoders import read_config
from .dit import dit_config
from .selfcond_dit import SelfConditionedDiT
from .video_dit import SelfConditionedVideoDiT


def disable_label_dropout(model: nn.Module) -> int:
    """Set ``dropout_prob = 0`` on every diffusers ``LabelEmbedding`` in ``model``; returns how many were changed.

    In ``DiTTransformer2DModel`` they live at ``transformer_blocks[i].norm1.emb.class_embedder`` (one per block; the
    final layer reuses block 0's). Their tables keep the extra row ``num_classes`` (the null class), created because
    the dropout was positive at construction, so call this *after* building or ``from_pretrained``.
    """
    embedders = [m for m in model.modules() if isinstance(m, LabelEmbedding)]
    if not embedders:
        raise ValueError(f"{type(model).__name__} has no diffusers LabelEmbedding: is it class-conditional?")
    for m in embedders:
        m.dropout_prob = 0.0
    return len(embedders)


@torch.no_grad()
def init_dit_weights(model: DiTTransformer2DModel, class_embed_init_std: float = 0.02) -> DiTTransformer2DModel:
    """DiT initialisation (Peebles & Xie, 2023, Section 3.2; their ``initialize_weights``) for training from scratch.

    Xavier-uniform linear layers and patch projection, N(0, 0.02) timestep MLPs, N(0, ``class_embed_init_std``^2)
    label tables (DiT: 0.02; 1.0 learns class conditioning in short runs, see ``SelfConditionedDiT``), and zeros for
    every adaLN modulation and the final projection ("adaLN-Zero": each block starts as the identity and the model
    outputs 0). diffusers' constructor (and ``from_config``) leaves PyTorch defaults because it is meant for loading
    converted checkpoints.
    """
    if not class_embed_init_std > 0:
        raise ValueError(f"class_embed_init_std must be positive, got {class_embed_init_std}.")
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    proj = model.pos_embed.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=class_embed_init_std)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def build_dit(
    name_or_config: Union[str, Dict[str, Any]],
    in_channels: int = 4,
    sample_size: int = 32,
    num_classes: int = 1000,
    init_weights: bool = True,
    class_embed_init_std: float = 0.02,
) -> DiTTransformer2DModel:
    """A stock ``DiTTransformer2DModel`` with per-block label dropout disabled.

    Args:
        name_or_config: a preset name (``"DiT-B/2"``, see :func:`dit_config`) or a ready config dict (then the other
            size arguments are ignored; a saved config's ``_class_name`` and other private keys are dropped).
        in_channels, sample_size, num_classes: see :func:`dit_config`.
        init_weights: apply :func:`init_dit_weights` (adaLN-Zero); ``False`` keeps PyTorch's default init.
        class_embed_init_std: the label tables' init std (:func:`init_dit_weights`).
    """
    config = (
        name_or_config
        if isinstance(name_or_config, dict)
        else dit_config(name_or_config, in_channels, sample_size, num_classes)
    )
    if isinstance(name_or_config, dict):
        model = DiTTransformer2DModel.from_config(config)
    else:
        model = DiTTransformer2DModel(**config)
    if init_weights:
        init_dit_weights(model, class_embed_init_std)
    disable_label_dropout(model)
    return model


def build_selfcond_dit(
    name: str,
    in_channels: int = 4,
    sample_size: int = 32,
    num_classes: int = 1000,
    pos_embed: str = "rope",
    self_conditioning: bool = True,
) -> SelfConditionedDiT:
    """The paper's Appendix B DiT (RoPE, self-conditioning) at a named size; DiT init is built in."""
    config = dit_config(name, in_channels, sample_size, num_classes)
    return SelfConditionedDiT(**config, pos_embed=pos_embed, self_conditioning=self_conditioning)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def dit_meta_parameter_count(config: Dict[str, Any], model_cls: Optional[type] = None) -> int:
    """Parameter count of ``model_cls(**config)`` built on the meta device (no memory), e.g. for DiT-XL/2."""
    with torch.device("meta"):
        model = (model_cls or DiTTransformer2DModel)(**config)
    return count_parameters(model)


def transformer_class(config: Dict[str, Any]) -> type:
    """The class a config names: ``SelfConditionedDiT``, ``SelfConditionedVideoDiT``, else diffusers'
    ``DiTTransformer2DModel``."""
    classes = {"SelfConditionedDiT": SelfConditionedDiT, "SelfConditionedVideoDiT": SelfConditionedVideoDiT}
    return classes.get(config.get("_class_name"), DiTTransformer2DModel)


def transformer_config(
    latent_shape: Sequence[int],
    num_classes: int,
    model: str = "DiT-S/2",
    config_path: Optional[str] = None,
    latents: Optional[str] = None,
) -> Dict[str, Any]:
    """The latent DiT's config, read once and checked against the latents before anything heavy loads.

    Args:
        latent_shape: ``(C, h, w)`` of the training latents (square: ``h = w``); ``(C, T', h, w)`` for video latents,
            whose config :func:`~diffusability_hf.models.video_dit.video_transformer_config` gives.
        num_classes: number of real classes (see :func:`dit_config`).
        model: App. B's size by name (:func:`dit_config` checks the name and the patch size), used without
            ``config_path``.
        config_path: a transformer ``config.json`` (or its folder) instead; its ``in_channels`` and ``sample_size``
            (or the class defaults) must match ``latent_shape``.
        latents: the latents' source, named in the error.
    """
    if len(latent_shape) == 4:  # (C, T', h, w): the video DiT (App. B, Sec. 4)
        return video_transformer_config(latent_shape, num_classes, model, config_path, latents)
    channels, size, _ = latent_shape
    if config_path is None:
        return dit_config(model, channels, size, num_classes)
    config = read_config(config_path)
    defaults = inspect.signature(transformer_class(config).__init__).parameters
    takes = [config.get(k, defaults[k].default) for k in ("in_channels", "sample_size")]
    if takes != [channels, size]:
        raise ValueError(
            f"The transformer config takes {takes[0]}x{takes[1]}^2 latents, but {latents} holds {channels}x{size}^2 "
            "ones."
        )
    return config


def build_transformer(
    config: Dict[str, Any],
    from_config: bool = False,
    stock_dit: bool = False,
    pos_embed: str = "rope",
    self_conditioning: bool = True,
    class_embed_init_std: Optional[float] = None,
) -> nn.Module:
    """The latent DiT of a :func:`transformer_config`, initialised for training from scratch (DiT's init, every
    path), its per-block label dropout disabled (classifier-free guidance drops labels once per sample, in
    ``flow.FlowMatchingLoss``, with the null class).

    Args:
        config: from :func:`transformer_config`.
        from_config: build the class the config names (:func:`transformer_class`) with the config's own settings
            (a config file); else one of the next two.
        stock_dit: diffusers' ``DiTTransformer2DModel`` with DiT's init (:func:`build_dit`), from a preset or from a
            config file (which must then name that class); else the paper's App. B DiT, ``SelfConditionedDiT`` with
            ``pos_embed`` (``"rope"``, ``"sincos"`` or ``"rope+sincos"``) and ``self_conditioning``.
        class_embed_init_std: the label table's init std; None keeps the config's (DiT's 0.02 for presets and for
            diffusers' DiT).
    """
    cls = transformer_class(config) if from_config else None
    if stock_dit and cls not in (None, DiTTransformer2DModel):
        raise ValueError(
            f"--stock_dit trains diffusers' DiTTransformer2DModel, but the config names {cls.__name__}: give a "
            "DiTTransformer2DModel config, or drop --stock_dit to train the config's class."
        )
    std = {} if class_embed_init_std is None else {"class_embed_init_std": class_embed_init_std}
    if cls is DiTTransformer2DModel or stock_dit:  # from_config would skip DiT's init: build_dit applies it
        model = build_dit(config, class_embed_init_std=std.get("class_embed_init_std", 0.02))
    elif from_config:
        model = cls.from_config({**config, **std})
    elif "num_frames" in config:  # video latents: the video DiT (App. B, Sec. 4)
        settings = {"pos_embed": pos_embed, "self_conditioning": self_conditioning, **std}
        model = SelfConditionedVideoDiT(**{**config, **settings})
    else:
        model = SelfConditionedDiT(**config, pos_embed=pos_embed, self_conditioning=self_conditioning, **std)
    if isinstance(model, DiTTransformer2DModel):
        disable_label_dropout(model)
    return model


def video_transformer_config(
    latent_shape: Sequence[int],
    num_classes: int,
    model: str = "DiT-B/2",
    config_path: Optional[str] = None,
    latents: Optional[str] = None,
    pos_embed: str = "rope",
    self_conditioning: bool = True,
) -> Dict[str, Any]:
    """The video DiT's config, checked against the latents before anything heavy loads (``transformer_config``
    for videos).

    Args:
        latent_shape: ``(C, T', h, w)`` of the training latents (square: ``h = w``).
        num_classes: number of real classes; label ``num_classes`` is the null class.
        model: App. B's size by name, ``"DiT-{S,B,L,XL,tiny}/{1,2,4}"`` (``dit.DIT_PRESETS``; the patch is spatial
            only), used without ``config_path``. Table 2: ``"DiT-B/2"`` for CV-AE, ``"DiT-B/1"`` for LTX-AE.
        config_path: a ``SelfConditionedVideoDiT`` ``config.json`` (or its folder) instead; its ``in_channels``,
            ``num_frames`` and ``sample_size`` (or the class defaults) must match ``latent_shape``.
        latents: the latents' source, named in the error.
        pos_embed, self_conditioning: written into a config built from ``model``.

    Returns:
        A dict for ``SelfConditionedVideoDiT(**config)`` (or ``.from_config``).
    """
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape must be (C, T', h, w) of video latents, got {list(latent_shape)}.")
    channels, frames, height, width = (int(s) for s in latent_shape)
    if height != width:
        raise ValueError(
            f"video_transformer_config records one sample_size, so it wants square latents, got {height}x{width}: "
            "build SelfConditionedVideoDiT directly (positions follow the input, any h, w divisible by p work)."
        )
    if config_path is None:
        config = dit_config(model, channels, height, num_classes)
        del config["norm_type"]  # always adaLN-Zero here
        config.update(num_frames=frames, pos_embed=pos_embed, self_conditioning=self_conditioning)
        return config
    config = read_config(config_path)
    name = config.get("_class_name", SelfConditionedVideoDiT.__name__)
    if name != SelfConditionedVideoDiT.__name__:
        raise ValueError(f"{config_path} is a {name} config, not a SelfConditionedVideoDiT one.")
    defaults = inspect.signature(SelfConditionedVideoDiT.__init__).parameters
    takes = [config.get(k, defaults[k].default) for k in ("in_channels", "num_frames", "sample_size")]
    if takes != [channels, frames, height]:
        raise ValueError(
            f"The transformer config takes {takes[0]}x{takes[1]}x{takes[2]}^2 latents (C x T' x h^2), but {latents} "
            f"holds {channels}x{frames}x{height}^2 ones."
        )
    return config
