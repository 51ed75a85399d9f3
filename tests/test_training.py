"""fairseq-hydra-train end to end: train, resume, load for inference."""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils

import melhubert_fairseq
from helpers import make_fbank_corpus, run_hydra_train
from melhubert_fairseq.checkpoint_loading import safe_torch_load

melhubert_fairseq.register_with_fairseq()  # registers the plugin and the checkpoint allow-list

pytestmark = pytest.mark.slow  # every test here runs fairseq-hydra-train (or uses the trained tiny_checkpoint)


def logged_updates(stdout: str):
    """Parse fairseq's json train_inner lines."""
    return [json.loads(m) for m in re.findall(r"\[train_inner\]\[INFO\] - (\{.*\})", stdout)]


def model_state(path):
    return safe_torch_load(str(path))["model"]


def test_train_resume_and_load(tmp_path):
    data = make_fbank_corpus(tmp_path / "data")
    save_dir = tmp_path / "ckpt"
    first = run_hydra_train(data, save_dir, max_update=2)
    updates = logged_updates(first.stdout)
    assert [int(u["num_updates"]) for u in updates] == [1, 2]
    assert all(float(u["acc_m"]) >= 0 and int(u["count_m"]) > 0 for u in updates)

    # Resume from checkpoint_last.pt (weights_only stays on: the plugin allow-lists fairseq's types).
    second = run_hydra_train(data, save_dir, max_update=4)
    assert "Loaded checkpoint" in second.stdout + second.stderr
    assert [int(u["num_updates"]) for u in logged_updates(second.stdout)] == [3, 4]

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(save_dir / "checkpoint_last.pt")])
    model = models[0].eval()
    assert type(model).__name__ == "MelHubertModel" and cfg.task.stack_frames == 2
    out = model.extract_features(torch.randn(1, 30, 80))
    assert out["x"].shape == (1, 30, 64) and len(out["layer_results"]) == 2


def test_resumed_run_repeats_uninterrupted_run(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_utts=10)
    straight = tmp_path / "straight"
    run_hydra_train(data, straight, max_update=4)
    interrupted = tmp_path / "interrupted"
    run_hydra_train(data, interrupted, max_update=2)
    run_hydra_train(data, interrupted, max_update=4)
    a = model_state(straight / "checkpoint_last.pt")
    b = model_state(interrupted / "checkpoint_last.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], equal_nan=True, msg=f"{name} differs after resume")


def test_resume_from_copied_run_directory(tmp_path):
    data = make_fbank_corpus(tmp_path / "data")
    run_hydra_train(data, tmp_path / "machine_a", max_update=2)
    shutil.copytree(tmp_path / "machine_a", tmp_path / "machine_b")
    shutil.rmtree(tmp_path / "machine_a")
    resumed = run_hydra_train(data, tmp_path / "machine_b", max_update=3)
    assert [int(u["num_updates"]) for u in logged_updates(resumed.stdout)] == [3]


def test_checkpoint_records_fbank_stats(tmp_path, tiny_checkpoint):
    state = safe_torch_load(str(tiny_checkpoint))
    torch.testing.assert_close(state["model"]["fbank_mean_std"][0], torch.full((40,), 0.5))
    torch.testing.assert_close(state["model"]["fbank_mean_std"][1], torch.full((40,), 2.0))


def test_bad_input_stops_before_training(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_classes=32)
    result = run_hydra_train(data, tmp_path / "ckpt", num_classes=16, check=False)
    assert result.returncode != 0
    assert "task.num_classes=16 but" in result.stdout + result.stderr


def test_bf16_training_on_cpu_through_fairseq(tmp_path):
    """common.bf16 on CPU: bf16 weights and activations, fp32 master weights, fp32 loss; loads in fp32."""
    data = make_fbank_corpus(tmp_path / "data")
    result = run_hydra_train(data, tmp_path / "ckpt", max_update=2, overrides=["common.bf16=true", "common.cpu=true"])
    updates = logged_updates(result.stdout)
    assert [int(u["num_updates"]) for u in updates] == [1, 2]
    assert all(math.isfinite(float(u["loss"])) for u in updates)
    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(tmp_path / "ckpt" / "checkpoint_last.pt")])
    out = models[0].float().eval().extract_features(torch.randn(1, 20, 80))
    assert torch.isfinite(out["x"]).all()


def test_every_stage1_variant_config_trains(tmp_path):
    """stage1_10ms / stage1_40ms / stage1_multigpu compose under fairseq-hydra-train and train (tiny model, CPU)."""
    data = make_fbank_corpus(tmp_path / "data", num_utts=6)
    variants = {
        "stage1_10ms": [],
        "stage1_40ms": [],
        # One CPU process stands in for the 8 GPUs: checks the recipe's keys, not NCCL.
        "stage1_multigpu": ["common.cpu=true", "distributed_training.distributed_world_size=1"],
        # Stage 2 trains from scratch (these labels are at 100 Hz, so the rate is set back for the run).
        "stage2": ["task.label_rate=100"],
    }
    for name, overrides in variants.items():
        result = run_hydra_train(data, tmp_path / name, config_name=name, max_update=1, overrides=overrides)
        assert [int(u["num_updates"]) for u in logged_updates(result.stdout)] == [1], name
        models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([str(tmp_path / name / "checkpoint_last.pt")])
        expected_stack = {"stage1_10ms": 1, "stage1_40ms": 4, "stage1_multigpu": 2, "stage2": 2}[name]
        assert cfg.task.stack_frames == expected_stack and cfg.model.stack_frames == expected_stack, name
        assert cfg.checkpoint.finetune_from_model is None and "loading pretrained model" not in result.stdout
    # Inherited from stage1.yaml through the defaults list, not reset to fairseq's schema defaults.
    assert cfg.criterion._name == "hard_label_masked_ce" and cfg.optimization.max_epoch == 100
    # stage2_from_stage1 refuses to start without the stage-1 checkpoint it starts from.
    missing = run_hydra_train(data, tmp_path / "s2f", config_name="stage2_from_stage1", max_update=1, check=False)
    assert missing.returncode != 0 and "pass checkpoint.finetune_from_model=" in missing.stdout + missing.stderr


def test_utterance_too_short_to_mask_is_named_by_its_manifest_line(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_utts=6)
    np.save(data / "feats" / "utt002.npy", np.zeros((3, 40), dtype=np.float32))
    rows = (data / "train.tsv").read_text().splitlines()
    rows[3] = "utt002.npy\t3"
    (data / "train.tsv").write_text("\n".join(rows) + "\n")
    labels = (data / "train.km").read_text().splitlines()
    labels[2] = "1 2 3"
    (data / "train.km").write_text("\n".join(labels) + "\n")
    result = run_hydra_train(data, tmp_path / "ckpt", overrides=["task.min_sample_size=null"], check=False)
    assert result.returncode != 0
    assert f"{data / 'train.tsv'}:4 (utt002): too short to mask" in result.stdout + result.stderr


def test_num_classes_minus_one_reads_k_from_the_dictionary_and_stores_it(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_classes=32)
    run_hydra_train(data, tmp_path / "ckpt", num_classes=-1, max_update=1)
    state = safe_torch_load(str(tmp_path / "ckpt" / "checkpoint_last.pt"))
    assert state["cfg"]["model"]["num_classes"] == 32 and state["model"]["final_proj.weight"].shape[0] == 32
    # The checkpoint alone rebuilds the model: its dict.km.txt need not exist where it is loaded.
    (data / "dict.km.txt").unlink()
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(tmp_path / "ckpt" / "checkpoint_last.pt")])
    assert models[0].final_proj.out_features == 32 and task.num_classes == 32
