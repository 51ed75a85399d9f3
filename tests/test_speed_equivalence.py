"""The fast paths compute what the plain ones do.

* SDPA attention == explicit softmax(QK^T / sqrt(d)) V (padding and causal masks);
* the channels-last positional conv == fairseq's make_conv_pos (nn.Conv1d);
* the CPU training attention == torch's SDPA math path given the same dropout
  mask (outputs and gradients), and CPU dropout keeps F.dropout's distribution;
* the benchmarks' "straightforward implementation" (fairseq's Python
  multi-head attention) is the same function as our model, so the speed
  comparison is like for like;
* bf16 autocast keeps the loss in fp32 and close to the fp32 loss.
"""
from __future__ import annotations

import math

import pytest
import torch

from melhubert_fairseq.criterions.hard_label_masked_ce import HardLabelMaskedCe
from melhubert_fairseq.models.components import Dropout, SelfAttention, attention_mask, dropout, make_pos_conv
from melhubert_fairseq.models.cpu_kernels import TimeMajorConv1d, keep_mask, softmax_attention, use_cpu_kernels
from melhubert_fairseq.models.mel_hubert import MelHubertConfig, MelHubertModel
import speed_models


def tiny_model(**overrides) -> MelHubertModel:
    """2-layer, 64-dim Mel-HuBERT (20 ms) with the given config overrides."""
    settings = dict(
        feat_dim=40, stack_frames=2, num_classes=16, mask_seed=1, encoder_layers=2, encoder_embed_dim=64,
        encoder_ffn_embed_dim=128, encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4,
        mask_prob=0.7, mask_length=5,
    )
    settings.update(overrides)
    return MelHubertModel(MelHubertConfig(**settings))


def padding_for(lengths, frames=None) -> torch.Tensor:
    """(B, T) padding mask, True after each utterance's length."""
    frames = frames or max(lengths)
    return torch.arange(frames)[None, :] >= torch.tensor(lengths)[:, None]


# --- attention ---------------------------------------------------------------------------------


def explicit_attention(module: SelfAttention, x: torch.Tensor, allowed) -> torch.Tensor:
    """Multi-head attention written out: per-head softmax(q k^T / sqrt(d) + mask) v, then out_proj."""
    batch, frames, channels = x.shape
    heads, dim = module.num_heads, channels // module.num_heads
    q, k, v = (p(x).view(batch, frames, heads, dim).transpose(1, 2) for p in (module.q_proj, module.k_proj, module.v_proj))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v
    return module.out_proj(out.transpose(1, 2).reshape(batch, frames, channels))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_attention_matches_explicit_math(causal):
    torch.manual_seed(0)
    module = SelfAttention(64, 4, dropout=0.1).eval()
    x = torch.randn(3, 37, 64)
    padding = padding_for([37, 30, 12])
    allowed = attention_mask(padding, 37, causal, x.device)
    with torch.no_grad():
        ours = module(x, allowed)
        reference = explicit_attention(module, x, allowed)
    real = ~padding
    torch.testing.assert_close(ours[real], reference[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_training_attention_is_sdpa_math_with_the_same_dropout_mask(causal):
    torch.manual_seed(0)
    batch, heads, frames, dim = 3, 4, 29, 16
    q, k, v = (torch.randn(batch, heads, frames, dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    allowed = attention_mask(padding_for([29, 20, 7]), frames, causal, q.device)
    keep = keep_mask((batch, heads, frames, frames), 0.1)
    grad = torch.randn(batch, heads, frames, dim, dtype=torch.float64)

    ours = softmax_attention(q, k, v, allowed, keep, 0.1)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    # torch's own math path; called directly it wants an additive mask (SDPA converts booleans).
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    reference, _ = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, additive, 0.1, False, keep)
    reference_grads = torch.autograd.grad(reference, (q, k, v), grad)

    torch.testing.assert_close(ours, reference)
    for mine, theirs in zip(ours_grads, reference_grads):
        torch.testing.assert_close(mine, theirs)


def test_self_attention_uses_sdpa_without_dropout_and_draws_masks_from_the_torch_seed():
    torch.manual_seed(0)
    module = SelfAttention(32, 4, dropout=0.1)
    x = torch.randn(2, 21, 32)
    allowed = attention_mask(padding_for([21, 15]), 21, False, x.device)
    with torch.no_grad():
        torch.manual_seed(5)
        first = module(x, allowed)
        torch.manual_seed(5)
        again = module(x, allowed)
        other = module(x, allowed)
        module.dropout = 0.0
        no_dropout = module(x, allowed)
        evaluated = module.eval()(x, allowed)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other), "a new mask on every call"
    assert not torch.allclose(first, no_dropout)
    torch.testing.assert_close(no_dropout, evaluated, rtol=0, atol=0)


def test_keep_mask_rate_and_seed():
    torch.manual_seed(3)
    keep = keep_mask((2_000_000,), 0.1)
    assert keep.dtype == torch.bool and keep.shape == (2_000_000,)
    # 16-bit threshold: p = 6554 / 65536; binomial standard deviation ~2.1e-4.
    assert abs(1 - keep.float().mean().item() - 6554 / 65536) < 1e-3
    # Neighbouring entries (lanes of one 64-bit draw, and across draws) drop independently: P(both) = p**2.
    dropped = ~keep
    for lag in (1, 2, 3, 4):
        both = (dropped[lag:] & dropped[:-lag]).float().mean().item()
        assert abs(both - 0.01) < 5e-4, f"lag {lag}: {both}"
    torch.manual_seed(3)
    assert torch.equal(keep_mask((2_000_000,), 0.1), keep)
    assert keep_mask((1000,), 0.0).all()


def test_cpu_dropout_has_torch_dropout_distribution():
    torch.manual_seed(0)
    x = torch.full((1_000_000,), 2.0)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.9) < 0.002
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 2.0 / 0.9))
    assert abs(y.mean().item() - 2.0) < 0.01, "expectation preserved, as F.dropout"
    assert dropout(x, 0.1, training=False) is x and Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError):
        Dropout(1.0)


