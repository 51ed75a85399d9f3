"""Converting original Mel-HuBERT ``.ckpt`` files: same hidden states, strict keys, safe loading.

The original model is the independent reference of tests/helpers.py.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import melhubert_fairseq
from helpers import TINY_ORIGINAL_CONFIG, load_converted, make_reference, padded_input, save_original
from melhubert_fairseq.checkpoint_loading import UnsafeCheckpointError, safe_torch_load
from melhubert_fairseq.file_sniffing import CheckpointFormatError
from melhubert_fairseq.original.convert import convert_original_checkpoint
from melhubert_fairseq.original.format import original_checkpoint_safe_globals
from melhubert_fairseq.tools.convert_original_checkpoint import main as convert_main

melhubert_fairseq.register_with_fairseq()  # fairseq knows the task, model and criteria by name

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
