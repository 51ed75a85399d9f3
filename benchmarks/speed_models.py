"""Models and inputs of the speed benchmarks (bench_train_step.py, bench_inference.py, gpu_check.py).

Everything the two benchmarks compare is built here from the real code:

* Mel-HuBERT (``mel_hubert``) from the model section of ``config/pretrain/stage1.yaml``,
  at 10, 20 or 40 ms frames (``stack_frames`` 1, 2, 4);
* the "straightforward implementation": the same model with every ``self_attn``
  swapped for fairseq's ``MultiheadAttention`` running its Python multi-head
  attention (bmm + fp32 softmax + dropout + bmm), torch's ``nn.Dropout`` in place
  of our CPU dropout and fairseq's ``make_conv_pos`` (``nn.Conv1d``) positional conv, same weights;
* fairseq's HuBERT Base (``fairseq.models.hubert.HubertModel``) as its
  LibriSpeech Base recipe configures it (conv waveform front end, 12 x 768,
  label_rate 50) and its ``hubert`` criterion.

All models see the same audio: HuBERT the 16 kHz waveform, Mel-HuBERT the
Kaldi fbank of that waveform (computed once, outside the timed region, as the
data loader would). Timing interleaves the cases round by round so machine
load drifts hit all of them alike; the reported figure is the median.
"""
from __future__ import annotations

import glob
import os
from typing import List, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from melhubert_fairseq.data.fbank import compute_fbank, load_audio
from melhubert_fairseq.data.features import FBANK_SAMPLE_RATE, stack_frames
from melhubert_fairseq.models.components import Dropout, SelfAttention
from melhubert_fairseq.models.mel_hubert import MelHubertConfig, MelHubertModel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1_CONFIG = os.path.join(REPO_ROOT, "config", "pretrain", "stage1.yaml")
DEMO_CORPUS = os.path.join(REPO_ROOT, "demo", "corpus")
NUM_CLASSES = 512


# --- inputs ------------------------------------------------------------------------------------


def load_benchmark_audio(num_utterances: int, seconds: float) -> List[np.ndarray]:
    """``num_utterances`` 16 kHz waveforms of exactly ``seconds`` s, made by joining demo corpus files.

    Falls back to seeded noise when the demo corpus is absent (speed does not depend on content).
    """
    files = sorted(glob.glob(os.path.join(DEMO_CORPUS, "*", "*.flac")))
    samples = int(round(seconds * FBANK_SAMPLE_RATE))
    rng = np.random.default_rng(0)
    waves = []
    cursor = 0
    for _ in range(num_utterances):
        if not files:
            waves.append((0.1 * rng.standard_normal(samples)).astype(np.float32))
            continue
        pieces, have = [], 0
        while have < samples:
            piece = load_audio(files[cursor % len(files)])
            cursor += 1
            pieces.append(piece)
            have += len(piece)
        waves.append(np.concatenate(pieces)[:samples].astype(np.float32))
    return waves


def fbank_inputs(waves: Sequence[np.ndarray], stack: int) -> torch.Tensor:
    """(B, T, 40 * stack) normalised, stacked Kaldi fbank of ``waves`` (all the same length)."""
    feats = [compute_fbank(w) for w in waves]
    frames = np.concatenate(feats)
    mean, std = frames.mean(0), frames.std(0) + 1e-5
    stacked = [stack_frames((f - mean) / std, stack) for f in feats]
    length = min(len(s) for s in stacked)
    return torch.from_numpy(np.stack([s[:length] for s in stacked]).astype(np.float32))


# --- models ------------------------------------------------------------------------------------


def mel_hubert_config(stack: int, **overrides) -> MelHubertConfig:
    """The Base model of config/pretrain/stage1.yaml at ``stack`` fbank frames per model frame."""
    stage1 = OmegaConf.load(STAGE1_CONFIG)
    model_section = OmegaConf.to_container(stage1["model"])
    model_section.pop("_name", None)
    model_section.update(feat_dim=stage1.task.feat_dim, stack_frames=stack, num_classes=NUM_CLASSES, mask_seed=1)
    model_section.update(overrides)
    return MelHubertConfig(**model_section)


