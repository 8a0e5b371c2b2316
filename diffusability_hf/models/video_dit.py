"""Self-conditioned video DiT with 3D RoPE: the video latent DiT of "Improving the Diffusability of Autoencoders".

This file imports only torch, diffusers and the standard library, so that it can be copied alone into a saved
pipeline's ``transformer/`` folder and loaded with ``trust_remote_code=True``. The pieces it shares with
``selfcond_dit.py`` are copied, marked ``# Copied from diffusability_hf.models.selfcond_dit.<name>`` (a test checks
that the copies agree). Its config from App. B's presets is built by
:func:`diffusability_hf.models.factory.video_transformer_config`.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import (
    CombinedTimestepLabelEmbeddings,
    PatchEmbed,
    apply_rotary_emb,
    get_1d_rotary_pos_embed,
    get_1d_sincos_pos_embed_from_grid,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormZero
from diffusers.utils import BaseOutput

POS_EMBED_TYPES = ("rope", "sincos")


def rope_3d_axes_dims(dim: int) -> Tuple[int, int, int]:
    """Channels ``(d_t, d_s, d_s)`` given to (time, rows, cols) out of ``dim``: ``d_s = 2 * floor(3 dim / 16)``,
    ``d_t = dim - 2 d_s``; all even, ``d_t`` about ``dim / 4`` (exactly when ``16 | dim``). Needs an even ``dim >= 6``.
    """
    if dim % 2 or dim < 6:
        raise ValueError(
            f"3D positions need an even size of at least 6 (three axes of rotation pairs / sin-cos pairs), got {dim}: "
            "use an even attention_head_dim (rope) or hidden size (sincos), e.g. a multiple of 16."
        )
    spatial = 2 * (3 * dim // 16)
    return dim - 2 * spatial, spatial, spatial


def _check_axes_dims(dim: int, axes_dims: Optional[Sequence[int]], what: str) -> Tuple[int, int, int]:
    if axes_dims is None:
        return rope_3d_axes_dims(dim)
    axes_dims = tuple(int(a) for a in axes_dims)
    if len(axes_dims) != 3 or sum(axes_dims) != dim or any(a <= 0 or a % 2 for a in axes_dims):
        raise ValueError(
            f"rope_axes_dims must be three positive even sizes (time, rows, cols) summing to {what} = {dim}, got "
            f"{list(axes_dims)}; leave it None for the default {list(rope_3d_axes_dims(dim))}."
        )
    return axes_dims


def _grid_3d(num_frames: int, height: int, width: int, device=None) -> Tuple[torch.Tensor, ...]:
    """Time, row and column index of every token ``(N,)`` each, tokens in ``(t, row, col)`` row-major order."""
    t = torch.arange(num_frames, device=device, dtype=torch.float32)
    r = torch.arange(height, device=device, dtype=torch.float32)
    c = torch.arange(width, device=device, dtype=torch.float32)
    tt, rr, cc = torch.meshgrid(t, r, c, indexing="ij")  # (T, H, W) each
    return tt.reshape(-1), rr.reshape(-1), cc.reshape(-1)


def rope_3d(
    head_dim: int,
    num_frames: int,
    height: int,
    width: int,
    theta: float = 10000.0,
    axes_dims: Optional[Sequence[int]] = None,
    device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """3D rotary embedding tables ``(cos, sin)``, each ``(num_frames * height * width, head_dim)``.

    Tokens in ``(t, row, col)`` row-major order; channels ``[time | rows | cols]`` of sizes ``axes_dims`` (default
    :func:`rope_3d_axes_dims`), each group with the 1D RoPE frequencies of its own size, so that ``q . k`` after
    rotation depends only on the ``(dt, drow, dcol)`` offsets between two tokens. Apply with diffusers'
    ``apply_rotary_emb(x, (cos, sin))`` on ``x`` of shape ``(B, heads, N, head_dim)``.
    """
    dims = _check_axes_dims(head_dim, axes_dims, "attention_head_dim")
    cos, sin = [], []
    for dim, pos in zip(dims, _grid_3d(num_frames, height, width, device)):
        c, s = get_1d_rotary_pos_embed(dim, pos, theta=theta, use_real=True)  # (N, dim)
        cos.append(c)
        sin.append(s)
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def sincos_3d(
    embed_dim: int,
    num_frames: int,
    height: int,
    width: int,
    axes_dims: Optional[Sequence[int]] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Fixed 3D sin-cos position table ``(num_frames * height * width, embed_dim)`` (float32), added to the tokens.

    Channels ``[time | rows | cols]`` split as :func:`rope_3d_axes_dims` of ``embed_dim``, each DiT's 1D sin-cos
    embedding (``get_1d_sincos_pos_embed_from_grid``) of the integer index; tokens in ``(t, row, col)`` order.
    """
    dims = _check_axes_dims(embed_dim, axes_dims, "the hidden size")
    parts = [
        get_1d_sincos_pos_embed_from_grid(d, pos) for d, pos in zip(dims, _grid_3d(num_frames, height, width, device))
    ]
    return torch.cat(parts, dim=-1).float()


