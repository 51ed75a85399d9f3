"""Shared fixtures: tiny synthetic fbank corpora and a tiny trained checkpoint."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Overrides that shrink the Base model to something a 2-core CPU trains in seconds.
TINY_MODEL_OVERRIDES = [
    "model.encoder_layers=2",
    "model.encoder_embed_dim=64",
    "model.encoder_ffn_embed_dim=128",
    "model.encoder_attention_heads=4",
    "model.conv_pos=16",
    "model.conv_pos_groups=4",
]


def make_fbank_corpus(
    directory: Path,
    num_utts: int = 12,
    min_frames: int = 180,
    max_frames: int = 400,
    num_classes: int = 32,
    feat_dim: int = 40,
    split: str = "train",
    seed: int = 0,
    dtype=np.float32,
) -> Path:
    """Write ``{split}.tsv``, ``{split}.km``, ``dict.km.txt`` and random normalised fbank .npy files."""
    rng = np.random.default_rng(seed)
    feat_dir = directory / "feats"
    feat_dir.mkdir(parents=True, exist_ok=True)
    rows: List[str] = []
    label_lines: List[str] = []
    for index in range(num_utts):
        frames = int(rng.integers(min_frames, max_frames + 1))
        np.save(feat_dir / f"utt{index:03d}.npy", rng.standard_normal((frames, feat_dim)).astype(dtype))
        rows.append(f"utt{index:03d}.npy\t{frames}")
        label_lines.append(" ".join(map(str, rng.integers(0, num_classes, frames))))
    (directory / f"{split}.tsv").write_text(f"{feat_dir}\n" + "\n".join(rows) + "\n")
    (directory / f"{split}.km").write_text("\n".join(label_lines) + "\n")
    (directory / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(num_classes)))
    return directory


def hydra_train_command(
    data_dir: Path,
    save_dir: Path,
    overrides: Sequence[str] = (),
    config_name: str = "stage1",
    num_classes: int = 32,
    max_update: int = 2,
    tiny: bool = True,
    num_workers: int = 0,
    update_freq: int = 1,
    max_tokens: int = 1200,
) -> List[str]:
    """``fairseq-hydra-train`` exactly as the README runs it (relative user_dir, from the repo root)."""
    return [
        sys.executable,
        "-m",
        "fairseq_cli.hydra_train",
        "--config-dir",
        "config",
        "--config-name",
        config_name,
        "common.user_dir=melhubert_fairseq",
        f"task.data={data_dir}",
        f"task.label_dir={data_dir}",
        f"task.num_classes={num_classes}",
        f"optimization.max_update={max_update}",
        f"optimization.update_freq=[{update_freq}]",
        f"dataset.num_workers={num_workers}",
        f"dataset.max_tokens={max_tokens}",
        "common.log_interval=1",
        "common.tensorboard_logdir=null",
        "dataset.disable_validation=true",  # the synthetic corpora have no valid split
        f"checkpoint.save_dir={save_dir}",
        f"hydra.run.dir={save_dir}/hydra",
        *(TINY_MODEL_OVERRIDES if tiny else []),
        *overrides,
    ]


def run_hydra_train(
    data_dir: Path, save_dir: Path, check: bool = True, env: Optional[dict] = None, **command_args
) -> subprocess.CompletedProcess:
    """Run :func:`hydra_train_command` (``command_args`` are its keywords) from the repo root, one thread;
    raise with its output if it fails and ``check``."""
    command = hydra_train_command(data_dir, save_dir, **command_args)
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fairseq-hydra-train failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def write_indexed_corpus(directory: Path, lengths, dim: int = 40, label_stride: int = 1) -> Path:
    """Features whose value is the frame index (plus dim/100), labels = frame index (mod 1000)."""
    feat_dir = directory / "feats"
    feat_dir.mkdir(parents=True)
    rows, lines = [], []
    for u, frames in enumerate(lengths):
        feats = np.arange(frames, dtype=np.float32)[:, None] + np.arange(dim, dtype=np.float32)[None] / 100
        np.save(feat_dir / f"u{u}.npy", feats)
        rows.append(f"u{u}.npy\t{frames}")
        labels = np.arange(0, frames, label_stride)
        lines.append(" ".join(map(str, labels)))
    (directory / "train.tsv").write_text(f"{feat_dir}\n" + "\n".join(rows) + "\n")
    (directory / "train.km").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture
def fbank_corpus(tmp_path: Path) -> Path:
    """A 12-utterance synthetic corpus (32 classes) in a fresh directory."""
    return make_fbank_corpus(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """checkpoint_last.pt of a 2-layer, 64-dim model trained 2 updates on a synthetic corpus."""
    root = tmp_path_factory.mktemp("tiny_run")
    data_dir = make_fbank_corpus(root / "data")
    np.save(data_dir / "mean-std.npy", np.stack([np.full(40, 0.5), np.full(40, 2.0)]).astype(np.float32))
    run_hydra_train(data_dir, root / "ckpt")
    return root / "ckpt" / "checkpoint_last.pt"


@pytest.fixture
def hang_guard():
    """Fail a test that blocks (e.g. reading a FIFO) after 30 s instead of hanging the suite."""
    import signal

    def blocked(signum, frame):
        raise TimeoutError("blocked for 30 s (reading a FIFO?)")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