def build_mel_hubert(stack: int, **overrides) -> MelHubertModel:
    """Mel-HuBERT Base (pretrain/stage1.yaml) at 10/20/40 ms for ``stack`` 1/2/4."""
    return MelHubertModel(mel_hubert_config(stack, **overrides))


class PythonMultiheadAttention(nn.Module):
    """fairseq's ``MultiheadAttention`` behind our ``SelfAttention`` interface, same weights.

    fairseq hands attention to ``F.multi_head_attention_forward`` (torch's fused
    path, itself SDPA in torch 2) unless ``skip_embed_dim_check`` is set; setting
    it runs fairseq's own Python implementation: q scaling, bmm, fp32 softmax,
    dropout, bmm, the "straightforward implementation" of the benchmark.
    """

    def __init__(self, ours: SelfAttention) -> None:
        super().__init__()
        from fairseq.modules import MultiheadAttention

        embed_dim = ours.q_proj.in_features
        self.attention = MultiheadAttention(embed_dim, ours.num_heads, dropout=ours.dropout, self_attention=True)
        self.attention.skip_embed_dim_check = True
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(self.attention, name).load_state_dict(getattr(ours, name).state_dict())

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        key_padding_mask = None
        if attn_mask is not None:
            if attn_mask.size(-2) != 1:
                raise ValueError("PythonMultiheadAttention takes padding masks only (no causal attention)")
            key_padding_mask = ~attn_mask[:, 0, 0, :]
        time_major = x.transpose(0, 1)
        out, _ = self.attention(time_major, time_major, time_major, key_padding_mask=key_padding_mask, need_weights=False)
        return out.transpose(0, 1)


def straightforward_copy(model: MelHubertModel) -> MelHubertModel:
    """A copy of ``model`` on the unoptimised path: fairseq's Python attention, torch's
    ``nn.Dropout`` and fairseq's positional conv (``nn.Conv1d``);
    same weights, same function."""
    from fairseq.models.wav2vec.wav2vec2 import make_conv_pos

    baseline = MelHubertModel(model.cfg)
    baseline.load_state_dict(model.state_dict())
    cfg = model.cfg
    if cfg.pos_conv_depth == 1 and str(cfg.attention_type) != "causal":
        plain_conv = make_conv_pos(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups)
        plain_conv.load_state_dict(baseline.encoder.pos_conv.state_dict())
        baseline.encoder.pos_conv = plain_conv
    for layer in baseline.encoder.layers:
        layer.self_attn = PythonMultiheadAttention(layer.self_attn)
    for parent in baseline.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, Dropout):
                setattr(parent, name, nn.Dropout(child.p))
    return baseline.to(next(model.parameters()).device)


def build_hubert_base(num_classes: int = NUM_CLASSES, **overrides):
    """fairseq's HuBERT Base as examples/hubert/config/pretrain/hubert_base_librispeech.yaml sets it up.

    ``overrides`` replace HubertConfig fields (the encoder sizes share Mel-HuBERT's names).
    """
    from fairseq.data import Dictionary
    from fairseq.models.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    settings = dict(
        label_rate=50,
        extractor_mode="default",
        encoder_layers=12,
        encoder_embed_dim=768,
        encoder_ffn_embed_dim=3072,
        encoder_attention_heads=12,
        mask_prob=0.80,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        encoder_layerdrop=0.05,
        dropout_input=0.1,
        dropout_features=0.1,
        feature_grad_mult=0.1,
        final_dim=256,
        untie_final_proj=True,
        skip_masked=False,
        skip_nomask=False,
    )
    settings.update(overrides)
    cfg = HubertConfig(**settings)
    task_cfg = HubertPretrainingConfig(label_rate=50, sample_rate=FBANK_SAMPLE_RATE, labels=["km"])
    dictionary = Dictionary()
    for cluster in range(num_classes):
        dictionary.add_symbol(str(cluster))
    return HubertModel(cfg, task_cfg, [dictionary])
