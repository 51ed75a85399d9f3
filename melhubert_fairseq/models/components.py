"""Small building blocks of the Mel-HuBERT encoder, each doing one thing.

Parameter names follow fairseq's wav2vec2/HuBERT encoder (and so the original
Mel-HuBERT release): ``self_attn.{q,k,v,out}_proj``, ``self_attn_layer_norm``,
``fc1``, ``fc2``, ``final_layer_norm``, ``pos_conv.0.weight_g/weight_v``.
Faster CPU versions of some operations live apart, in :mod:`cpu_kernels`.
"""
from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules import SamePad, TransposeLast
from fairseq.utils import get_activation_fn
from torch import nn

from melhubert_fairseq.models import cpu_kernels
from melhubert_fairseq.errors import InputError


def make_conv_pos(embed_dim: int, kernel_size: int, groups: int, causal: bool = False) -> nn.Module:
    """HuBERT's positional conv (fairseq's ``make_conv_pos``: same parameters, init and output) as a
    :class:`cpu_kernels.TimeMajorConv1d`; ``causal`` pads on the left only, so frame t sees frames <= t."""
    padding = kernel_size - 1 if causal else kernel_size // 2
    conv = cpu_kernels.TimeMajorConv1d(embed_dim, embed_dim, kernel_size=kernel_size, padding=padding, groups=groups)
    nn.init.normal_(conv.weight, mean=0, std=math.sqrt(4.0 / (kernel_size * embed_dim)))
    nn.init.constant_(conv.bias, 0)
    # The deprecated hook-based weight_norm on purpose: it keeps the parameter names weight_g / weight_v of
    # fairseq's HuBERT and the original checkpoints (the parametrizations version renames them).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.nn\.utils\.weight_norm` is deprecated", category=FutureWarning)
        conv = nn.utils.weight_norm(conv, name="weight", dim=2)
    return nn.Sequential(conv, SamePad(kernel_size, causal=causal), nn.GELU())


