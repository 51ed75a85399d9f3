"""Converting original Mel-HuBERT ``.ckpt`` files: same hidden states, strict keys, safe loading.

The reference model below is written from the published architecture
(nervjack2/MelHuBERT model.py/module.py: fairseq wav2vec2's
TransformerSentenceEncoderLayer, fairseq MultiheadAttention, HuBERT's
convolutional positional embedding) without using this package's model code,
and saved exactly as the original ``pretrain_expert.save_model`` does.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from torch import nn

import melhubert_fairseq  # noqa: F401  (registers the plugin)
from melhubert_fairseq.original_checkpoint import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    convert_original_checkpoint,
    original_checkpoint_safe_globals,
    safe_torch_load,
)
from melhubert_fairseq.tools.convert_original_checkpoint import main as convert_main

TINY_ORIGINAL_CONFIG = {
    "feat_emb_dim": 80,
    "pos_emb_type": "conv",
    "pos_conv_depth": 1,
    "conv_pos": 8,
    "conv_pos_groups": 4,
    "encoder_layers": 2,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 4,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "attention_type": "original",
    "num_cluster": 16,
    "pred_masked_weight": 1.0,
    "pred_nomask_weight": 0.0,
    "skip_masked": False,
    "skip_nomask": True,
    "mask_prob": 0.7,
    "mask_length": 5,
    "mask_selection": "static",
    "mask_other": 0.0,
    "no_mask_overlap": False,
    "mask_min_space": 1,
    "learnable_mask_emb": False,
    "mask_before_proj": True,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.1,
    "encoder_layerdrop": 0.0,
}


class ReferenceAttention(nn.Module):
    """fairseq MultiheadAttention as the original registers it (k, v, q, out), in explicit math."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, padding):
        batch, frames, dim = x.shape
        head_dim = dim // self.heads

        def heads(t):
            return t.view(batch, frames, self.heads, head_dim).transpose(1, 2)

        q = heads(self.q_proj(x) * head_dim**-0.5)
        scores = q @ heads(self.k_proj(x)).transpose(-1, -2)
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        context = scores.softmax(-1) @ heads(self.v_proj(x))
        return self.out_proj(context.transpose(1, 2).reshape(batch, frames, dim))