# --- positional convolution --------------------------------------------------------------------


def test_pos_conv_is_fairseqs_make_conv_pos():
    """Same parameter names, same init draws, same outputs and gradients, from the encoder's (B, T, C) layout."""
    from fairseq.models.wav2vec.wav2vec2 import make_conv_pos as fairseq_make_conv_pos

    torch.manual_seed(0)
    theirs = fairseq_make_conv_pos(64, 16, 4)
    torch.manual_seed(0)
    ours = make_pos_conv(64, 16, 4, depth=1)
    assert isinstance(ours[0], TimeMajorConv1d)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    time_major = torch.randn(3, 50, 64, dtype=torch.float64, requires_grad=True)
    ours.double(), theirs.double()
    grad = torch.randn(3, 64, 50, dtype=torch.float64)
    results = []
    for module, source in ((ours, time_major.transpose(1, 2)), (ours, time_major.transpose(1, 2).contiguous()), (theirs, time_major.transpose(1, 2))):
        out = module(source)
        results.append((out, *torch.autograd.grad(out, (time_major, *module.parameters()), grad)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal,depth", [(True, 1), (False, 2), (True, 3)])
def test_time_major_conv_equals_conv1d(causal, depth):
    """Every TimeMajorConv1d in a positional-conv stack computes what nn.Conv1d does with its parameters."""
    torch.manual_seed(0)
    stack = make_pos_conv(32, 12, 4, depth=depth, causal=causal).double()
    x = torch.randn(2, 32, 40, dtype=torch.float64)
    for conv in [m for m in stack.modules() if isinstance(m, TimeMajorConv1d)]:
        y = conv(x)
        weight = conv.weight  # weight norm recomputed it in the call above
        reference = torch.nn.functional.conv1d(x, weight, conv.bias, padding=conv.padding, groups=conv.groups)
        torch.testing.assert_close(y, reference)
    if causal:
        future = x.clone()
        future[..., 30:] += 1.0
        torch.testing.assert_close(stack(x)[..., :30], stack(future)[..., :30])


def test_benchmark_straightforward_model_is_the_same_function():
    torch.manual_seed(0)
    ours = tiny_model().eval()
    plain = speed_models.straightforward_copy(ours).eval()
    assert type(plain.encoder.layers[0].self_attn).__name__ == "PythonMultiheadAttention"
    assert type(plain.encoder.layers[0].dropout) is torch.nn.Dropout
    assert type(plain.encoder.pos_conv[0]) is torch.nn.Conv1d
    source = torch.randn(2, 40, 80)
    padding = padding_for([40, 27])
    with torch.no_grad():
        a = ours.extract_features(source, padding)["x"]
        b = plain.extract_features(source, padding)["x"]
    torch.testing.assert_close(a[~padding], b[~padding], atol=1e-5, rtol=1e-5)


# --- mixed precision ---------------------------------------------------------------------------


def test_bf16_autocast_keeps_the_loss_fp32_and_close():
    torch.manual_seed(0)
    model = tiny_model(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    criterion = HardLabelMaskedCe(task=None, pred_masked_weight=1.0, pred_nomask_weight=0.0)
    sample = {
        "net_input": {"source": torch.randn(2, 60, 80), "padding_mask": padding_for([60, 48]), "sample_ids": torch.tensor([0, 1])},
        "target": torch.randint(0, 16, (2, 60)),
        "ntokens": 108,
        "nsentences": 2,
    }
    loss32, size32, _ = criterion(model, sample)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, size16, _ = criterion(model, sample)
    assert loss16.dtype == torch.float32 and size16 == size32, "same masks, loss accumulated in fp32"
    assert abs(loss16.item() - loss32.item()) < 0.02 * loss32.item()
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cpu_training_attention_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))
    keep = keep_mask((2, 4, 33, 33), 0.1)
    exact = softmax_attention(q, k, v, None, keep, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = softmax_attention(q, k, v, None, keep, 0.1)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), exact, atol=0.05, rtol=0.05)


def test_cpu_kernels_switch_off_gives_torch_s_own_operations():
    """With the CPU kernels off, dropout is F.dropout bit for bit (same torch seed), attention is SDPA and the
    positional conv nn.Conv1d; with them on, the model computes the same function."""
    cfg = MelHubertConfig(
        feat_dim=40, stack_frames=2, num_classes=8, encoder_layers=2, encoder_embed_dim=32,
        encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=8, conv_pos_groups=4, mask_seed=1,
    )
    model = MelHubertModel(cfg).eval()
    frames = torch.randn(2, 30, 80)
    with torch.no_grad():
        on = model.extract_features(frames)["x"]
        with use_cpu_kernels(False):
            off = model.extract_features(frames)["x"]
    torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-5)
    x = torch.randn(64, 64)
    with use_cpu_kernels(False):
        torch.manual_seed(5)
        ours = dropout(x, 0.3, training=True)
    torch.manual_seed(5)
    assert torch.equal(ours, torch.nn.functional.dropout(x, 0.3, True))
    torch.manual_seed(5)
    assert not torch.equal(dropout(x, 0.3, training=True), ours), "on: the mask comes from keep_mask"
