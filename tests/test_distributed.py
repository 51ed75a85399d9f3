"""A real 2-process data-parallel run on CPU (gloo) through fairseq's own trainer.

``torchrun --nproc_per_node=2`` starts fairseq-hydra-train twice (through a
tiny launcher that records, on every rank, the sample ids of each step and a
hash of the model at each checkpoint save; fairseq writes the checkpoint from
rank 0 only). The test checks that the ranks trained on different utterances,
ended with identical parameters, that rank 0's checkpoint holds exactly those
parameters, and that a second distributed run resumes from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import melhubert_fairseq

from helpers import REPO_ROOT, TINY_MODEL_OVERRIDES, make_fbank_corpus

melhubert_fairseq.register_with_fairseq()  # allow-lists fairseq checkpoint types for the safe loader

pytestmark = pytest.mark.slow  # every test here runs torchrun with two training processes

LAUNCHER = r'''
"""fairseq-hydra-train with per-rank records of sample ids (each step) and model hash (each save)."""
import hashlib, json, os, sys

from fairseq import checkpoint_utils
from fairseq.trainer import Trainer

RECORDS = os.environ["DDP_TEST_RECORDS"]
RANK = int(os.environ["RANK"])


def model_sha256(state):
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def record(kind, value):
    with open(os.path.join(RECORDS, f"{kind}.rank{RANK}.jsonl"), "a") as handle:
        handle.write(json.dumps(value) + "\n")


fairseq_save_checkpoint = checkpoint_utils.save_checkpoint


def save_checkpoint(cfg, trainer, epoch_itr, val_loss):
    record("hash", {"num_updates": trainer.get_num_updates(), "sha256": model_sha256(trainer.get_model().state_dict())})
    return fairseq_save_checkpoint(cfg, trainer, epoch_itr, val_loss)


checkpoint_utils.save_checkpoint = save_checkpoint  # fairseq_cli.train calls it as checkpoint_utils.save_checkpoint

fairseq_train_step = Trainer.train_step


def train_step(self, samples, raise_oom=False):
    record("ids", {"update": self.get_num_updates() + 1, "ids": [s["id"].tolist() for s in samples if s]})
    return fairseq_train_step(self, samples, raise_oom)


Trainer.train_step = train_step

# fairseq infers torchrun's env:// setup only with GPUs (it takes rank % cuda.device_count());
# on CPU each rank passes the init method and its rank itself.
sys.argv += ["distributed_training.distributed_init_method=env://", f"distributed_training.distributed_rank={RANK}"]

from fairseq_cli.hydra_train import cli_main

cli_main()
'''


def model_sha256(state) -> str:
    """The launcher's hash of a model state dict (sorted names, raw tensor bytes)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_records(directory: Path, kind: str, rank: int):
    """The launcher's json lines of ``kind`` for ``rank``."""
    path = directory / f"{kind}.rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def torchrun_train(tmp_path: Path, data: Path, save_dir: Path, records: Path, max_update: int) -> str:
    """Run 2-process CPU training with gloo to ``max_update`` updates; return its output."""
    launcher = tmp_path / "launch_hydra_train.py"
    launcher.write_text(LAUNCHER)
    records.mkdir(exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
        "--config-dir", "config", "--config-name", "stage1",
        "common.user_dir=melhubert_fairseq",
        "common.cpu=true",
        "common.log_interval=1",
        "common.tensorboard_logdir=null",
        "distributed_training.distributed_world_size=2",
        "distributed_training.distributed_backend=gloo",
        "distributed_training.ddp_backend=no_c10d",
        "distributed_training.distributed_no_spawn=true",
        f"task.data={data}",
        f"task.label_dir={data}",
        "task.num_classes=32",
        "task.min_sample_size=40",
        "dataset.num_workers=0",
        "dataset.disable_validation=true",
        "dataset.max_tokens=400",
        f"optimization.max_update={max_update}",
        "optimization.update_freq=[1]",
        f"checkpoint.save_dir={save_dir}",
        f"hydra.run.dir={save_dir}/hydra",
        *TINY_MODEL_OVERRIDES,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_TEST_RECORDS": str(records)}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"torchrun fairseq-hydra-train failed:\n{output[-6000:]}"
    return output


def test_two_process_gloo_training_keeps_ranks_in_sync_and_resumes(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_utts=24, min_frames=120, max_frames=260)
    save_dir, records = tmp_path / "ckpt", tmp_path / "records"

    output = torchrun_train(tmp_path, data, save_dir, records, max_update=3)
    assert "distributed init (rank 1)" in output
    steps = [read_records(records, "ids", rank) for rank in (0, 1)]
    assert [s["update"] for s in steps[0]] == [1, 2, 3] == [s["update"] for s in steps[1]]
    for step0, step1 in zip(*steps):
        ids0 = {i for batch in step0["ids"] for i in batch}
        ids1 = {i for batch in step1["ids"] for i in batch}
        assert ids0 and ids1 and not ids0 & ids1, "each rank trains on its own shard of the data"

    hashes = [read_records(records, "hash", rank) for rank in (0, 1)]
    assert hashes[0] == hashes[1], "ranks hold the same parameters at every save"
    final = hashes[1][-1]
    assert final["num_updates"] == 3
    checkpoint = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")  # safe loader + plugin allow-list
    assert model_sha256(checkpoint["model"]) == final["sha256"], "rank 0's checkpoint = what rank 1 computed"

    output = torchrun_train(tmp_path, data, save_dir, records, max_update=5)
    assert "Loaded checkpoint" in output
    resumed = [read_records(records, "ids", rank)[3:] for rank in (0, 1)]
    assert [s["update"] for s in resumed[0]] == [4, 5] == [s["update"] for s in resumed[1]]
    hashes = [read_records(records, "hash", rank) for rank in (0, 1)]
    assert hashes[0] == hashes[1] and hashes[0][-1]["num_updates"] == 5
    checkpoint = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")  # safe loader + plugin allow-list
    assert checkpoint["optimizer_history"][-1]["num_updates"] == 5
    assert model_sha256(checkpoint["model"]) == hashes[1][-1]["sha256"]
