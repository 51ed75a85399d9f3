"""Faster CPU versions of three operations of the encoder, behind one switch.

Each computes what the plain torch operation computes (tests/test_speed_equivalence.py)
and pays on CPU where torch has no fused kernel (benchmarks/bench_dropout.py,
benchmarks/bench_pos_conv.py; benchmarks/README.md says what each costs and buys):

* :func:`keep_mask` / :func:`dropout`: dropout masks from 16-bit lanes of numpy's
  SFC64 output instead of torch's serial Bernoulli sampler;
* :func:`softmax_attention`: SDPA's math path with such a mask (SDPA has no fused
  CPU kernel with dropout);
* :class:`TimeMajorConv1d`: the positional conv as a channels-last 2-D convolution.

They run only on CPU tensors and only while :func:`use_cpu_kernels` leaves them on
(the default); GPUs always take torch's own kernels.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

_enabled = True


def active(device: torch.device) -> bool:
    """Whether the CPU kernels serve tensors on ``device``."""
    return _enabled and device.type == "cpu"


@contextlib.contextmanager
def use_cpu_kernels(enabled: bool) -> Iterator[None]:
    """Turn the CPU kernels on or off inside the block (plain torch everywhere when off)."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def keep_mask(shape: Tuple[int, ...], p: float) -> torch.Tensor:
    """Boolean CPU dropout mask: each entry False (dropped) with probability ``p`` rounded to a multiple of 2**-16.

    torch's CPU dropout samples with a serial Bernoulli generator; 16-bit lanes of
    numpy's SFC64 draw the same mask about 10x faster (benchmarks/bench_dropout.py,
    2.2 against 22 ms for a 2 x 12 x 400 x 400 attention mask). The generator is
    seeded from torch's, so ``torch.manual_seed`` (fairseq seeds every update) makes
    the mask reproducible. 16 bits give p to 1.5e-5 (0.1 -> 0.100006); FlashAttention
    quantises its dropout probability to 8 bits.
    """
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    count = math.prod(shape)
    # Raw 64-bit outputs cut into four 16-bit lanes: 2.3x faster than drawing 16-bit integers.
    raw = np.random.SFC64(seed).random_raw((count + 3) // 4)
    # Read as int16 the lanes are uniform on [-2**15, 2**15); numpy compares the fresh
    # buffer in about half the time torch takes (measured on 3.8M entries).
    lanes = raw.view(np.int16)[:count].reshape(shape)
    return torch.from_numpy(lanes >= int(round(p * 2**16)) - 2**15)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode ``F.dropout(x, p)`` with the kept entries from :func:`keep_mask`."""
    # where() reads the boolean mask as is; multiplying by it would convert it to floats forward and backward.
    return torch.where(keep_mask(x.shape, p), x, 0.0).mul_(1.0 / (1.0 - p))


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    keep: torch.Tensor,
    p: float,
) -> torch.Tensor:
    """SDPA's math path with a given dropout mask: softmax(q k^T / sqrt(d) | attn_mask) * ``keep`` @ v / (1 - p).

    The same function as ``torch.ops.aten._scaled_dot_product_attention_math(q, k, v,
    attn_mask, p, dropout_mask=keep)`` (tested), for CPU training only: SDPA has no
    fused CPU kernel with dropout and would sample its mask with the slow Bernoulli
    generator (see :func:`keep_mask`).
    """
    scores = torch.matmul(q * q.size(-1) ** -0.5, k.transpose(-2, -1))
    if attn_mask is not None:
        scores = scores.masked_fill_(~attn_mask, float("-inf"))
    # Softmax at least in fp32 (bf16/fp16 under autocast), as SDPA's math path and fairseq's attention do.
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    probs = torch.where(keep, probs, 0.0).to(v.dtype)
    return torch.matmul(probs, v * (1.0 / (1.0 - p)))


class TimeMajorConv1d(nn.Conv1d):
    """``nn.Conv1d`` (same parameters) that on CPU, while the kernels are on, runs as a channels-last 2-D convolution.

    The encoder hands the positional conv the (B, C, T) transpose of its (B, T, C)
    activations. As a (B, C, 1, T) channels-last tensor oneDNN reads that in place and
    writes the transpose of a contiguous (B, T, C) output; its channels-last kernels
    ran HuBERT's 128-tap, 16-group conv 1.85x faster forward and 1.5x forward+backward
    (T=400, batch 2, benchmarks/bench_pos_conv.py). GPUs keep ``nn.Conv1d``'s path.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if not active(input.device) or self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        out = F.conv2d(
            input.unsqueeze(2),
            weight.unsqueeze(2),
            bias,
            stride=(1, self.stride[0]),
            padding=(0, self.padding[0]),
            dilation=(1, self.dilation[0]),
            groups=self.groups,
        )
        return out.squeeze(2)
