"""The original release's causal Mel-HuBERT: attention masked to the past, positional conv centred.

Conversion, export and the causality of both causal variants, against the independent
reference of tests/helpers.py (``attention_type: causal`` there is the release's forward).
"""
from __future__ import annotations

import argparse
import sys

import pytest
import torch

from helpers import (
    TINY_ORIGINAL_CONFIG,
    assert_same_hidden_states,
    load_converted,
    make_fbank_corpus,
    make_reference,
    padded_input,
    run_hydra_train,
    save_original,
)
from melhubert_fairseq.checkpoint_loading import safe_torch_load
from melhubert_fairseq.original.convert import build_fairseq_cfg, build_model, convert_config, fairseq_checkpoint_state
from melhubert_fairseq.tools.convert_original_checkpoint import main as convert_main
from melhubert_fairseq.tools.export_original_checkpoint import main as export_main

CAUSAL_CASES = {
    "20ms-postLN": {},
    "20ms-preLN": {"layer_norm_first": True},
    "10ms-postLN": {"feat_emb_dim": 40},
    "10ms-preLN": {"feat_emb_dim": 40, "layer_norm_first": True},
}


#: ``Args`` as the original release's train.py saves them (nervjack2/Speech-SSL-Compression, July 2022).
RELEASE_ARGS = argparse.Namespace(
    runner_config="config_runner.yaml", upstream_config="config_model.yaml", expdir="exp", past_exp=None,
    initial_weight=None, init_optimizer_from_initial_weight=False, seed=1337, device="cuda", multi_gpu=False,
)


def causal_config(case: str) -> dict:
    return {**TINY_ORIGINAL_CONFIG, "attention_type": "causal", **CAUSAL_CASES[case]}


@pytest.mark.parametrize("case", sorted(CAUSAL_CASES))
def test_release_causal_checkpoint_converts_to_masked_attention_and_centred_conv(tmp_path, capsys, case):
    cfg = causal_config(case)
    # The release's own section, and the one its code wrote after 2022 (both mask attention).
    section = "hubert" if case.endswith("postLN") else "melhubert"
    reference = make_reference(cfg)
    save_original(tmp_path / "causal.ckpt", reference, cfg, section=section, args=RELEASE_ARGS)
    assert convert_main([str(tmp_path / "causal.ckpt"), str(tmp_path / "ours.pt")]) == 0
    captured = capsys.readouterr()
    assert "converted as the original release's causal model" in captured.err
    assert "look like nervjack2/MelHuBERT" not in captured.err  # release Args: no hint of the later repository
    assert "causal attention + centred positional conv" in captured.out
    assert "model.attention_type=causal model.pos_conv_causal=false" in captured.out  # the training overrides
    model, fairseq_cfg = load_converted(tmp_path / "ours.pt")
    assert fairseq_cfg.model.attention_type == "causal" and fairseq_cfg.model.pos_conv_causal is False
    assert_same_hidden_states(model, reference, cfg["feat_emb_dim"])
    # The mask matters: the bidirectional reading of the same weights is far from the release's forward.
    bidirectional = make_reference({**cfg, "attention_type": "original"})
    feat, valid = padded_input(cfg["feat_emb_dim"])
    with torch.no_grad():
        gap = (reference(feat, valid)[0] - bidirectional(feat, valid)[0])[valid].abs().max()
    assert gap > 1e-2


def test_later_repository_flag_converts_causal_as_bidirectional(tmp_path, capsys):
    cfg = causal_config("20ms-postLN")
    reference = make_reference(cfg)
    save_original(tmp_path / "later.ckpt", reference, cfg, section="melhubert")  # Args of nervjack2/MelHuBERT
    # Without the flag: the release's reading, with a hint that the Args look like the later repository's.
    assert convert_main([str(tmp_path / "later.ckpt"), str(tmp_path / "default.pt")]) == 0
    assert "look like nervjack2/MelHuBERT's train.py (frame_period, no multi_gpu)" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "later.ckpt"), str(tmp_path / "ours.pt"), "--later-repo"]) == 0
    assert "converted as bidirectional (--later-repo)" in capsys.readouterr().err
    model, fairseq_cfg = load_converted(tmp_path / "ours.pt")
    assert fairseq_cfg.model.attention_type == "original"
    # What nervjack2/MelHuBERT computes with these weights: no mask at all.
    later = make_reference({**cfg, "attention_type": "original"})
    later.load_state_dict(reference.state_dict())
    assert_same_hidden_states(model, later.eval(), 80)


