"""Exporting our checkpoints to the original Mel-HuBERT format: the inverse of conversion, loaded by the original model.

The original model is the independent reference of tests/helpers.py.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (
    TINY_ORIGINAL_CONFIG,
    ReferenceMelHuBERT,
    assert_same_hidden_states,
    load_converted,
    make_reference,
    padded_input,
    save_original,
)
from melhubert_fairseq.checkpoint_loading import safe_torch_load
from melhubert_fairseq.original.convert import build_fairseq_cfg, build_model, convert_config, fairseq_checkpoint_state
from melhubert_fairseq.tools.convert_original_checkpoint import main as convert_main
from melhubert_fairseq.tools.export_original_checkpoint import main as export_main


def load_plain(path: Path) -> dict:
    """Load under the weights-only unpickler with no class allowed beyond torch's own plain types."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    finally:
        torch.serialization.add_safe_globals(saved)


def original_model_from_export(exported: dict) -> ReferenceMelHuBERT:
    """Build the original model from the export's own config and load its weights strictly."""
    reference = ReferenceMelHuBERT(exported["Upstream_Config"]["melhubert"])
    reference.load_state_dict(exported["model"], strict=True)
    return reference.eval()


def save_ours(path: Path, stack_frames: int = 2, stats: bool = True, **model_overrides):
    """A mel_hubert checkpoint with every weight random (LayerNorms included), as training here would save it."""
    cfg = build_fairseq_cfg(convert_config(TINY_ORIGINAL_CONFIG))
    cfg["task"]["stack_frames"] = cfg["model"]["stack_frames"] = stack_frames
    if "feat_dim" in model_overrides:
        cfg["task"]["feat_dim"] = model_overrides["feat_dim"]
    cfg["model"].update(model_overrides)
    model = build_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 1.0 / math.sqrt(max(param.shape[-1], 1))
            param.copy_(1.0 + 0.3 * torch.randn_like(param) if "layer_norm.weight" in name else scale * torch.randn_like(param))
        if stats:
            model.set_fbank_stats(torch.linspace(-1, 1, model.cfg.feat_dim), torch.linspace(1, 2, model.cfg.feat_dim))
    torch.save(fairseq_checkpoint_state(model.state_dict(), cfg, num_updates=7), path)
    return model.eval()


