"""Tools as console scripts: exit codes and one-line error messages instead of tracebacks."""
from __future__ import annotations

import subprocess
import sys

import numpy as np


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"melhubert_fairseq.tools.{name}", *args], capture_output=True, text=True, timeout=300
    )


def test_success_exits_zero_and_user_errors_print_one_line(tmp_path):
    (tmp_path / "feats").mkdir()
    np.save(tmp_path / "feats" / "utt1.npy", np.zeros((12, 40), np.float32))
    args = ["--feature-dir", str(tmp_path / "feats"), "--out-dir", str(tmp_path / "out"), "--split", "train"]
    first = run_tool("create_manifest", *args)
    assert first.returncode == 0, first.stderr  # main() returns a dict; the console script still exits 0
    assert "listed 1 utterances" in first.stdout

    again = run_tool("create_manifest", *args)
    assert again.returncode == 2
    assert "error: " in again.stderr and "already exists; refusing to overwrite" in again.stderr
    assert "Traceback" not in again.stderr

    missing = run_tool("wav_to_fbank", "--manifest", str(tmp_path / "nope.tsv"), "--out-dir", str(tmp_path / "x"))
    assert missing.returncode == 2 and "nope.tsv" in missing.stderr and "Traceback" not in missing.stderr
