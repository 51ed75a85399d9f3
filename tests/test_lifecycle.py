"""Checkpoint lifecycle: averaging, initialising from weights (with or without the optimizer),
resuming on another machine, and the causal model's dependence on the past only.

Initialisation runs use ``optimization.lr=[0.0]``: the weights saved after one
update must then equal the weights training started from, so each test sees
exactly what was loaded; Adam's step counter shows whether its state was kept.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils

import melhubert_fairseq
from melhubert_fairseq.models.mel_hubert import MelHubertConfig, MelHubertModel
from melhubert_fairseq.tools.average_checkpoints import main as average_main
from melhubert_fairseq.tools.average_checkpoints import newest_checkpoints
from melhubert_fairseq.tools.convert_original_checkpoint import main as convert_main
from helpers import TINY_MODEL_OVERRIDES, TINY_ORIGINAL_CONFIG, make_fbank_corpus, make_reference, run_hydra_train, save_original

melhubert_fairseq.register_with_fairseq()  # registers the plugin and the checkpoint allow-list

FROZEN = ["optimization.lr=[0.0]"]  # one update that cannot move the weights


def load_state(path: Path) -> dict:
    """A fairseq checkpoint through the weights-only loader."""
    return torch.load(path, map_location="cpu", weights_only=True)


def adam_steps(state: dict) -> set:
    """Adam's per-parameter step counters in a checkpoint."""
    return {int(s["step"]) for s in state["last_optimizer_state"]["state"].values()}


def updates(state: dict) -> int:
    """The checkpoint's update count."""
    return int(state["optimizer_history"][-1]["num_updates"])


def assert_same_weights(a: dict, b: dict) -> None:
    """Every tensor of two model state_dicts is identical (NaN stats included)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A 3-update run saving checkpoint_1_1.pt, checkpoint_1_2.pt and checkpoint_last.pt (K=32)."""
    root = tmp_path_factory.mktemp("lifecycle")
    data = make_fbank_corpus(root / "data")
    run_hydra_train(data, root / "run", max_update=3,
                    overrides=["checkpoint.save_interval_updates=1", "dataset.max_tokens=400"])
    return root


@pytest.mark.slow  # base_run trains with fairseq-hydra-train
def test_average_of_update_checkpoints_is_their_mean_and_initialises_training(base_run, tmp_path):
    run = base_run / "run"
    assert newest_checkpoints(str(run), 2, update_based=True) == [str(run / "checkpoint_1_2.pt"), str(run / "checkpoint_1_1.pt")]
    assert average_main(["--inputs", str(run), "--num-update-checkpoints", "2", "--output", str(tmp_path / "avg.pt")]) == 0
    first, second = load_state(run / "checkpoint_1_1.pt"), load_state(run / "checkpoint_1_2.pt")
    averaged = load_state(tmp_path / "avg.pt")
    for name, tensor in first["model"].items():
        expected = (tensor.double() + second["model"][name].double()) / 2
        torch.testing.assert_close(averaged["model"][name], expected.float(), rtol=0, atol=0, equal_nan=True, msg=name)
    assert not torch.equal(first["model"]["final_proj.weight"], second["model"]["final_proj.weight"])
    # The rest is the newest input's, as fairseq's scripts/average_checkpoints.py keeps it.
    assert updates(averaged) == 2 and adam_steps(averaged) == adam_steps(second) == {2}
    assert averaged["extra_state"]["train_iterator"] == second["extra_state"]["train_iterator"]
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(tmp_path / "avg.pt")])
    assert type(models[0]).__name__ == "MelHubertModel"

    # restore_file continues the newest input's schedule at its update: 3 more updates, not a new run of 5.
    restored = run_hydra_train(base_run / "data", tmp_path / "restored", max_update=5, overrides=[
        f"checkpoint.restore_file={tmp_path / 'avg.pt'}", "dataset.max_tokens=400",
    ])
    log = restored.stdout + restored.stderr
    assert f"Loaded checkpoint {tmp_path / 'avg.pt'} (epoch 1 @ 2 updates)" in log
    assert re.findall(r'\[train_inner\]\[INFO\] - .*"num_updates": "(\d+)"', log) == ["3", "4", "5"]  # one per update
    assert updates(load_state(tmp_path / "restored" / "checkpoint_last.pt")) == 5

    # Initialise from the averaged weights (fresh optimizer): checkpoint.finetune_from_model.
    run_hydra_train(base_run / "data", tmp_path / "init", max_update=1,
                    overrides=[f"checkpoint.finetune_from_model={tmp_path / 'avg.pt'}", *FROZEN])
    initialised = load_state(tmp_path / "init" / "checkpoint_last.pt")
    assert_same_weights(initialised["model"], averaged["model"])
    assert updates(initialised) == 1 and adam_steps(initialised) == {1}