@pytest.mark.parametrize(
    "section, args, evidence",
    [("hubert", None, "it holds Upstream_Config['hubert'], which only the original release's code writes"),
     ("melhubert", RELEASE_ARGS, "its Args has multi_gpu, a flag of the original release's train.py")],
    ids=["release-config-section", "release-args"],
)
def test_later_repository_flag_on_a_release_file_is_one_error_line(tmp_path, monkeypatch, capsys, section, args, evidence):
    cfg = causal_config("10ms-postLN")
    save_original(tmp_path / "release.ckpt", make_reference(cfg), cfg, section=section, args=args)
    monkeypatch.setattr(sys, "argv", ["melhubert-convert-original", str(tmp_path / "release.ckpt"),
                                      str(tmp_path / "out.pt"), "--later-repo"])
    assert convert_main() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("error:")] == err[-1:] and "Traceback" not in "".join(err)
    assert err[-1].startswith(f"error: {tmp_path / 'release.ckpt'}: --later-repo contradicts the checkpoint: {evidence}")
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("case", ["20ms-preLN", "10ms-postLN"])
def test_export_of_the_release_causal_model_and_reconversion_are_identical(tmp_path, capsys, case):
    cfg = causal_config(case)
    reference = make_reference(cfg)
    save_original(tmp_path / "causal.ckpt", reference, cfg, section="hubert", args=RELEASE_ARGS)
    convert_main([str(tmp_path / "causal.ckpt"), str(tmp_path / "ours.pt")])
    assert export_main([str(tmp_path / "ours.pt"), str(tmp_path / "back.ckpt")]) == 0
    assert "written as Upstream_Config['hubert']" in capsys.readouterr().err
    original = safe_torch_load(str(tmp_path / "causal.ckpt"), [argparse.Namespace])
    exported = torch.load(tmp_path / "back.ckpt", map_location="cpu", weights_only=True)
    assert exported["Upstream_Config"] == original["Upstream_Config"] == {"hubert": cfg}
    assert list(exported["model"]) == list(original["model"])
    assert all(torch.equal(exported["model"][key], tensor) for key, tensor in original["model"].items())

    convert_main([str(tmp_path / "back.ckpt"), str(tmp_path / "again.pt")])
    first = torch.load(tmp_path / "ours.pt", map_location="cpu", weights_only=True)
    again = torch.load(tmp_path / "again.pt", map_location="cpu", weights_only=True)
    assert list(again["model"]) == list(first["model"])
    for key, tensor in first["model"].items():  # bit for bit (fbank_mean_std: NaN, unknown, in both)
        torch.testing.assert_close(again["model"][key], tensor, rtol=0, atol=0, equal_nan=True, msg=key)
    assert again["cfg"]["model"] == first["cfg"]["model"]


def test_the_strictly_causal_model_is_refused_by_export_with_the_reason(tmp_path, monkeypatch, capsys):
    fairseq_cfg = build_fairseq_cfg(convert_config({**TINY_ORIGINAL_CONFIG, "attention_type": "causal"}))
    fairseq_cfg["model"]["pos_conv_causal"] = None  # follows attention_type: a causal conv
    torch.save(fairseq_checkpoint_state(build_model(fairseq_cfg).state_dict(), fairseq_cfg, 3), tmp_path / "strict.pt")
    monkeypatch.setattr(sys, "argv", ["melhubert-export-original", str(tmp_path / "strict.pt"), str(tmp_path / "o.ckpt")])
    assert export_main() == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "attention_type=causal with a causal positional conv (model.pos_conv_causal)" in line
    assert "would read 3 frames ahead" in line and not (tmp_path / "o.ckpt").exists()


