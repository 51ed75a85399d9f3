"""The speed benchmarks run as the README shows and print their side-by-side tables.

Tiny inputs (0.5 s of audio, one round): this guards the commands, not the figures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

import gpu_check  # stdlib-only at import (its stages' modules too): its preflight reports missing packages
import gpu_check_common
import gpu_check_speed
from helpers import REPO_ROOT

SMALL = ["--seconds", "0.5", "--repeats", "1", "--warmup", "0", "--precisions", "fp32,bf16w"]


def run_benchmark(script: str, arguments, results_dir) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` as the README does, writing results to ``results_dir``; assert it exits 0."""
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), *arguments, "--results-dir", str(results_dir)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.slow  # each benchmark runs in a fresh interpreter (the speed ones time training steps)
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


@pytest.mark.slow  # a fresh interpreter imports torch
def test_pos_conv_benchmark_prints_both_passes(tmp_path):
    small = ["--frames", "50", "--dim", "64", "--kernel", "16", "--groups", "4", "--repeats", "1"]
    result = run_benchmark("bench_pos_conv.py", small, tmp_path)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| forward")]
    assert len(rows) == 2 and all(row.rstrip(" |").endswith("x") for row in rows), result.stdout
    assert (tmp_path / "pos_conv_cpu.md").exists()


@pytest.mark.slow  # a fresh interpreter imports torch
def test_dropout_benchmark_prints_every_pair(tmp_path):
    small = ["--frames", "40", "--heads", "2", "--head-dim", "8", "--ffn-dim", "32", "--repeats", "1"]
    result = run_benchmark("bench_dropout.py", small, tmp_path)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line.rstrip(" |").endswith("x")]
    assert len(rows) == 4, result.stdout
    assert (tmp_path / "dropout_cpu.md").exists()


@pytest.mark.slow  # a fresh interpreter imports torch and times 3 s of audio per front end
def test_waveform_frontend_benchmark_prints_accuracy_and_speed(tmp_path):
    result = run_benchmark("bench_waveform_frontend.py", ["--seconds", "3", "--repeats", "1"], tmp_path)
    rows = {line.split("|")[1].strip(): line.split("|") for line in result.stdout.splitlines() if line.startswith("| ")}
    assert rows["kaldi-native-fbank (reference)"][6].strip() == "1.00x"
    assert float(rows["ours: float32 FFT, float64 mel sum"][2]) <= 1e-3  # max |difference| to the reference
    assert "lhotse Wav2LogFilterBank" in rows
    assert (tmp_path / "waveform_frontend_cpu.md").exists()


# --- benchmarks/gpu_check.sh: the one-call GPU check, kept working by its CPU quick mode ------------