@pytest.mark.slow  # base_run trains with fairseq-hydra-train
def test_averaging_refuses_mismatched_checkpoints(base_run, tmp_path):
    state = load_state(base_run / "run" / "checkpoint_1_1.pt")
    state["model"]["final_proj.weight"] = state["model"]["final_proj.weight"][:8]
    torch.save(state, tmp_path / "small_k.pt")
    with pytest.raises(ValueError, match="final_proj.weight"):
        average_main(["--inputs", str(base_run / "run" / "checkpoint_1_2.pt"), str(tmp_path / "small_k.pt"),
                      "--output", str(tmp_path / "avg.pt")])
    assert not (tmp_path / "avg.pt").exists()


def test_epoch_checkpoint_selection_takes_the_newest(tmp_path):
    for name in ("checkpoint2.pt", "checkpoint10.pt", "checkpoint9.pt", "checkpoint_3_100.pt", "checkpoint_last.pt"):
        (tmp_path / name).touch()
    assert newest_checkpoints(str(tmp_path), 2, update_based=False) == [str(tmp_path / "checkpoint10.pt"),
                                                                        str(tmp_path / "checkpoint9.pt")]
    # Too few: the error lists what the folder holds and which names are averaged.
    with pytest.raises(ValueError, match=r"it has 1; its \.pt files: checkpoint10\.pt, checkpoint2\.pt, checkpoint9\.pt, "
                       r"checkpoint_3_100\.pt, checkpoint_last\.pt\. --num-update-checkpoints averages checkpoint_<epoch>_<update>\.pt"):
        newest_checkpoints(str(tmp_path), 2, update_based=True)


@pytest.mark.slow  # base_run trains with fairseq-hydra-train
def test_initialise_with_weights_and_optimizer_state(base_run, tmp_path):
    # The original's `-i CKPT --init_optimizer_from_initial_weight`: restore_file without reset_optimizer.
    start = base_run / "run" / "checkpoint_last.pt"
    run_hydra_train(base_run / "data", tmp_path / "cont", max_update=4, overrides=[
        f"checkpoint.restore_file={start}", "checkpoint.reset_dataloader=true", "checkpoint.reset_meters=true",
        "checkpoint.reset_lr_scheduler=true", *FROZEN,
    ])
    before, after = load_state(start), load_state(tmp_path / "cont" / "checkpoint_last.pt")
    assert_same_weights(after["model"], before["model"])
    assert adam_steps(before) == {3} and adam_steps(after) == {4}  # Adam continued, not restarted
    assert updates(after) == 4
    # Relaunched with the same command (pre-empted, or a longer max_update), it resumes its own
    # checkpoint_last.pt: restore_file, like finetune_from_model, is for the first launch.
    relaunch = run_hydra_train(base_run / "data", tmp_path / "cont", max_update=5, overrides=[
        f"checkpoint.restore_file={start}", "checkpoint.reset_dataloader=true", "checkpoint.reset_meters=true",
        "checkpoint.reset_lr_scheduler=true", *FROZEN,
    ])
    assert "is for the first launch" in relaunch.stdout + relaunch.stderr
    assert updates(load_state(tmp_path / "cont" / "checkpoint_last.pt")) == 5


