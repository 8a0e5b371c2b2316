"""Self-conditioned DiT with 2D RoPE: the latent DiT of "Improving the Diffusability of Autoencoders", Appendix B.

This file imports only torch and diffusers (plus the standard library) so that it can be copied into a saved
pipeline's ``transformer/`` folder and loaded with ``trust_remote_code=True``.
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

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
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormZero
from diffusers.utils import BaseOutput

POS_EMBED_TYPES = ("rope", "sincos", "rope+sincos")


def rope_2d(
    head_dim: int, height: int, width: int, theta: float = 10000.0, device: Optional[torch.device] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """2D rotary embedding tables ``(cos, sin)``, each ``(height * width, head_dim)``, tokens in row-major order.

    Channels ``[0, head_dim / 2)`` encode the row index and ``[head_dim / 2, head_dim)`` the column index, each with
    the 1D RoPE frequencies ``theta ** (-2i / (head_dim / 2))`` (Su et al., 2024), so that ``q . k`` after rotation
    depends only on the row and column offsets between the two tokens. Apply with diffusers'
    ``apply_rotary_emb(x, (cos, sin))`` on ``x`` of shape ``(B, heads, N, head_dim)``.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head size divisible by 4 (two axes, rotation pairs), got {head_dim}.")
    rows = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)  # (N,) row of token
    cols = torch.arange(width, device=device, dtype=torch.float32).repeat(height)  # (N,) column of token
    cos_r, sin_r = get_1d_rotary_pos_embed(head_dim // 2, rows, theta=theta, use_real=True)  # (N, head_dim / 2)
    cos_c, sin_c = get_1d_rotary_pos_embed(head_dim // 2, cols, theta=theta, use_real=True)
    return torch.cat([cos_r, cos_c], dim=-1), torch.cat([sin_r, sin_c], dim=-1)


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
        """``x`` ``(B, N, D)``, ``emb`` ``(B, D)`` conditioning, ``rope`` tables from :func:`rope_2d` or None."""
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, emb=emb)
        x = x + gate_msa[:, None] * self.attn1(h, image_rotary_emb=rope)
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


@dataclass
class SelfConditionedDiTOutput(BaseOutput):
    """``sample``: predicted velocity ``(B, C, H, W)``; ``last_hidden_state``: last-block tokens ``(B, N, D)``."""

    sample: torch.Tensor
    last_hidden_state: torch.Tensor


class SelfConditionedDiT(ModelMixin, ConfigMixin):
    r"""Class-conditional latent DiT with 2D RoPE and self-conditioning (paper Appendix B).

    The DiT of Peebles & Xie (2023: adaLN-Zero blocks, final adaLN + linear unpatchify), built from
    diffusers' ``PatchEmbed``, ``CombinedTimestepLabelEmbeddings``, ``AdaLayerNormZero``, ``Attention`` and
    ``FeedForward``, with the two changes of the paper's Appendix B:

    * **RoPE** (Su et al., 2024) on queries and keys, in 2D: for a head of size ``d`` the first ``d / 2`` channels
      rotate with the token's **row** index and the last ``d / 2`` with its **column** index (pairs ``(2i, 2i + 1)``
      rotate together, diffusers' ``apply_rotary_emb(use_real_unbind_dim=-1)`` layout). ``pos_embed="sincos"`` keeps
      DiT's fixed additive embedding instead; ``"rope+sincos"`` uses both. RoPE alone gives attention relative offsets
      only, so a token cannot tell where in the image it is (the per-class layout of the data is lost in short runs);
      the public alphaflow DiT adds an absolute sin-cos table.
    * **Self-conditioning** (Jabri et al., 2023): the last block's activations of an auxiliary pass
      (``last_hidden_state``, the residual stream the last block outputs, before the final adaLN) go through
      ``self_cond_proj``, a zero-initialised bias-free linear layer, and are added to the patch tokens of the main
      pass. The paper places them "right before the unpatchify projection", which read literally is after the final
      adaLN (LayerNorm, then a timestep- and class-dependent scale and shift); we feed back the block's output itself,
      which carries the same tokens without that per-sample modulation (our choice; the two were not compared). The
      auxiliary pass at the same sigma, under ``torch.no_grad()`` and with 90% probability during training, is the
      training script's job. As the projection has no bias, a ``self_cond`` of zeros is exactly "no self-conditioning":
      a training script may zero it per sample.

    Label convention as diffusers' ``DiTTransformer2DModel``: ``num_embeds_ada_norm`` real classes and the null class
    ``num_embeds_ada_norm`` for classifier-free guidance; there is no label dropout inside the model (drop labels once
    per sample in the training script). Timesteps are on the 0..1000 scale (``sigma * 1000``).

    Initialisation: DiT's (Peebles & Xie: xavier linears, adaLN-Zero, zero output layer), with the label table drawn
    from N(0, ``class_embed_init_std``^2). DiT's 0.02 (also the public alphaflow code's) suits the paper's 400k-step
    runs; in a few hundred steps it leaves the model class-blind (samples at chance class accuracy in the bench's
    600-step runs), while 1.0 (PyTorch's ``nn.Embedding`` default, what diffusers' ``DiTTransformer2DModel`` gets from
    ``from_config``) learns the class within them: see the DiT recipe section of docs/latent_dit.md.

    Parameters (names as diffusers' ``DiTTransformer2DModel`` where they exist):
        num_attention_heads (`int`): heads; hidden size ``D = num_attention_heads * attention_head_dim``.
        attention_head_dim (`int`): channels per head (divisible by 4 for RoPE).
        in_channels (`int`): latent channels ``C``.
        out_channels (`int`, *optional*): output channels, defaults to ``in_channels`` (velocity prediction).
        num_layers (`int`): transformer blocks.
        sample_size (`int`): training latent size (sets the sincos table; RoPE works at any size).
        patch_size (`int`): patch size ``p``; ``N = (H / p) * (W / p)`` tokens.
        num_embeds_ada_norm (`int`): number of classes; label ``num_embeds_ada_norm`` is the null class.
        mlp_ratio (`float`): feed-forward width over ``D``.
        pos_embed (`str`): ``"rope"`` (paper), ``"sincos"`` (original DiT) or ``"rope+sincos"`` (both).
        rope_theta (`float`): RoPE base frequency.
        self_conditioning (`bool`): create ``self_cond_proj`` and accept ``self_cond`` in ``forward``.
        norm_type (`str`): only ``"ada_norm_zero"``; accepted so that ``dit_config`` dicts fit both DiT classes.
        class_embed_init_std (`float`): std of the label table's normal init; 0.02 is DiT's (for long runs), 1.0
            learns class conditioning in short ones (see above).
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        num_layers: int = 28,
        sample_size: int = 32,
        patch_size: int = 2,
        num_embeds_ada_norm: int = 1000,
        mlp_ratio: float = 4.0,
        pos_embed: str = "rope",
        rope_theta: float = 10000.0,
        self_conditioning: bool = True,
        norm_type: str = "ada_norm_zero",
        class_embed_init_std: float = 0.02,
    ):
        super().__init__()
        if pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"Unknown pos_embed {pos_embed!r}; choose one of {POS_EMBED_TYPES}.")
        if norm_type != "ada_norm_zero":
            raise ValueError(f"SelfConditionedDiT uses adaLN-Zero blocks only, got norm_type={norm_type!r}.")
        if not class_embed_init_std > 0:
            raise ValueError(f"class_embed_init_std must be positive, got {class_embed_init_std}.")
        if "rope" in pos_embed and attention_head_dim % 4:
            raise ValueError(f"RoPE needs attention_head_dim divisible by 4, got {attention_head_dim}.")
        if sample_size % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide sample_size {sample_size}.")
        dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        self.gradient_checkpointing = False

        # Named patch_embed, not pos_embed as in diffusers' DiT: ModelMixin resolves config keys before submodules.
        self.patch_embed = PatchEmbed(
            height=sample_size,
            width=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            embed_dim=dim,
            pos_embed_type="sincos" if "sincos" in pos_embed else None,
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
    ) -> Union[SelfConditionedDiTOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """Predict the velocity for noisy latents.

        Args:
            hidden_states: noisy latents ``(B, C, H, W)``; ``H`` and ``W`` divisible by ``patch_size``.
            timestep: ``(B,)`` or scalar, ``sigma * 1000``.
            class_labels: ``(B,)`` in ``[0, num_embeds_ada_norm]`` (the last one is the null class).
            self_cond: ``(B, N, D)`` ``last_hidden_state`` of an auxiliary pass, or None (no self-conditioning).
            return_dict: return a :class:`SelfConditionedDiTOutput` instead of ``(sample, last_hidden_state)``.
        """
        b, c, h, w = hidden_states.shape
        p = self.config.patch_size
        if c != self.config.in_channels:
            raise ValueError(f"Expected {self.config.in_channels} input channels, got {c}.")
        if h % p or w % p:
            raise ValueError(f"Latent size {h}x{w} is not divisible by the patch size {p}.")
        gh, gw = h // p, w // p

        # Patchify (+ sincos position) and add the projected self-conditioning tokens.
        x = self.patch_embed(hidden_states)  # (B, N, D), tokens in row-major order
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
        if "rope" in self.config.pos_embed:
            rope = rope_2d(self.config.attention_head_dim, gh, gw, self.config.rope_theta, device=x.device)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, emb, rope)
            else:
                x = block(x, emb, rope)
        last_hidden_state = x  # (B, N, D): what self-conditioning feeds back

        # Final adaLN + linear, then unpatchify.
        shift, scale = self.proj_out_1(F.silu(emb)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        x = self.proj_out_2(x)  # (B, N, p * p * C_out)
        x = x.reshape(b, gh, gw, p, p, self.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C_out, gh, p, gw, p)
        sample = x.reshape(b, self.out_channels, gh * p, gw * p)

        if not return_dict:
            return sample, last_hidden_state
        return SelfConditionedDiTOutput(sample=sample, last_hidden_state=last_hidden_state)