@pytest.mark.slow  # trains, runs the GPU tests and the speed benchmark on CPU
def test_gpu_check_quick_on_cpu_passes_and_writes_one_results_file(tmp_path):
    """``bash benchmarks/gpu_check.sh --device cpu --quick``: every stage runs on CPU and its verdicts land in the JSON."""
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600, env={**env, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["gpu_check_cpu_quick.json"]
    report = json.loads((tmp_path / "gpu_check_cpu_quick.json").read_text())
    assert report["ok"] and report["device"] == "cpu"
    tests = report["stages"]["tests"]
    assert tests["tests"] >= 20 and tests["failures"] == tests["errors"] == tests["skipped"] == 0
    for precision, run in report["stages"]["train"]["runs"].items():
        assert run["updates"] == 16 and run["all_updates_logged"], precision
        assert run["last_loss"] < run["first_loss"] and run["finite"], precision
        assert run["checks"]["checkpoint loads on cpu"], precision
    assert "fp16_no_flatten_grads" in report["stages"]["train"]["runs"]["fp16"]["note"], "CPU fp16 must say what it changed"
    for mode in ("train", "infer"):
        rows = {row["case"]: row for row in report["stages"]["speed"][mode]["rows"]}
        expected = {f"hubert@{p}" for p in ("fp32", "bf16w", "fp16w")}
        expected |= {f"{m}@{p}" for m in ("ours_20ms", "ours_40ms") for p in ("fp32", "bf16", "bf16w", "fp16", "fp16w")}
        assert set(rows) == expected, mode
        assert rows["hubert@fp16w"]["x_hubert_same_precision"] == 1.0
        assert rows["ours_20ms@bf16"]["x_hubert_same_precision"] is not None, "autocast rows compare with HuBERT's bf16w"
        assert all(row["audio_seconds_per_second"] > 0 for row in rows.values())
    assert {t["target"].split(" ")[0] for t in report["stages"]["speed"]["targets"]} >= {"ours_20ms@fp32", "ours_20ms@bf16"}
    assert "| check | result |" in result.stdout and "| ours_40ms@fp16w |" in result.stdout
    assert "done: all checks passed" in result.stdout


@pytest.mark.slow  # each case starts a fresh interpreter that imports torch
@pytest.mark.parametrize(
    "prelude, arguments, message",
    [
        ("sys.modules['kaldi_native_fbank'] = None", ["--device", "cpu"], "missing on this machine: kaldi-native-fbank"),
        ("torch_cuda = None", ["--device", "cuda"], "no GPU visible to torch"),
    ],
)
def test_gpu_check_preflight_fails_fast_with_one_error_line(tmp_path, prelude, arguments, message):
    """A missing package (or GPU) stops the check before any stage, exit 2, nothing written."""
    if "cuda" in arguments and torch_has_cuda():
        pytest.skip("this machine has a GPU: --device cuda would run")
    code = (
        f"import sys; {prelude}; sys.path.insert(0, 'benchmarks'); import gpu_check; "
        f"sys.exit(gpu_check.main({arguments + ['--quick', '--out', str(tmp_path / 'out')]!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: gpu_check.py:preflight") and message in result.stderr.splitlines()[0]
    assert not (tmp_path / "out").exists()


def torch_has_cuda() -> bool:
    """Whether torch sees a GPU here."""
    import torch

    return torch.cuda.is_available()


def test_largest_batch_follows_the_memory_line_and_backs_off():
    gib = 2**30
    ran = []

    def fits(batch):
        ran.append(batch)
        return batch <= 40

    # 1 GiB + 2 GiB per crop; 100 GiB of which 10 are taken: (97 - 10 - 1) / 2 = 43 crops predicted.
    report = gpu_check_speed.largest_batch(fits, lambda n: (1 + 2 * n) * gib, base=4, capacity=100 * gib, resident=10 * gib)
    assert report["predicted"] == 43 and report["per_item_gib"] == 2.0
    assert report["tried"] == [[43, False], [36, True]] and report["verified"] == 36 and ran == [43, 36]
    # A prediction at or under the 2 x base the fit already ran needs no further step.
    tight = gpu_check_speed.largest_batch(fits, lambda n: (1 + 2 * n) * gib, base=4, capacity=20 * gib, resident=10 * gib)
    assert tight["verified"] == 8 and tight["tried"] == []


def test_speed_cases_resize_to_any_batch():
    """The memory probes' resized steps really run the model on that many crops."""
    from speed_common import build_cases

    args = SimpleNamespace(
        device="cpu", threads=1, utterances=1, seconds=0.5, precisions="fp32,fp16w", cases="hubert,ours_20ms",
        size_overrides=gpu_check_common.QUICK_SIZES, hubert_overrides=gpu_check_common.QUICK_HUBERT_FRONT_END,
    )
    for mode in ("train", "infer"):
        for case in build_cases(args, mode, log=lambda message: None):
            seen = []
            # Both models' transformer takes the (B, T, C) frames first, in training and in feature extraction.
            handle = case.model.encoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
            case.resize(3)()
            handle.remove()
            assert seen == [3], (mode, case.name)


@pytest.mark.slow  # kills and reruns a tool in fresh interpreters
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
