"""The speed benchmarks run as the README shows and print their side-by-side tables.

Tiny inputs (0.5 s of audio, one round): this guards the commands, not the figures.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SMALL = ["--seconds", "0.5", "--repeats", "1", "--warmup", "0", "--precisions", "fp32,bf16w"]


def run_benchmark(script: str, arguments, results_dir) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` as the README does, writing results to ``results_dir``; assert it exits 0."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), *arguments, "--results-dir", str(results_dir)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.parametrize(
    "script, extra",
    [
        ("bench_train_step.py", ["--cases", "hubert,straightforward_20ms,ours_40ms", "--no-profile"]),
        ("bench_inference.py", ["--cases", "hubert,ours_20ms"]),
    ],
)
def test_speed_benchmark_prints_ratios_against_hubert(tmp_path, script, extra):
    result = run_benchmark(script, [*SMALL, *extra], tmp_path)
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    # Every model at both precisions, except the straightforward reference (fp32 only).
    expected = {f"{model}@{precision}" for model in extra[1].split(",") for precision in ("fp32", "bf16w")}
    expected -= {"straightforward_20ms@bf16w"}
    assert expected <= set(rows), result.stdout
    hubert_row = rows["hubert@fp32"].split("|")
    assert hubert_row[6].strip() == "1.00", "HuBERT fp32 is the reference of the 'x HuBERT fp32' column"
    saved = list(tmp_path.glob("*_cpu.md"))
    assert len(saved) == 1 and "x HuBERT same precision" in saved[0].read_text()


def test_pos_conv_benchmark_prints_both_passes(tmp_path):
    small = ["--frames", "50", "--dim", "64", "--kernel", "16", "--groups", "4", "--repeats", "1"]
    result = run_benchmark("bench_pos_conv.py", small, tmp_path)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| forward")]
    assert len(rows) == 2 and all(row.rstrip(" |").endswith("x") for row in rows), result.stdout
    assert (tmp_path / "pos_conv_cpu.md").exists()


def test_dropout_benchmark_prints_every_pair(tmp_path):
    small = ["--frames", "40", "--heads", "2", "--head-dim", "8", "--ffn-dim", "32", "--repeats", "1"]
    result = run_benchmark("bench_dropout.py", small, tmp_path)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line.rstrip(" |").endswith("x")]
    assert len(rows) == 4, result.stdout
    assert (tmp_path / "dropout_cpu.md").exists()


def test_fault_injection_kills_reruns_and_classifies(tmp_path):
    """Smoke test of benchmarks/fault_injection.py: one kill of one scenario, table and summary printed."""
    out = tmp_path / "fault_injection.md"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "fault_injection.py"), "--n", "1", "--seed", "3",
         "--scenarios", "wav-to-fbank", "--reference-runs", "1", "--out", str(out),
         "--work-dir", str(tmp_path / "work")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("| wav-to-fbank |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[3] == "1" and sum(int(c) for c in cells[4:]) == 1 and cells[-1] == "0"  # one kill, not corrupt
    assert "1 kills over 1 scenarios" in result.stdout.splitlines()[-1]
    assert "| wav-to-fbank |" in out.read_text()
