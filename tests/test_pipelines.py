"""The user-facing pipelines end to end: the README demo, and stage 2 from a stage-1 checkpoint."""
from __future__ import annotations

import json
import re

import pytest
import torch

from helpers import make_fbank_corpus, run_hydra_train
from melhubert_fairseq.checkpoint_loading import load_fairseq_state
from melhubert_fairseq.data.labels import load_km_labels
from melhubert_fairseq.data.manifest import read_manifest
from melhubert_fairseq.tools import dump_km_labels, learn_kmeans, run_demo

pytestmark = pytest.mark.slow  # both pipelines train with fairseq-hydra-train


def test_stage2_trains_from_stage1_checkpoint_on_layer_labels(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_utts=10)
    stage1 = tmp_path / "stage1"
    run_hydra_train(data, stage1, max_update=2)
    ckpt = stage1 / "checkpoint_last.pt"

    stage2_labels = tmp_path / "labels2"
    centroids = tmp_path / "km" / "L2-k32.npy"
    flags = ["--manifest", str(data / "train.tsv"), "--checkpoint", str(ckpt), "--layer", "2", "--no-progress"]
    learn_kmeans.main([*flags, "--km-path", str(centroids), "--num-clusters", "32", "--sample-frac", "1.0"])
    dump_km_labels.main([*flags, "--km-path", str(centroids), "--out-dir", str(stage2_labels)])
    manifest = read_manifest(str(data / "train.tsv"))
    labels = list(load_km_labels(str(stage2_labels / "train.km")))
    assert [len(row) for row in labels] == [-(-n // 2) for n in manifest.num_frames]  # one per 20 ms frame

    stage2 = tmp_path / "stage2"
    result = run_hydra_train(
        data,
        stage2,
        config_name="stage2_from_stage1",
        num_classes=32,  # same K as stage 1: stage 2 starts from every stage-1 weight, final_proj included
        max_update=2,
        overrides=[f"task.label_dir={stage2_labels}", f"checkpoint.finetune_from_model={ckpt}"],
    )
    assert "loading pretrained model" in (result.stdout + result.stderr).lower()
    first = load_fairseq_state(str(ckpt))["model"]
    second = load_fairseq_state(str(stage2 / "checkpoint_last.pt"))
    assert second["cfg"]["task"]["label_rate"] == 50
    assert second["optimizer_history"][-1]["num_updates"] == 2  # fresh update count, not 2 + 2
    # Started from the stage-1 weights: the encoder moved only by 2 small Adam steps.
    weight = "encoder.layers.0.fc1.weight"
    assert (second["model"][weight] - first[weight]).abs().max() < 0.01
    assert second["model"]["final_proj.weight"].shape == (32, 64)


def test_demo_pipeline_runs_from_corpus_to_checkpoint_and_fine_tunes_it(tmp_path, capsys):
    out = tmp_path / "demo"
    status = run_demo.main([
        "--out-dir", str(out), "--max-update", "3", "--min-accuracy-ratio", "0", "--workers", "1",
        "--finetune-max-update", "2", "--probe-seeds", "2", "--probe-pr-seeds", "1", "--probe-pr-steps", "2",
        "--probe-sid-steps", "2",
        "model.encoder_layers=1", "dataset.num_workers=0", "checkpoint.save_interval_updates=0",
    ])
    assert status == 0
    assert (out / "checkpoints" / "checkpoint_last.pt").is_file()
    assert len(read_manifest(str(out / "features" / "train.tsv"))) == 108
    assert sum(1 for _ in open(out / "labels" / "train.km")) == 108
    summary = capsys.readouterr().out
    assert re.search(r"demo finished in \d+ s: 3 updates; masked accuracy train [0-9.]+ \([0-9.]+x chance\)", summary)
    log = (out / "hydra" / "hydra_train.log").read_text()
    train_lines = [json.loads(m) for m in re.findall(r"\]\[train\]\[INFO\] - (\{.*\})", log)]
    assert train_lines and int(train_lines[-1]["train_num_updates"]) == 3

    # The frozen probes: one table, fbank / random init / pretrained x PR / SID, then the verdicts.
    table = re.search(r"Frozen probes on demo/corpus.*?\n(.*?)\n  details:", summary, re.S).group(1).splitlines()
    assert [row.split("  ")[0] for row in table[-3:]] == ["fbank", "random init", "pretrained"], table
    assert all(len(re.findall(r"[0-9.]+ ± +[0-9.]+", row)) == 2 for row in table[-3:]), table
    assert "108 train / 12 valid utterances; SID: 2 utterances per speaker train, 96 test" in summary
    assert re.search(r"  SID: pretrained accuracy [0-9.]+ ± [0-9.]+ (beats|is worse than|is within)", summary)

    # CTC fine-tuning of that checkpoint, and of a random init of the same network, on the transcripts
    data = out / "finetune" / "data"
    assert sum(1 for _ in open(data / "train.ltr")) == 108 and sum(1 for _ in open(data / "valid.ltr")) == 12
    cers = re.findall(r"valid CER ([0-9.]+)% \(WER [0-9.]+%\) fine-tuned from (pretrained|random init) \(2 updates", summary)
    assert [name for _cer, name in cers] == ["pretrained", "random init"], summary
    assert re.search(r"pretraining (lowered the valid CER by|did not help: random init is) [0-9.]+|same valid CER", summary)
    for name in ("pretrained", "random_init"):
        assert (out / "finetune" / name / "checkpoints" / "checkpoint_last.pt").is_file()
    pretrained = load_fairseq_state(str(out / "checkpoints" / "checkpoint_last.pt"))["model"]
    tuned = {
        name: load_fairseq_state(str(out / "finetune" / name / "checkpoints" / "checkpoint_last.pt"))["model"]
        for name in ("pretrained", "random_init")
    }
    weight = "encoder.layers.0.fc1.weight"
    # 2 updates, both inside config/finetune_demo.yaml's frozen updates: each encoder is its initialisation.
    # The random init is the one pretraining started from (same seed), 3 small updates away from the checkpoint.
    assert torch.equal(tuned["pretrained"][f"w2v_encoder.w2v_model.{weight}"], pretrained[weight])
    assert not torch.equal(tuned["random_init"][f"w2v_encoder.w2v_model.{weight}"], pretrained[weight])
