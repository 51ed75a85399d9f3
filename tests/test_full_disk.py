"""A disk that fills up during a tool's run: one ``error: <path>: no space left on device (...)`` line, exit 2,
and the outputs of the previous run untouched (nothing half-written, nothing left in hidden folders).

The disk is simulated below the writers (helpers.FillingDisk): torch and numpy see a real ENOSPC from
``write`` and report it as they do on a real full disk (torch as ``RuntimeError: [enforce fail ...]``).
"""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import soundfile

from helpers import FillingDisk

from melhubert_fairseq import disk_full


def digest_tree(root: Path) -> Dict[str, str]:
    """sha256 of every file below ``root``, hidden ones included."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _average(tmp_path, ckpt):
    for name in ("a.pt", "b.pt"):
        shutil.copy(ckpt, tmp_path / name)
    return "average_checkpoints", ["--inputs", "a.pt", "b.pt", "--output", "out/avg.pt"], "out/avg.pt"


def _export(tmp_path, ckpt):
    shutil.copy(ckpt, tmp_path / "a.pt")
    return "export_original_checkpoint", ["a.pt", "out/model.ckpt"], "out/model.ckpt"


def _wav_to_fbank(tmp_path, ckpt):
    (tmp_path / "audio").mkdir()
    for index in range(3):
        wave = np.random.default_rng(index).uniform(-0.3, 0.3, 8000).astype(np.float32)
        soundfile.write(tmp_path / "audio" / f"u{index}.wav", wave, 16000, subtype="PCM_16")
    return "wav_to_fbank", ["--audio-dir", "audio", "--out-dir", "out"], "out/"


def _extract(tmp_path, ckpt):
    (tmp_path / "feats").mkdir()
    for index in range(3):
        np.save(tmp_path / "feats" / f"u{index}.npy", np.random.default_rng(index).standard_normal((30, 40)).astype(np.float32))
    (tmp_path / "train.tsv").write_text("feats\n" + "".join(f"u{index}.npy\t30\n" for index in range(3)))
    args = ["--checkpoint", "a.pt", "--manifest", "train.tsv", "--out-dir", "out", "--layers", "1", "--no-progress"]
    shutil.copy(ckpt, tmp_path / "a.pt")
    return "extract_features", args, "out/"


@pytest.mark.parametrize("make", [_average, _export, _wav_to_fbank, _extract], ids=["average-checkpoints",
                         "export-original", "wav-to-fbank", "extract-features"])
def test_a_full_disk_is_one_error_line_and_the_previous_outputs_stay(tiny_checkpoint, tmp_path, monkeypatch, capsys, make):
    import importlib

    tool, args, named = make(tmp_path, tiny_checkpoint)
    main = importlib.import_module(f"melhubert_fairseq.tools.{tool}").main
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [tool] + args)
    assert main() == 0  # the previous run's outputs
    before = digest_tree(tmp_path / "out")
    capsys.readouterr()

    monkeypatch.setattr(sys, "argv", [tool] + args + ["--overwrite"])
    monkeypatch.setattr(disk_full, "open_for_writing", FillingDisk(room=6000))
    assert main() == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"error: {named}") or f"/{named}" in errors[0], errors[0]
    assert ".staging" not in errors[0], errors[0]  # the output is named, not its hidden staging copy
    assert ": no space left on device (ENOSPC" in errors[0] and "nothing was replaced" in errors[0], errors[0]
    assert digest_tree(tmp_path / "out") == before  # old outputs intact, no temporary or staged file left