# Copied from diffusability_hf.models.selfcond_dit.RoPEAttnProcessor
class RoPEAttnProcessor:
    """Self-attention with optional rotary embeddings on q and k (scaled dot-product attention).

    Replacing it (``set_attn_processor``, ``set_default_attn_processor``) silently drops RoPE: don't.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("RoPEAttnProcessor implements unmasked self-attention only.")
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, heads, N, head_dim)
        k = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb)
            k = apply_rotary_emb(k, image_rotary_emb)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, heads * head_dim)
        return attn.to_out[1](attn.to_out[0](out))


# Copied from diffusability_hf.models.selfcond_dit.SelfConditionedDiTBlock with rope_2d->rope_3d
class SelfConditionedDiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning (Peebles & Xie, 2023, Fig. 3) and RoPE-capable attention."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        # AdaLayerNormZero without its own embedder: all blocks share the model's timestep + label embedding.
        self.norm1 = AdaLayerNormZero(dim)
        self.attn1 = Attention(
            query_dim=dim, heads=num_heads, dim_head=head_dim, bias=True, out_bias=True, processor=RoPEAttnProcessor()
        )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate")

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    ) -> torch.Tensor:
        """``x`` ``(B, N, D)``, ``emb`` ``(B, D)`` conditioning, ``rope`` tables from :func:`rope_3d` or None."""
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=emb)
        x = x + gate_msa[:, None] * self.attn1(h, image_rotary_emb=rope)
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


@dataclass
class SelfConditionedVideoDiTOutput(BaseOutput):
    """``sample``: predicted velocity ``(B, C, T, H, W)``; ``last_hidden_state``: last-block tokens ``(B, N, D)``,
    ``N = T * (H / p) * (W / p)`` in ``(t, row, col)`` order."""

    sample: torch.Tensor
    last_hidden_state: torch.Tensor


class SelfConditionedVideoDiT(ModelMixin, ConfigMixin):
    r"""Class-conditional video latent DiT with 3D RoPE and self-conditioning (paper Section 4 and Appendix B).

    Section 4: "Our video DiT is a direct adaption of the image one where we additionally unroll the temporal axis
    [...]. We do not use patchification for the temporal axis in video DiTs." This is the image DiT of Appendix B
    (``selfcond_dit.SelfConditionedDiT``: adaLN-Zero blocks, shared timestep + label embedding, final adaLN + linear
    unpatchify, self-conditioning) applied to latents ``(B, C, T, H, W)``:

    * **Tokens**: every latent frame is patchified on its own with a ``p x p`` patch (``PatchEmbed``'s convolution, no
      temporal patch), giving ``N = T * (H / p) * (W / p)`` tokens in ``(t, row, col)`` row-major order (token
      ``n = (t * H / p + row) * W / p + col``), all attending to each other (full spatio-temporal attention). Table 2
      uses DiT-B/2 for CV-AE latents and DiT-B/1 for LTX-AE ones.
    * **3D RoPE** (Su et al., 2024) on queries and keys: a head of size ``d`` is split into three consecutive channel
      groups ``[time | rows | cols]`` of sizes :func:`rope_3d_axes_dims` ``(d_t, d_s, d_s)`` with
      ``d_s = 2 * floor(3 d / 16)`` and ``d_t = d - 2 d_s``, i.e. CogVideoX's ``d / 4, 3d / 8, 3d / 8`` whenever
      ``16 | d`` (DiT-S/B/L: ``64 -> 16, 24, 24``) and the nearest split into even parts otherwise (DiT-XL's
      ``72 -> 20, 26, 26``). Each group rotates with its axis' integer position and the 1D frequencies
      ``theta ** (-2i / d_axis)``, pairs ``(2i, 2i + 1)`` together (diffusers' ``apply_rotary_emb`` layout, as
      ``selfcond_dit.rope_2d``). The rule needs only an even ``d >= 6`` (every group even, so rotation pairs never
      straddle two axes), which all DiT sizes satisfy, including XL's 72 where the plain ``3d / 8 = 27`` is odd; time
      gets the smaller share because video latents have few frames (``T' = 5`` for 17 frames of CV-AE, 3 for LTX-AE)
      against ``16-32`` rows and columns. ``rope_axes_dims`` in the config overrides the split.
    * ``pos_embed="sincos"``: a fixed additive 3D sin-cos table instead (:func:`sincos_3d`, same
      ``[time | rows | cols]`` split of the hidden size), the 3D analogue of DiT's 2D table.

    Positions are integer indices computed from the actual input shape in ``forward`` for both kinds, so any ``T``,
    ``H`` and ``W`` work (``H`` and ``W`` divisible by ``p``); ``sample_size`` and ``num_frames`` record the training
    latent size. Self-conditioning, the zero-initialised bias-free ``self_cond_proj`` and the label convention
    (``num_embeds_ada_norm`` classes, label ``num_embeds_ada_norm`` is the null class of classifier-free guidance, no
    label dropout inside the model), the 0..1000 timestep scale and the DiT initialisation are those of the image
    model. Parameter names match ``SelfConditionedDiT``'s, so an image DiT's state dict loads into a video DiT of the
    same size.

    Parameters (names as ``SelfConditionedDiT``'s):
        num_attention_heads (`int`): heads; hidden size ``D = num_attention_heads * attention_head_dim``.
        attention_head_dim (`int`): channels per head (even and at least 6 for 3D RoPE, see
            :func:`rope_3d_axes_dims`).
        in_channels (`int`): latent channels ``C``.
        out_channels (`int`, *optional*): output channels, defaults to ``in_channels`` (velocity prediction).
        num_layers (`int`): transformer blocks.
        sample_size (`int`): training latent height = width (a record: positions follow the input).
        num_frames (`int`): training latent frames ``T'`` (a record, as ``sample_size``).
        patch_size (`int`): spatial patch size ``p`` (no temporal patch); ``N = T * (H / p) * (W / p)`` tokens.
        num_embeds_ada_norm (`int`): number of classes; label ``num_embeds_ada_norm`` is the null class.
        mlp_ratio (`float`): feed-forward width over ``D``.
        pos_embed (`str`): ``"rope"`` (paper, 3D RoPE in every attention layer) or ``"sincos"`` (fixed additive 3D
            table on the patch tokens).
        rope_theta (`float`): RoPE base frequency.
        rope_axes_dims (`list[int]`, *optional*): channels per (time, rows, cols) axis, three positive even sizes
            summing to ``attention_head_dim`` (rope) or ``D`` (sincos); None for :func:`rope_3d_axes_dims`.
        self_conditioning (`bool`): create ``self_cond_proj`` and accept ``self_cond`` in ``forward``.
        class_embed_init_std (`float`): std of the label table's normal init (DiT: 0.02; 1.0 for short runs, as
            ``SelfConditionedDiT``'s).
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 12,
        attention_head_dim: int = 64,
        in_channels: int = 16,
        out_channels: Optional[int] = None,
        num_layers: int = 12,
        sample_size: int = 32,
        num_frames: int = 5,
        patch_size: int = 2,
        num_embeds_ada_norm: int = 700,
        mlp_ratio: float = 4.0,
        pos_embed: str = "rope",
        rope_theta: float = 10000.0,
        rope_axes_dims: Optional[List[int]] = None,
        self_conditioning: bool = True,
        class_embed_init_std: float = 0.02,
    ):
        super().__init__()
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"Unknown pos_embed {pos_embed!r}; choose one of {POS_EMBED_TYPES}.")
        if not class_embed_init_std > 0:
            raise ValueError(f"class_embed_init_std must be positive, got {class_embed_init_std}.")
        if sample_size % patch_size:
            raise ValueError(
                f"patch_size {patch_size} must divide sample_size {sample_size}: change one of them (the paper uses "
                "p = 2, or p = 1 for LTX-AE)."
            )
        dim = num_attention_heads * attention_head_dim
        # Validate the 3D split now rather than at the first forward.
        if pos_embed == "rope":
            self._axes_dims = _check_axes_dims(attention_head_dim, rope_axes_dims, "attention_head_dim")
        else:
            self._axes_dims = _check_axes_dims(dim, rope_axes_dims, "the hidden size")
        self.out_channels = in_channels if out_channels is None else out_channels
        self.gradient_checkpointing = False

        # Applied to every frame on its own (no temporal patch); its sincos table is off, positions are 3D.
        self.patch_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=dim,
            pos_embed_type=None,
        )
        # A positive dropout at construction makes diffusers add the null-class row (index num_classes); the label
        # drop itself belongs to the training script, so switch it off.
        self.emb = CombinedTimestepLabelEmbeddings(num_embeds_ada_norm, dim, class_dropout_prob=0.1)
        self.emb.class_embedder.dropout_prob = 0.0
        # No bias: projecting zeros gives zeros, so self_cond = 0 and self_cond = None agree exactly.
        self.self_cond_proj = nn.Linear(dim, dim, bias=False) if self_conditioning else None
        self.transformer_blocks = nn.ModuleList(
            [
                SelfConditionedDiTBlock(dim, num_attention_heads, attention_head_dim, mlp_ratio)
                for _ in range(num_layers)
            ]
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self._init_dit_weights()

    # Copied from diffusability_hf.models.selfcond_dit.SelfConditionedDiT._init_dit_weights
    @torch.no_grad()
    def _init_dit_weights(self) -> None:
        """Peebles & Xie's init: xavier linears, N(0, 0.02) timestep MLP, zero adaLN / output, zero
        ``self_cond_proj``; the label table N(0, ``class_embed_init_std``^2) (DiT: 0.02)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        proj = self.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.emb.class_embedder.embedding_table.weight, std=self.config.class_embed_init_std)
        nn.init.normal_(self.emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.emb.timestep_embedder.linear_2.weight, std=0.02)
        for layer in [block.norm1.linear for block in self.transformer_blocks] + [self.proj_out_1, self.proj_out_2]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        # Zero self-conditioning projection: the model starts exactly as if self_cond were absent (Appendix B).
        if self.self_cond_proj is not None:
            nn.init.zeros_(self.self_cond_proj.weight)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        class_labels: torch.LongTensor,
        self_cond: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[SelfConditionedVideoDiTOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """Predict the velocity for noisy video latents.

        Args:
            hidden_states: noisy latents ``(B, C, T, H, W)``; ``H`` and ``W`` divisible by ``patch_size``, any ``T``.
            timestep: ``(B,)`` or scalar, ``sigma * 1000``.
            class_labels: ``(B,)`` in ``[0, num_embeds_ada_norm]`` (the last one is the null class).
            self_cond: ``(B, N, D)`` ``last_hidden_state`` of an auxiliary pass, or None (no self-conditioning).
            return_dict: return a :class:`SelfConditionedVideoDiTOutput` instead of ``(sample, last_hidden_state)``.
        """
        if hidden_states.ndim != 5:
            raise ValueError(
                f"Expected video latents (B, C, T, H, W), got shape {tuple(hidden_states.shape)}: add a frame axis "
                "(x[:, :, None]) for images, or use SelfConditionedDiT."
            )
        b, c, t, h, w = hidden_states.shape
        p = self.config.patch_size
        if c != self.config.in_channels:
            raise ValueError(f"Expected {self.config.in_channels} input channels, got {c}.")
        if h % p or w % p:
            raise ValueError(
                f"Latent size {h}x{w} is not divisible by the patch size {p}: crop or pad the latents to a multiple "
                f"of {p}."
            )
        gh, gw = h // p, w // p

        # Patchify every frame, tokens in (t, row, col) order (+ sincos position), then add self-conditioning.
        frames = hidden_states.transpose(1, 2).reshape(b * t, c, h, w)  # (B * T, C, H, W)
        x = self.patch_embed(frames)  # (B * T, gh * gw, D)
        x = x.reshape(b, t * gh * gw, x.shape[-1])  # (B, N, D)
        if self.config.pos_embed == "sincos":
            table = sincos_3d(x.shape[-1], t, gh, gw, self._axes_dims, device=x.device)  # (N, D)
            x = (x + table).to(x.dtype)
        if self_cond is not None:
            if self.self_cond_proj is None:
                raise ValueError("This model was built with self_conditioning=False; do not pass self_cond.")
            if self_cond.shape != x.shape:
                raise ValueError(
                    f"self_cond must have shape {tuple(x.shape)} (B, N, D), got {tuple(self_cond.shape)}."
                )
            x = x + self.self_cond_proj(self_cond.to(x.dtype))

        # Shared conditioning: timestep + class embedding.
        timestep = torch.as_tensor(timestep, device=x.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        emb = self.emb(timestep, class_labels, hidden_dtype=x.dtype)  # (B, D)

        rope = None
        if self.config.pos_embed == "rope":
            rope = rope_3d(
                self.config.attention_head_dim, t, gh, gw, self.config.rope_theta, self._axes_dims, device=x.device
            )  # (N, head_dim) each
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, emb, rope)
            else:
                x = block(x, emb, rope)
        last_hidden_state = x  # (B, N, D): what self-conditioning feeds back

        # Final adaLN + linear, then unpatchify every frame (same per-token layout as SelfConditionedDiT).
        shift, scale = self.proj_out_1(F.silu(emb)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        x = self.proj_out_2(x)  # (B, N, p * p * C_out)
        x = x.reshape(b, t, gh, gw, p, p, self.out_channels)
        x = torch.einsum("bthwpqc->bcthpwq", x)  # (B, C_out, T, gh, p, gw, p)
        sample = x.reshape(b, self.out_channels, t, gh * p, gw * p)

        if not return_dict:
            return sample, last_hidden_state
        return SelfConditionedVideoDiTOutput(sample=sample, last_hidden_state=last_hidden_state)