def make_pos_conv(embed_dim: int, kernel_size: int, groups: int, depth: int, causal: bool = False) -> nn.Module:
    """Convolutional positional embedding: ``depth`` 1 is HuBERT's weight-normalised conv + GELU.

    HuBERT's conv is centred (it sees kernel_size // 2 future frames); ``causal``
    pads on the left only, so causal attention is not undone by the positional conv.
    """
    if depth == 1:
        return make_conv_pos(embed_dim, kernel_size, groups, causal=causal)
    # Deeper variant (data2vec 2.0 style): smaller kernels, parameter-free LayerNorm.
    k = max(3, kernel_size // depth)
    return nn.Sequential(
        *[
            nn.Sequential(
                cpu_kernels.TimeMajorConv1d(embed_dim, embed_dim, kernel_size=k, padding=k - 1 if causal else k // 2, groups=groups),
                SamePad(k, causal=causal),
                TransposeLast(),
                nn.LayerNorm(embed_dim, elementwise_affine=False),
                TransposeLast(),
                nn.GELU(),
            )
            for _ in range(depth)
        ]
    )


def pos_conv_lookahead(kernel_size: int, depth: int) -> int:
    """How many frames after t a centred :func:`make_pos_conv` reads for output t: (k - 1) // 2 per layer
    (an even kernel's ``SamePad`` drops the last output, so it reads k // 2 before and k // 2 - 1 after)."""
    k = kernel_size if depth == 1 else max(3, kernel_size // depth)
    return depth * ((k - 1) // 2)


def attention_mask(
    padding_mask: Optional[torch.Tensor], num_frames: int, causal: bool, device: torch.device
) -> Optional[torch.Tensor]:
    """Boolean SDPA mask (True = may attend) of shape (B|1, 1, T, T) or None when nothing is masked."""
    mask = None
    if padding_mask is not None and padding_mask.any():
        mask = (~padding_mask)[:, None, None, :]
    if causal:
        past = torch.ones(num_frames, num_frames, dtype=torch.bool, device=device).tril()[None, None]
        mask = past if mask is None else mask & past
    return mask


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout``, through :func:`cpu_kernels.dropout` on CPU while the CPU kernels are on."""
    if not training or p == 0.0:
        return x
    if cpu_kernels.active(x.device):
        return cpu_kernels.dropout(x, p)
    return F.dropout(x, p, True)


class Dropout(nn.Module):
    """``nn.Dropout`` through :func:`dropout` (no parameters; with the CPU kernels ``p`` is used to 2**-16)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise InputError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SelfAttention(nn.Module):
    """Multi-head self-attention on (B, T, C) through ``F.scaled_dot_product_attention``.

    SDPA runs flash / memory-efficient kernels on GPU and flash attention on CPU
    without dropout. CPU training with attention dropout has no fused kernel: there
    (while the CPU kernels are on) SDPA's math path runs as
    :func:`cpu_kernels.softmax_attention` with a mask from :func:`cpu_kernels.keep_mask`.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise InputError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        batch, frames, channels = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, frames, heads, channels // heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        p = self.dropout if self.training else 0.0
        if p > 0.0 and cpu_kernels.active(x.device):
            out = cpu_kernels.softmax_attention(q, k, v, attn_mask, cpu_kernels.keep_mask((batch, heads, frames, frames), p), p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(batch, frames, channels))


class TransformerLayer(nn.Module):
    """BERT-style encoder layer: post-LN (original Mel-HuBERT) or pre-LN (``layer_norm_first``)."""

    def __init__(
        self,
        embed_dim: int,
        ffn_dim: int,
        num_heads: int,
        dropout: float,
        attention_dropout: float,
        activation_dropout: float,
        activation_fn: str,
        layer_norm_first: bool,
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttention(embed_dim, num_heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim)
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.final_layer_norm = nn.LayerNorm(embed_dim)
        self.activation_fn = get_activation_fn(activation_fn)
        self.dropout = Dropout(dropout)
        self.activation_dropout = Dropout(activation_dropout)
        self.layer_norm_first = layer_norm_first

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """fc1 -> activation -> dropout -> fc2 -> dropout."""
        x = self.activation_dropout(self.activation_fn(self.fc1(x)))
        return self.dropout(self.fc2(x))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if self.layer_norm_first:
            x = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), attn_mask))
            return x + self.feed_forward(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x + self.dropout(self.self_attn(x, attn_mask)))
        return self.final_layer_norm(x + self.feed_forward(x))


class TransformerEncoder(nn.Module):
    """Positional conv + a stack of TransformerLayers (+ final LayerNorm placement of HuBERT)."""

    def __init__(
        self,
        embed_dim: int,
        layers: List[TransformerLayer],
        conv_pos: int,
        conv_pos_groups: int,
        pos_conv_depth: int,
        dropout: float,
        layer_norm_first: bool,
        layerdrop: float,
        causal: bool,
        pos_conv_causal: Optional[bool] = None,
    ) -> None:
        super().__init__()
        # The conv follows the attention unless told otherwise: the original release's causal model
        # masks attention but keeps HuBERT's centred conv (pos_conv_causal=False).
        self.pos_conv_causal = causal if pos_conv_causal is None else bool(pos_conv_causal)
        self.pos_conv = make_pos_conv(embed_dim, conv_pos, conv_pos_groups, pos_conv_depth, causal=self.pos_conv_causal)
        self.pos_conv_lookahead = 0 if self.pos_conv_causal else pos_conv_lookahead(conv_pos, pos_conv_depth)
        self.layers = nn.ModuleList(layers)
        self.layer_norm = nn.LayerNorm(embed_dim)
        self.dropout = Dropout(dropout)
        self.layer_norm_first = layer_norm_first
        self.layerdrop = layerdrop
        self.causal = causal

    def layer_input(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Input of the first transformer layer, (B, T, C): x + positional conv (+ LayerNorm if post-LN), dropout."""
        if padding_mask is not None:
            # Padded frames must not leak into real ones through the positional conv.
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        return self.dropout(x)

    def run_layers(
        self,
        x: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
        output_layer: Optional[int] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Run the layers on :meth:`layer_input`'s output; return the output and every layer's (B, T, C)
        output, stopping after layer ``output_layer`` (1-based; 0 runs none)."""
        if output_layer == 0:
            return x, []
        mask = attention_mask(padding_mask, x.size(1), self.causal, x.device)
        layer_results = []
        for index, layer in enumerate(self.layers, start=1):
            skip = self.training and self.layerdrop > 0 and torch.rand(()) < self.layerdrop
            if not skip:
                x = layer(x, mask)
            layer_results.append(x)
            if output_layer is not None and index >= output_layer:
                return x, layer_results
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x, layer_results

    def forward(
        self,
        x: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
        output_layer: Optional[int] = None,
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Return the encoder output and the hidden states (B, T, C), index = layer number: the input of
        the first layer, then every layer's output, stopping at ``output_layer``."""
        layer_input = self.layer_input(x, padding_mask)
        x, layer_results = self.run_layers(layer_input, padding_mask, output_layer)
        return x, [layer_input, *layer_results]