def run_cli(monkeypatch, capsys, *args: str):
    """Run melhubert-export-original as the console script does; return (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["melhubert-export-original", *map(str, args)])
    code = export_main()
    return code, capsys.readouterr().err


ROUND_TRIP_CASES = {
    "10ms-postLN": ({"feat_emb_dim": 40}, "melhubert-10ms.ckpt"),
    "20ms-postLN": ({}, "melhubert-20ms.ckpt"),
    "10ms-preLN": ({"feat_emb_dim": 40, "layer_norm_first": True}, "melhubert-10ms.ckpt"),
    "20ms-preLN-oldmask": ({"layer_norm_first": True}, "melhubert-20ms-oldmask.ckpt"),
    "20ms-postLN-oldmask": ({}, "stage2-oldmask.ckpt"),
    "10ms-no-pre-extract-proj": ({"feat_emb_dim": 40, "encoder_embed_dim": 40}, "melhubert-10ms.ckpt"),
}


@pytest.mark.parametrize("case", sorted(ROUND_TRIP_CASES))
def test_export_of_a_converted_original_gives_back_the_original(tmp_path, case):
    overrides, name = ROUND_TRIP_CASES[case]
    cfg = {**TINY_ORIGINAL_CONFIG, **overrides}
    optimizer = save_original(tmp_path / name, make_reference(cfg), cfg)
    convert_main([str(tmp_path / name), str(tmp_path / "ours.pt"), "--with-optimizer"])
    (tmp_path / "back").mkdir()
    assert export_main([str(tmp_path / "ours.pt"), str(tmp_path / "back" / name), "--with-optimizer"]) == 0

    original = safe_torch_load(str(tmp_path / name), [argparse.Namespace])
    exported = load_plain(tmp_path / "back" / name)
    assert list(exported["model"]) == list(original["model"])  # same keys, in the original's order
    for key, tensor in original["model"].items():
        assert exported["model"][key].dtype == tensor.dtype and torch.equal(exported["model"][key], tensor), key
    assert exported["Upstream_Config"] == original["Upstream_Config"] == {"melhubert": cfg}
    assert exported["Step"] == original["Step"] == 1234
    assert set(exported) == {"model", "Upstream_Config", "Step", "Optimizer"}

    # The Adam state comes back in the original's parameter order, moments bit for bit.
    theirs = optimizer.state_dict()
    assert exported["Optimizer"]["param_groups"][0]["params"] == theirs["param_groups"][0]["params"]
    for key in ("lr", "eps", "weight_decay", "amsgrad"):
        assert exported["Optimizer"]["param_groups"][0][key] == theirs["param_groups"][0][key]
    assert list(exported["Optimizer"]["param_groups"][0]["betas"]) == list(theirs["param_groups"][0]["betas"])
    assert sorted(exported["Optimizer"]["state"]) == sorted(theirs["state"])
    for index, moments in theirs["state"].items():
        mine = exported["Optimizer"]["state"][index]
        assert mine["step"] == int(moments["step"])
        assert torch.equal(mine["exp_avg"], moments["exp_avg"]) and torch.equal(mine["exp_avg_sq"], moments["exp_avg_sq"])

    # Converting the export again selects the same masking from the file name.
    convert_main([str(tmp_path / "back" / name), str(tmp_path / "again.pt")])
    _, first_cfg = load_converted(tmp_path / "ours.pt")
    _, again_cfg = load_converted(tmp_path / "again.pt")
    assert again_cfg.model.require_same_masks == first_cfg.model.require_same_masks == ("oldmask" in name)


def test_trained_checkpoint_loads_strictly_into_the_original_model_with_our_hidden_states(
    tiny_checkpoint, tmp_path, monkeypatch, capsys
):
    out, stats = tmp_path / "melhubert.ckpt", tmp_path / "mean-std.npy"
    code, err = run_cli(monkeypatch, capsys, tiny_checkpoint, out, "--mean-std-out", stats, "--with-optimizer")
    assert code == 0, err
    exported = load_plain(out)
    assert set(exported) == {"model", "Upstream_Config", "Step", "Optimizer"}
    assert exported["Step"] == 2
    config = exported["Upstream_Config"]["melhubert"]
    assert (config["feat_emb_dim"], config["encoder_layers"], config["num_cluster"]) == (80, 2, 32)

    ours, _ = load_converted(tiny_checkpoint)
    reference = original_model_from_export(exported)
    assert_same_hidden_states(ours, reference, 80)
    # The corpus statistics, as the original's mean-std.npy: row 0 mean, row 1 std.
    np.testing.assert_array_equal(np.load(stats), np.stack([np.full(40, 0.5), np.full(40, 2.0)]).astype(np.float32))

    # The original runner's -i ... --init_optimizer_from_initial_weight: Adam(model.parameters()).load_state_dict.
    adam = torch.optim.Adam(reference.parameters(), lr=1.0)
    adam.load_state_dict(exported["Optimizer"])
    fairseq_state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["last_optimizer_state"]["state"]
    our_names = [name for name, _ in ours.named_parameters()]
    for name, param in reference.named_parameters():
        torch.testing.assert_close(adam.state[param]["exp_avg"], fairseq_state[our_names.index(name)]["exp_avg"], rtol=0, atol=0)
    assert adam.param_groups[0]["lr"] == 1e-4
    reference.train()
    reference.final_proj(reference(*padded_input(80))[0]).square().mean().backward()
    adam.step()  # continues with the exported moments

    code, err = run_cli(monkeypatch, capsys, tiny_checkpoint, out)
    assert code == 2 and "already exists" in err.splitlines()[-1]


@pytest.mark.parametrize(
    "layout, expected_note",
    [
        ({"stack_frames": 1, "layer_norm_first": True}, None),
        ({"stack_frames": 4, "learnable_mask_emb": True}, "only 10/20 ms input"),
    ],
    ids=["10ms-preLN", "40ms-learnable-mask"],
)
def test_models_trained_here_reproduce_in_the_original(tmp_path, monkeypatch, capsys, layout, expected_note):
    ours = save_ours(tmp_path / "ours.pt", **layout)
    code, err = run_cli(monkeypatch, capsys, tmp_path / "ours.pt", tmp_path / "out.ckpt")
    assert code == 0, err
    exported = load_plain(tmp_path / "out.ckpt")
    assert_same_hidden_states(ours, original_model_from_export(exported), 40 * layout["stack_frames"])
    assert "not written: pass --mean-std-out" in err
    if expected_note:
        assert expected_note in err and "mask embedding with .to('cuda')" in err
        torch.testing.assert_close(original_model_from_export(exported).mask_emb, ours.mask_emb, rtol=0, atol=0)


def write_hubert(path: Path) -> None:
    torch.save({"cfg": {"model": {"_name": "hubert"}, "task": {"_name": "hubert_pretraining"}}, "model": {}}, path)


def write_wav2vec(path: Path) -> None:
    torch.save({"args": argparse.Namespace(arch="wav2vec2", task="audio_pretraining"), "model": {}}, path)


def write_npy(path: Path) -> None:
    with open(path, "wb") as handle:
        np.save(handle, np.zeros((2, 40), np.float32))


def write_original(path: Path) -> None:
    save_original(path, make_reference(TINY_ORIGINAL_CONFIG), TINY_ORIGINAL_CONFIG)


@pytest.mark.parametrize(
    "writer, reason",
    [
        (write_hubert, "a fairseq 'hubert' checkpoint, not 'mel_hubert'"),
        (write_wav2vec, "a fairseq 'wav2vec2' checkpoint, not 'mel_hubert'"),
        (write_npy, "not a torch checkpoint: it is a NumPy .npy array of shape (2, 40), float32"),
        (write_original, "already in the original Mel-HuBERT format"),
    ],
    ids=["fairseq-hubert", "fairseq-wav2vec2", "npy", "original-ckpt"],
)
def test_files_that_are_not_mel_hubert_checkpoints_are_refused(tmp_path, monkeypatch, capsys, writer, reason):
    source = tmp_path / "model.pt"
    writer(source)
    code, err = run_cli(monkeypatch, capsys, source, tmp_path / "out.ckpt")
    assert code == 2
    assert err.splitlines()[-1].startswith(f"error: {source}: {reason}")
    assert "Traceback" not in err and not (tmp_path / "out.ckpt").exists()


REFUSED = {
    "strictly-causal": ({"attention_type": "causal"}, "attention_type=causal with a causal positional conv (model.pos_conv_causal)"),
    "deep-pos-conv": ({"pos_conv_depth": 2}, "pos_conv_depth=2: the original's multi-layer positional conv calls an undefined LayerNorm"),
    "swish": ({"activation_fn": "swish"}, "activation_fn=swish: the original knows only relu, gelu, gelu_accurate, tanh, linear"),
    "mask-after-proj": ({"mask_before_proj": False}, "mask_before_proj=false: the original's masked forward"),
    "80-bin-fbank": ({"feat_dim": 80}, "feat_dim=80: the original reads 40-bin fbank frames"),
    "30ms-frames": ({"stack_frames": 3}, "stack_frames=3: only 10, 20 and 40 ms frames"),
    "no-layers": ({"encoder_layers": 0}, "encoder_layers=0: the original makes an empty encoder a bare GELU"),
    "trained-square-projection": (
        {"stack_frames": 1, "encoder_embed_dim": 40},
        "feat_emb_dim = encoder_embed_dim = 40, where the original has no pre_extract_proj, and this model's is not the identity",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_models_the_original_cannot_run_are_refused_with_the_reason(tmp_path, monkeypatch, capsys, case):
    overrides, reason = REFUSED[case]
    save_ours(tmp_path / "ours.pt", **overrides)
    code, err = run_cli(monkeypatch, capsys, tmp_path / "ours.pt", tmp_path / "out.ckpt", "--mean-std-out", tmp_path / "ms.npy")
    line = err.splitlines()[-1]
    assert code == 2 and line.startswith(f"error: {tmp_path / 'ours.pt'}: the original Mel-HuBERT code cannot run this model: ")
    assert reason in line
    assert not (tmp_path / "out.ckpt").exists() and not (tmp_path / "ms.npy").exists()


def test_every_refusal_is_listed_at_once(tmp_path, monkeypatch, capsys):
    save_ours(tmp_path / "ours.pt", attention_type="causal", activation_fn="relu_squared")
    code, err = run_cli(monkeypatch, capsys, tmp_path / "ours.pt", tmp_path / "out.ckpt")
    assert code == 2 and "attention_type=causal" in err.splitlines()[-1] and "activation_fn=relu_squared" in err.splitlines()[-1]


def test_missing_statistics_or_optimizer_are_errors_before_anything_is_written(tmp_path, monkeypatch, capsys):
    save_ours(tmp_path / "ours.pt", stats=False)
    code, err = run_cli(monkeypatch, capsys, tmp_path / "ours.pt", tmp_path / "out.ckpt", "--mean-std-out", tmp_path / "ms.npy")
    assert code == 2 and err.splitlines()[-1].startswith(f"error: {tmp_path / 'ours.pt'}: records no fbank mean/std")
    code, err = run_cli(monkeypatch, capsys, tmp_path / "ours.pt", tmp_path / "out.ckpt", "--with-optimizer")
    assert code == 2 and err.splitlines()[-1] == f"error: {tmp_path / 'ours.pt'}: has no optimizer state to export (drop --with-optimizer)"
    assert not (tmp_path / "out.ckpt").exists() and not (tmp_path / "ms.npy").exists()