def random_model(**model_overrides):
    fairseq_cfg = build_fairseq_cfg(convert_config(TINY_ORIGINAL_CONFIG))
    fairseq_cfg["model"].update(model_overrides)
    torch.manual_seed(0)
    return build_model(fairseq_cfg).eval()


def outputs_up_to(model, feat: torch.Tensor, frame: int):
    """Every hidden state (layer input and each layer's output) at frames 0..frame."""
    with torch.no_grad():
        return [h[:, : frame + 1] for h in model.extract_features(feat, mask=False)["hidden_states"]]


@pytest.mark.parametrize(
    "variant, lookahead",
    [({"pos_conv_causal": False}, 3), ({"pos_conv_causal": None}, 0), ({"pos_conv_causal": True}, 0)],
    ids=["release-centred-conv", "strict-by-default", "strict-explicit"],
)
def test_changing_frames_after_t_changes_nothing_at_t_beyond_what_the_conv_reads(variant, lookahead):
    model = random_model(attention_type="causal", **variant)
    assert model.lookahead_frames() == lookahead  # conv_pos 8: a centred conv reads (8 - 1) // 2 frames ahead
    feat = torch.randn(2, 30, 80)
    t = 12
    changed = feat.clone()
    changed[:, t + lookahead + 1 :] = torch.randn_like(changed[:, t + lookahead + 1 :]) * 5
    for before, after in zip(outputs_up_to(model, feat, t), outputs_up_to(model, changed, t)):
        torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    # ... while the frame just at the edge of what it reads does change the output at t.
    edge = feat.clone()
    edge[:, t + lookahead] += 5
    assert (outputs_up_to(model, edge, t)[-1][:, t] - outputs_up_to(model, feat, t)[-1][:, t]).abs().max() > 1e-3


def test_bidirectional_model_sees_every_frame():
    model = random_model(attention_type="original")
    assert model.lookahead_frames() is None
    feat = torch.randn(1, 30, 80)
    changed = feat.clone()
    changed[:, -1] += 5
    assert (outputs_up_to(model, changed, 0)[-1] - outputs_up_to(model, feat, 0)[-1]).abs().max() > 1e-3


@pytest.mark.slow  # trains with fairseq-hydra-train
def test_a_converted_release_causal_checkpoint_trains_with_the_printed_overrides(tmp_path, capsys):
    cfg = causal_config("20ms-postLN")
    save_original(tmp_path / "causal.ckpt", make_reference(cfg), cfg, section="hubert", args=RELEASE_ARGS)
    convert_main([str(tmp_path / "causal.ckpt"), str(tmp_path / "ours.pt")])
    overrides = capsys.readouterr().out.split("train from it with these overrides: ")[1].split()
    data = make_fbank_corpus(tmp_path / "data", num_utts=4, num_classes=16)
    run_hydra_train(data, tmp_path / "run", num_classes=16, max_update=1, tiny=False, overrides=[
        *[o for o in overrides if not o.startswith("task.num_classes=")],
        f"checkpoint.finetune_from_model={tmp_path / 'ours.pt'}", "task.min_sample_size=10",
    ])
    trained, trained_cfg = load_converted(tmp_path / "run" / "checkpoint_last.pt")
    assert trained_cfg.model.attention_type == "causal" and trained_cfg.model.pos_conv_causal is False
    assert trained.lookahead_frames() == 3


def test_a_file_of_the_releases_own_2022_pretraining_script_converts(tmp_path):
    # Its pretrain_expert.add_state_to_save (July-December 2022) stored the weights under 'Model'.
    cfg = causal_config("10ms-preLN")
    reference = make_reference(cfg)
    save_original(tmp_path / "release.ckpt", reference, cfg, section="hubert", args=RELEASE_ARGS)
    state = safe_torch_load(str(tmp_path / "release.ckpt"), [argparse.Namespace])
    state["Model"] = state.pop("model")
    torch.save(state, tmp_path / "release-2022.ckpt")
    assert convert_main([str(tmp_path / "release-2022.ckpt"), str(tmp_path / "ours.pt")]) == 0
    model, _ = load_converted(tmp_path / "ours.pt")
    assert_same_hidden_states(model, reference, 40)