class ReferenceLayer(nn.Module):
    """TransformerSentenceEncoderLayer: post-LN, or pre-LN with ``layer_norm_first``."""

    def __init__(self, dim: int, ffn: int, heads: int, layer_norm_first: bool) -> None:
        super().__init__()
        self.self_attn = ReferenceAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = layer_norm_first

    def forward(self, x, padding):
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), padding)
            return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, padding))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class ReferenceSamePad(nn.Module):
    """Drop the extra frame an even kernel with padding k//2 produces."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x):
        return x[:, :, : -self.remove] if self.remove else x


class ReferenceEncoder(nn.Module):
    """Conv positional embedding, layers, and the LayerNorm placed as HuBERT does."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim, kernel = cfg["encoder_embed_dim"], cfg["conv_pos"]
        conv = nn.Conv1d(dim, dim, kernel_size=kernel, padding=kernel // 2, groups=cfg["conv_pos_groups"])
        conv = nn.utils.weight_norm(conv, name="weight", dim=2)
        self.pos_conv = nn.Sequential(conv, ReferenceSamePad(kernel), nn.GELU())
        self.layers = nn.ModuleList(
            ReferenceLayer(dim, cfg["encoder_ffn_embed_dim"], cfg["encoder_attention_heads"], cfg["layer_norm_first"])
            for _ in range(cfg["encoder_layers"])
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg["layer_norm_first"]

    def forward(self, x, padding):
        x = x.masked_fill(padding[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        hidden = []
        for layer in self.layers:
            x = layer(x, padding)
            hidden.append(x)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x, hidden


class ReferenceMelHuBERT(nn.Module):
    """MelHuBERTModel's parameter layout and eval-mode forward (no masking)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim = cfg["encoder_embed_dim"]
        self.pre_extract_proj = nn.Linear(cfg["feat_emb_dim"], dim) if cfg["feat_emb_dim"] != dim else None
        self.encoder = ReferenceEncoder(cfg)
        if cfg["learnable_mask_emb"]:
            self.mask_emb = nn.Parameter(torch.rand(cfg["feat_emb_dim"] if cfg["mask_before_proj"] else dim))
        self.final_proj = nn.Linear(dim, cfg["num_cluster"])

    def forward(self, feat, valid):
        """``valid`` is the original's pad_mask: True on real frames."""
        x = self.pre_extract_proj(feat) if self.pre_extract_proj is not None else feat
        return self.encoder(x, ~valid)


def make_reference(cfg: dict, seed: int = 0) -> ReferenceMelHuBERT:
    """A reference model with every parameter (LayerNorms included) random, so no mapping error hides."""
    torch.manual_seed(seed)
    model = ReferenceMelHuBERT(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / math.sqrt(max(param.shape[-1], 1)))
    return model.eval()


def save_original(path: Path, model: nn.Module, cfg: dict, section: str = "melhubert", args=None, step: int = 1234):
    """Save as pretrain_expert.save_model does (with an Adam state after one step)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0)
    feat = torch.randn(2, 12, cfg["feat_emb_dim"])
    model.train()
    out, _ = model(feat, torch.ones(2, 12, dtype=torch.bool))
    model.final_proj(out).square().mean().backward()
    optimizer.step()
    model.eval()
    torch.save(
        {
            "Optimizer": optimizer.state_dict(),
            "Step": step,
            "Args": args if args is not None else argparse.Namespace(
                runner_config="config_runner.yaml", upstream_config="config_model.yaml", expdir="exp",
                frame_period=20, initial_weight=None, init_optimizer_from_initial_weight=False, seed=1337, device="cuda",
            ),
            "Runner": {"runner": {"n_epochs": 200, "total_steps": 1000}, "optimizer": {"lr": 1e-4, "betas": [0.9, 0.999]}},
            "model": model.state_dict(),
            "Upstream_Config": {section: cfg},
        },
        path,
    )
    return optimizer


def padded_input(dim: int, lengths=(23, 15), seed: int = 1):
    """A random padded batch and the original's valid-frame mask."""
    generator = torch.Generator().manual_seed(seed)
    feat = torch.randn(len(lengths), max(lengths), dim, generator=generator)
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return feat.masked_fill(~valid[..., None], 0.0), valid


def load_converted(path: Path):
    """Load through fairseq exactly as users do."""
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    return models[0].eval(), cfg


CASES = {
    "20ms-postLN": {},
    "10ms-postLN": {"feat_emb_dim": 40},
    "20ms-preLN": {"layer_norm_first": True},
    "20ms-poisson-spans": {"mask_selection": "poisson", "mask_other": 1.0},
    "10ms-preLN-learnable-mask": {"feat_emb_dim": 40, "layer_norm_first": True, "learnable_mask_emb": True},
    "10ms-no-pre-extract-proj": {"feat_emb_dim": 40, "encoder_embed_dim": 40, "learnable_mask_emb": True,
                                 "mask_before_proj": False},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_model_reproduces_every_layer(tmp_path, case):
    cfg = {**TINY_ORIGINAL_CONFIG, **CASES[case]}
    reference = make_reference(cfg)
    section = "hubert" if case == "10ms-postLN" else "melhubert"  # the older release's config key
    save_original(tmp_path / "orig.ckpt", reference, cfg, section=section)
    assert convert_main([str(tmp_path / "orig.ckpt"), str(tmp_path / "converted.pt")]) == 0

    model, fairseq_cfg = load_converted(tmp_path / "converted.pt")
    assert fairseq_cfg.task.stack_frames == cfg["feat_emb_dim"] // 40
    assert fairseq_cfg.model.layer_norm_first == cfg["layer_norm_first"]
    feat, valid = padded_input(cfg["feat_emb_dim"])
    with torch.no_grad():
        expected_x, expected_layers = reference(feat, valid)
        out = model.extract_features(feat, padding_mask=~valid, mask=False)
    assert len(out["layer_results"]) == len(expected_layers) == cfg["encoder_layers"]
    for index, (ours, theirs) in enumerate(zip(out["layer_results"], expected_layers), start=1):
        torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0, msg=f"layer {index} differs")
    torch.testing.assert_close(out["x"][valid], expected_x[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        model.cluster_logits(out["x"])[valid], reference.final_proj(expected_x)[valid], atol=1e-5, rtol=0
    )
    if cfg["learnable_mask_emb"]:
        torch.testing.assert_close(model.mask_emb, reference.mask_emb)


def test_converted_file_holds_only_plain_types_and_can_continue_adam(tmp_path):
    cfg = dict(TINY_ORIGINAL_CONFIG)
    reference = make_reference(cfg)
    optimizer = save_original(tmp_path / "orig.ckpt", reference, cfg)
    result = convert_original_checkpoint(str(tmp_path / "orig.ckpt"), with_optimizer=True)
    torch.save(result.state, tmp_path / "converted.pt")

    # Loads under the weights-only unpickler even with no extra class allowed at all.
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        state = torch.load(tmp_path / "converted.pt", map_location="cpu", weights_only=True)
    finally:
        torch.serialization.add_safe_globals(saved)
    assert state["optimizer_history"][-1]["num_updates"] == 1234

    # Adam moments follow their parameter by name although the two models order parameters differently.
    model, _ = load_converted(tmp_path / "converted.pt")
    ours = [name for name, _ in model.named_parameters()]
    theirs = [name for name, _ in reference.named_parameters()]
    assert ours != theirs
    for position, name in enumerate(theirs):
        expected = optimizer.state_dict()["state"][position]
        converted = state["last_optimizer_state"]["state"][ours.index(name)]
        torch.testing.assert_close(converted["exp_avg"], expected["exp_avg"], msg=name)
        torch.testing.assert_close(converted["exp_avg_sq"], expected["exp_avg_sq"], msg=name)
        assert converted["step"] == 1
    assert state["last_optimizer_state"]["param_groups"][0]["params"] == list(range(len(ours)))


def test_unknown_and_missing_state_dict_keys_are_listed(tmp_path):
    cfg = dict(TINY_ORIGINAL_CONFIG)
    reference = make_reference(cfg)
    save_original(tmp_path / "orig.ckpt", reference, cfg)
    state = safe_torch_load(str(tmp_path / "orig.ckpt"), original_checkpoint_safe_globals())
    state["model"]["encoder.extra_gate.weight"] = torch.zeros(3)
    del state["model"]["encoder.layers.1.fc2.bias"]
    torch.save(state, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointFormatError) as err:
        convert_main([str(tmp_path / "bad.ckpt"), str(tmp_path / "out.pt")])
    assert "encoder.extra_gate.weight" in str(err.value) and "encoder.layers.1.fc2.bias" in str(err.value)
    assert not (tmp_path / "out.pt").exists()


def test_unknown_config_key_is_an_error_unless_ignored(tmp_path):
    cfg = {**TINY_ORIGINAL_CONFIG, "relative_position_buckets": 320}
    save_original(tmp_path / "orig.ckpt", make_reference(cfg), cfg)
    with pytest.raises(CheckpointFormatError, match="relative_position_buckets"):
        convert_main([str(tmp_path / "orig.ckpt"), str(tmp_path / "out.pt")])
    convert_main([str(tmp_path / "orig.ckpt"), str(tmp_path / "out.pt"), "--ignore-config-key", "relative_position_buckets"])
    assert (tmp_path / "out.pt").exists()


class RunsShellCommand:
    """A pickle payload: unpickling it would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_args_is_refused_without_running_it(tmp_path):
    cfg = dict(TINY_ORIGINAL_CONFIG)
    marker = tmp_path / "code_was_executed"
    args = argparse.Namespace(expdir="exp", payload=RunsShellCommand(marker))
    save_original(tmp_path / "evil.ckpt", make_reference(cfg), cfg, args=args)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        convert_main([str(tmp_path / "evil.ckpt"), str(tmp_path / "out.pt")])
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_original_causal_flag_converts_to_what_the_original_computed(tmp_path, capsys):
    # The original never passes an attention mask, so its 'causal' models attend both ways.
    cfg = {**TINY_ORIGINAL_CONFIG, "attention_type": "causal"}
    reference = make_reference(cfg)
    save_original(tmp_path / "orig.ckpt", reference, cfg)
    convert_main([str(tmp_path / "orig.ckpt"), str(tmp_path / "out.pt")])
    assert "applies no causal mask" in capsys.readouterr().err
    model, fairseq_cfg = load_converted(tmp_path / "out.pt")
    assert fairseq_cfg.model.attention_type == "original"
    feat, valid = padded_input(80)
    with torch.no_grad():
        torch.testing.assert_close(model.extract_features(feat, ~valid)["x"][valid], reference(feat, valid)[0][valid],
                                   atol=1e-5, rtol=0)


def masked_counts(model, lengths, update: int) -> list:
    """Masked frames per utterance of one training-mode forward on a padded batch (masks vary with the update)."""
    feat, valid = padded_input(80, lengths=lengths)
    model.train()
    model.set_num_updates(update)
    with torch.no_grad():
        out = model(feat, padding_mask=~valid, sample_ids=torch.arange(len(lengths)))
    return out["mask_indices"].sum(dim=1).tolist()


def test_oldmask_file_name_selects_equal_mask_counts_per_batch(tmp_path):
    cfg = dict(TINY_ORIGINAL_CONFIG)
    reference = make_reference(cfg)
    save_original(tmp_path / "melhubert-20ms-oldmask.ckpt", reference, cfg)
    save_original(tmp_path / "melhubert-20ms.ckpt", reference, cfg)
    convert_main([str(tmp_path / "melhubert-20ms-oldmask.ckpt"), str(tmp_path / "old.pt")])
    convert_main([str(tmp_path / "melhubert-20ms.ckpt"), str(tmp_path / "new.pt")])
    old_model, old_cfg = load_converted(tmp_path / "old.pt")
    new_model, new_cfg = load_converted(tmp_path / "new.pt")
    assert old_cfg.model.require_same_masks and not new_cfg.model.require_same_masks
    lengths = (200, 120, 60)
    for update in range(3):
        counts = masked_counts(old_model, lengths, update)
        assert len(set(counts)) == 1 and counts[0] > 0, counts
    assert all(len(set(masked_counts(new_model, lengths, update))) > 1 for update in range(3))


def test_mean_std_is_stored_in_the_checkpoint(tmp_path):
    cfg = dict(TINY_ORIGINAL_CONFIG)
    save_original(tmp_path / "orig.ckpt", make_reference(cfg), cfg)
    stats = np.stack([np.linspace(-3, 3, 40), np.linspace(1, 2, 40)]).astype(np.float32)
    np.save(tmp_path / "libri-360-mean-std.npy", stats)
    convert_main([str(tmp_path / "orig.ckpt"), str(tmp_path / "out.pt"), "--mean-std", str(tmp_path / "libri-360-mean-std.npy")])
    model, _ = load_converted(tmp_path / "out.pt")
    mean, std = model.fbank_stats()
    np.testing.assert_array_equal(mean.numpy(), stats[0])
    np.testing.assert_array_equal(std.numpy(), stats[1])
    with pytest.raises(FileExistsError):
        convert_main([str(tmp_path / "orig.ckpt"), str(tmp_path / "out.pt")])


def test_loading_ignores_label_dictionaries_of_the_current_directory(tmp_path, monkeypatch):
    # A converted model has no training data; its K comes from the file, not from ./dict.km.txt.
    cfg = dict(TINY_ORIGINAL_CONFIG)
    save_original(tmp_path / "orig.ckpt", make_reference(cfg), cfg)
    convert_main([str(tmp_path / "orig.ckpt"), str(tmp_path / "out.pt")])
    (tmp_path / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(100)))
    monkeypatch.chdir(tmp_path)
    model, fairseq_cfg = load_converted(tmp_path / "out.pt")
    assert model.final_proj.out_features == fairseq_cfg.task.num_classes == 16