@pytest.mark.slow  # base_run trains with fairseq-hydra-train
def test_converted_original_continues_with_its_adam_state(base_run, tmp_path):
    cfg = {**TINY_ORIGINAL_CONFIG, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128, "conv_pos": 16, "num_cluster": 32}
    save_original(tmp_path / "orig.ckpt", make_reference(cfg), cfg, step=10)
    convert_main([str(tmp_path / "orig.ckpt"), str(tmp_path / "converted.pt"), "--with-optimizer"])
    run_hydra_train(base_run / "data", tmp_path / "cont", max_update=11, overrides=[
        f"checkpoint.restore_file={tmp_path / 'converted.pt'}", "checkpoint.reset_dataloader=true",
        "checkpoint.reset_meters=true", "checkpoint.reset_lr_scheduler=true", *FROZEN,
    ])
    converted, after = load_state(tmp_path / "converted.pt"), load_state(tmp_path / "cont" / "checkpoint_last.pt")
    assert_same_weights(after["model"], converted["model"])
    assert adam_steps(after) == {2} and updates(after) == 11  # the original's one Adam step, plus one here


@pytest.mark.slow  # base_run trains with fairseq-hydra-train
def test_resume_on_another_machine_with_moved_data(base_run, tmp_path):
    # Machine A: a copy of the base run. Machine B gets the run folder and the data at new paths.
    shutil.copytree(base_run / "run", tmp_path / "a" / "run")
    shutil.copytree(base_run / "data", tmp_path / "a" / "data")
    shutil.copytree(tmp_path / "a" / "run", tmp_path / "b" / "run")
    data_b = tmp_path / "b" / "corpus"
    shutil.copytree(tmp_path / "a" / "data", data_b)
    manifest = (data_b / "train.tsv").read_text().split("\n", 1)
    (data_b / "train.tsv").write_text(f"{data_b / 'feats'}\n{manifest[1]}")
    shutil.rmtree(tmp_path / "a")

    result = run_hydra_train(data_b, tmp_path / "b" / "run", max_update=4,
                             overrides=["checkpoint.save_interval_updates=1", "dataset.max_tokens=400"])
    assert f"Loaded checkpoint {tmp_path / 'b' / 'run' / 'checkpoint_last.pt'}" in result.stdout + result.stderr
    resumed = load_state(tmp_path / "b" / "run" / "checkpoint_last.pt")
    assert updates(resumed) == 4 and adam_steps(resumed) == {4}
    assert resumed["cfg"]["checkpoint"]["save_dir"] == str(tmp_path / "b" / "run")


def causal_model(attention_type: str) -> MelHubertModel:
    """A tiny 20 ms model in eval mode."""
    torch.manual_seed(0)
    tiny = dict(override.split("=") for override in TINY_MODEL_OVERRIDES)
    cfg = MelHubertConfig(
        feat_dim=40, stack_frames=2, num_classes=8, mask_seed=0, attention_type=attention_type,
        **{key.split(".")[1]: int(value) for key, value in tiny.items()},
    )
    return MelHubertModel(cfg).eval()


@pytest.mark.parametrize("attention_type", ["causal", "original"])
def test_causal_output_depends_only_on_present_and_past_frames(attention_type):
    model = causal_model(attention_type)
    frames, cut = 40, 25
    x = torch.randn(2, frames, 80)
    changed = x.clone()
    changed[:, cut:] = torch.randn(2, frames - cut, 80)
    padding = torch.zeros(2, frames, dtype=torch.bool)
    padding[1, 33:] = True  # a padded utterance in the batch too
    with torch.no_grad():
        a = model.extract_features(x, padding)
        b = model.extract_features(changed, padding)
    for ours, theirs in zip(a["layer_results"] + [a["x"]], b["layer_results"] + [b["x"]]):
        past_moved = (ours[:, :cut] - theirs[:, :cut]).abs().max().item()
        assert (ours[:, cut:] - theirs[:, cut:]).abs().max() > 1e-3
        if attention_type == "causal":
            assert past_moved < 1e-6, f"frames before {cut} changed by {past_moved}"
        else:
            assert past_moved > 1e-3  # the bidirectional model sees the future: the check can detect leaks
