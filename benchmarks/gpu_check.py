"""One GPU check: device tests, mixed-precision training through fairseq, and speed against HuBERT, in one short call.

Stages, in order, each recorded in one results file (``gpu_check_<device>[_quick].json``
in ``--out``, default ``$OUT``, else benchmarks/results) and summed up in a printed table:

0. preflight: every package the run needs imports (else one error line naming the missing
   ones and how to carry their wheels, exit 2, nothing written), the GPU is visible;
1. tests: ``pytest -m gpu tests/test_gpu.py`` on the device (model forward/backward in
   fp32/bf16/fp16 against the CPU, masks, padding, checkpoints across devices);
2. train: ``config/stage1.yaml`` (Base, 12 x 768, 20 ms) through ``fairseq-hydra-train`` for
   ``--updates`` updates on a synthetic corpus whose labels follow its features, once with
   ``common.bf16=true`` and once with ``common.fp16=true``: the loss must fall, stay finite,
   and fp16 may skip no more than fairseq's first few updates for gradient overflow; the
   checkpoint of each run must load on the CPU and give the device's outputs;
3. speed: training steps and inference of our 20 ms and 40 ms Base against fairseq's
   HuBERT Base, interleaved in this process (benchmarks/speed_common.py), at fp32, bf16 and
   fp16, at the recipe's per-GPU batch (4 crops of 15 s = 750 frames at 20 ms): audio-seconds
   per second, ratios, peak memory and the largest batch of such crops a training step fits.

    bash benchmarks/gpu_check.sh                          # one GPU: all of it, under 8 minutes
    bash benchmarks/gpu_check.sh --device cpu --quick     # tiny models, ~90 s on 2 cores (CI runs this)

Exit status: 0 when every check passed, 1 when one failed or did not finish in ``--budget``
seconds, 2 when the machine lacks what the run needs.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_DIR = REPO_ROOT / "benchmarks"
STAGES = ("tests", "train", "speed")
#: Import name -> pip name of everything the run imports that is not in the standard library.
REQUIRED_MODULES = {
    "numpy": "numpy",
    "torch": "torch",
    "omegaconf": "omegaconf",
    "hydra": "hydra-core",
    "antlr4": "antlr4-python3-runtime",
    "bitarray": "bitarray",
    "fairseq": "ve-fairseq",
    "kaldi_native_fbank": "kaldi-native-fbank",
    "_cffi_backend": "cffi",
    "soundfile": "soundfile",
    "pytest": "pytest",
}
#: fairseq skips the updates whose fp16 gradients overflow while its loss scale settles.
MAX_OVERFLOW_SKIPS = 5
#: The environment variable tests/test_gpu.py reads its device from.
TEST_DEVICE_VARIABLE = "MELHUBERT_TEST_DEVICE"
#: Encoder sizes of the --quick models (the tests' tiny model), for both Mel-HuBERT and HuBERT.
QUICK_SIZES = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4)
#: HuBERT's conv front end at 32 instead of 512 channels for --quick (same strides: 50 Hz frames).
QUICK_HUBERT_FRONT_END = dict(conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2")
#: fairseq's HuBERT runs half precision only with the whole model converted (common.bf16/fp16):
#: the reference row for each of our precisions.
HUBERT_REFERENCE = {"fp32": "fp32", "bf16": "bf16w", "bf16w": "bf16w", "fp16": "fp16w", "fp16w": "fp16w"}
GIB = float(2**30)


class Budget:
    """Wall-clock budget of the whole check: stages ask it how long they may still run."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds left of the budget (may be negative)."""
        return self.seconds - self.elapsed()


def log(message: str) -> None:
    """Progress line, flushed at once (the device tool returns the output's tail)."""
    print(message, flush=True)


# --- preflight -----------------------------------------------------------------------------------


def put_repo_on_path() -> None:
    """Import the plugin from this checkout, here and in every subprocess (the GPU machine has it nowhere else)."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    sys.path.insert(0, str(BENCHMARKS_DIR))


def missing_modules() -> Tuple[List[str], List[str]]:
    """(pip names of the modules that are absent, 'module: error' of those that fail otherwise)."""
    absent, broken = [], []
    for module in list(REQUIRED_MODULES) + ["melhubert_fairseq"]:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:  # the module, or one it imports, is not installed
            name = (error.name or module).split(".")[0]
            pip_name = REQUIRED_MODULES.get(name, name)
            if pip_name not in absent:
                absent.append(pip_name)
        except Exception as error:  # installed but broken (a native library, a version clash)
            broken.append(f"{module}: {type(error).__name__}: {error}")
    return absent, broken


def preflight(device: str) -> Dict[str, str]:
    """Check the machine can run the whole check; exit 2 with one error line (and the fix) if not."""
    put_repo_on_path()
    absent, broken = missing_modules()
    if absent or broken:
        what = "; ".join(([f"missing on this machine: {', '.join(absent)}"] if absent else []) + broken)
        print(f"error: {Path(__file__).name}:preflight (imports): {what}", file=sys.stderr)
        if absent:
            print(
                "  This machine has no network: carry the wheels. On a machine with PyPI, in the repo root, run\n"
                "      bash benchmarks/gpu_wheels.sh        # writes .whl/ (CPython 3.12, manylinux x86_64)\n"
                "  and send .whl with the checkout (device tool: carry=[\".whl\"]); benchmarks/gpu_check.sh installs\n"
                "  .whl/*.whl into /tmp/melhubert-site before it starts.",
                file=sys.stderr,
            )
        sys.exit(2)
    import torch

    import melhubert_fairseq

    plugin = Path(melhubert_fairseq.__file__).resolve()
    if REPO_ROOT not in plugin.parents:
        print(f"error: {Path(__file__).name}:preflight (imports): melhubert_fairseq imports from {plugin}, not this checkout {REPO_ROOT}", file=sys.stderr)
        sys.exit(2)
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        print(
            f"error: {Path(__file__).name}:preflight (--device {device}): no GPU visible to torch {torch.__version__} "
            f"(built for CUDA {torch.version.cuda}); use --device cpu on a machine without one",
            file=sys.stderr,
        )
        sys.exit(2)
    import fairseq

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "fairseq": fairseq.__version__,
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if kind == "cuda" else f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)",
        "host": platform.node(),
    }
    log("preflight: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return info


# --- stage 1: the gpu-marked tests -----------------------------------------------------------------


def junit_summary(path: Path) -> Dict:
    """Counts and failed test names from a pytest --junitxml report."""
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    summary = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            failed.append({"test": case.get("name"), "message": (problem.get("message") or "")[:500]})
    summary["failed"] = failed
    return summary


def run_tests_stage(args, budget: Budget, work: Path) -> Dict:
    """``pytest -m gpu tests/test_gpu.py`` on the device; passes only when every test ran and passed."""
    junit = work / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests/test_gpu.py"]
    env = {**os.environ, TEST_DEVICE_VARIABLE: args.device}
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
    log(f"[tests] {' '.join(command[2:])} ({TEST_DEVICE_VARIABLE}={args.device})")
    started = time.perf_counter()
    timeout = max(30.0, min(args.tests_timeout, budget.left()))
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"pytest did not finish in {timeout:.0f} s", "seconds": round(time.perf_counter() - started, 1)}
    tail = result.stdout.strip().splitlines()[-1:] if result.stdout.strip() else []
    summary = junit_summary(junit) if junit.exists() else {"tests": 0, "failures": 0, "errors": 1, "skipped": 0, "failed": []}
    summary.update(returncode=result.returncode, seconds=round(time.perf_counter() - started, 1), pytest_summary=" ".join(tail))
    summary["ok"] = result.returncode == 0 and summary["tests"] > 0 and summary["skipped"] == 0
    if not summary["ok"]:
        summary["output_tail"] = (result.stdout + result.stderr)[-3000:]
    log(f"[tests] {summary['pytest_summary']} ({summary['seconds']:.0f} s)")
    for failure in summary["failed"]:
        log(f"[tests] FAILED {failure['test']}: {failure['message'][:300]}")
    return summary


# --- stage 2: mixed-precision training through fairseq-hydra-train ------------------------------------


def write_learnable_corpus(directory: Path, num_utts: int, num_frames: int, num_classes: int, seed: int = 0) -> Path:
    """A synthetic fbank corpus whose k-means-like labels follow its features.

    Each utterance is a run of segments of 8-30 frames (10 ms each); a segment's frames
    are its class's 40-dim centroid plus noise and carry that class as label. A masked
    frame's label can thus be inferred from its unmasked neighbours: the --quick model
    gets below chance (log2 of the class count) in its 16 updates; Base at the recipe's
    learning rate falls from about chance + 0.3 bits to about chance in 100 (measured
    on CPU: 9.31 -> 9.11 bits over 60 updates of 2 crops).
    """
    import numpy as np

    from melhubert_fairseq.atomic_output import atomic_save_npy
    from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS
    from melhubert_fairseq.data.labels import KM_DICTIONARY_NAME, write_dictionary, write_km
    from melhubert_fairseq.data.manifest import write_manifest

    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((num_classes, FBANK_NUM_MEL_BINS)).astype(np.float32)
    feature_dir = directory / "feats"
    feature_dir.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for index in range(num_utts):
        lengths = rng.integers(8, 31, size=num_frames // 8 + 1)
        classes = np.repeat(rng.integers(0, num_classes, size=len(lengths)), lengths)[:num_frames]
        features = centroids[classes] + 0.5 * rng.standard_normal((num_frames, FBANK_NUM_MEL_BINS)).astype(np.float32)
        atomic_save_npy(str(feature_dir / f"utt{index:04d}.npy"), features.astype(np.float32))
        rows.append((f"utt{index:04d}.npy", num_frames))
        labels.append(classes)
    write_manifest(str(directory / "train.tsv"), str(feature_dir), rows)
    write_km(str(directory / "train.km"), labels)
    write_dictionary(str(directory / KM_DICTIONARY_NAME), num_classes)
    return directory


def train_inner_lines(text: str) -> List[Dict[str, str]]:
    """fairseq's json ``train_inner`` log records, in order."""
    return [json.loads(m) for m in re.findall(r"\[train_inner\]\[INFO\] - (\{.*\})", text)]


def loss_summary(records: List[Dict[str, str]], num_classes: int) -> Dict:
    """Mean loss (bits per masked frame) over the first and the last tenth of updates, and the verdicts."""
    losses = [float(r["loss"]) for r in records]
    window = max(1, min(10, len(losses) // 4))
    first, last = statistics.fmean(losses[:window]), statistics.fmean(losses[-window:])
    return {
        "window": window,
        "first_loss": round(first, 3),
        "last_loss": round(last, 3),
        "chance_loss": round(math.log2(num_classes), 3),
        "last_acc_m": float(records[-1].get("acc_m", "nan")),
        "finite": all(math.isfinite(v) for v in losses),
        "falls": last < first,
    }


def training_command(args, data: Path, save_dir: Path, precision_overrides: Sequence[str]) -> List[str]:
    """``fairseq-hydra-train`` on config/stage1.yaml as the README runs it, sized for a short check."""
    # The tiny model learns in a few updates at 10x the recipe's learning rate.
    quick = [f"model.{k}={v}" for k, v in QUICK_SIZES.items()]
    quick += ["task.max_sample_size=100", "dataset.max_tokens=400", "optimization.lr=[0.001]"]
    return [
        sys.executable, "-m", "fairseq_cli.hydra_train",
        "--config-dir", "config", "--config-name", "stage1",
        "common.user_dir=melhubert_fairseq",
        f"task.data={data}", f"task.label_dir={data}", f"task.num_classes={args.train_classes}",
        f"optimization.max_update={args.updates}",
        "optimization.update_freq=[1]",  # one GPU step per update: ~100 updates fit the time budget
        f"dataset.num_workers={0 if args.device == 'cpu' else 2}",
        "common.log_interval=1",
        "common.tensorboard_logdir=null",
        "dataset.disable_validation=true",  # the synthetic corpus has no valid split
        f"checkpoint.save_dir={save_dir}",
        "checkpoint.no_epoch_checkpoints=true",
        f"hydra.run.dir={save_dir}/hydra",
        *(["common.cpu=true"] if args.device == "cpu" else []),
        *(quick if args.quick else []),
        *precision_overrides,
    ]


def precision_overrides(precision: str, device: str) -> Tuple[List[str], Optional[str]]:
    """fairseq overrides for ``precision`` on ``device`` and a note when CPU needs something else."""
    if precision == "bf16":
        return ["common.bf16=true"], None
    if device == "cpu":
        # fairseq's FP16Optimizer allocates its flat fp32 master copy on CUDA; unflattened it runs on CPU.
        return ["common.fp16=true", "common.fp16_no_flatten_grads=true"], (
            "CPU: common.fp16_no_flatten_grads=true added (fairseq's flattened FP16Optimizer allocates its fp32 master "
            "weights with torch.cuda.current_device() and fails without CUDA)"
        )
    return ["common.fp16=true"], None


def checkpoint_round_trip(checkpoint: Path, device: str) -> Dict:
    """Load a checkpoint on the CPU and on ``device``; relative difference of their final-layer outputs in fp32."""
    import numpy as np
    import torch

    from melhubert_fairseq.feature_reader import MelHubertFeatureReader

    readers = {"cpu": MelHubertFeatureReader(str(checkpoint), device="cpu")}
    readers[device] = MelHubertFeatureReader(str(checkpoint), device=device)
    inputs = [np.random.default_rng(0).standard_normal((200, readers["cpu"].feat_dim * readers["cpu"].stack)).astype(np.float32)]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        outputs = {name: reader.hidden_states(inputs)[0][-1] for name, reader in readers.items()}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    difference = float((outputs[device] - outputs["cpu"]).norm() / outputs["cpu"].norm())
    return {"relative_difference": difference, "ok": math.isfinite(difference) and difference < 1e-4}


def run_training(args, precision: str, data: Path, work: Path, budget: Budget) -> Dict:
    """One fairseq-hydra-train run at ``precision`` (bf16 or fp16) and its verdicts."""
    overrides, note = precision_overrides(precision, args.device)
    save_dir = work / f"train_{precision}"
    command = training_command(args, data, save_dir, overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads)
    log(f"[train {precision}] fairseq-hydra-train stage1 {' '.join(overrides)}, {args.updates} updates")
    started = time.perf_counter()
    timeout = max(30.0, min(args.train_timeout, budget.left()))
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"did not finish in {timeout:.0f} s", "overrides": overrides}
    seconds = time.perf_counter() - started
    text = result.stdout + result.stderr
    records = train_inner_lines(result.stdout)
    report: Dict = {"overrides": overrides, "returncode": result.returncode, "seconds": round(seconds, 1)}
    if note:
        report["note"] = note
    if result.returncode != 0 or not records:
        report.update(ok=False, error="fairseq-hydra-train failed", output_tail=text[-3000:])
        log(f"[train {precision}] FAILED (exit {result.returncode}):\n{text[-1500:]}")
        return report
    updates = [int(r["num_updates"]) for r in records]
    overflows = len(re.findall(r"gradient overflow detected", text))
    report.update(loss_summary(records, args.train_classes))
    report.update(
        updates=updates[-1],
        all_updates_logged=updates == list(range(1, args.updates + 1)),
        overflow_skips=overflows,
        loss_scale=records[-1].get("loss_scale"),
        # fairseq's "wall": seconds since the trainer started (data loading and start-up included).
        updates_per_second=round(args.updates / max(float(records[-1].get("wall", 0)) or seconds, 1e-9), 2),
        loss_curve=[float(r["loss"]) for r in records],
    )
    checks = {
        "finished": report["all_updates_logged"],
        "finite": report["finite"],
        "loss falls": report["falls"],
        "overflow skips": overflows <= MAX_OVERFLOW_SKIPS,
    }
    checkpoint = save_dir / "checkpoint_last.pt"
    if checkpoint.exists():
        report["checkpoint_on_cpu"] = checkpoint_round_trip(checkpoint, args.device)
        checks["checkpoint loads on cpu"] = report["checkpoint_on_cpu"]["ok"]
    else:
        checks["checkpoint loads on cpu"] = False
    report["checks"] = checks
    report["ok"] = all(checks.values())
    log(
        f"[train {precision}] loss {report['first_loss']} -> {report['last_loss']} bits (chance {report['chance_loss']}), "
        f"acc_m {report['last_acc_m']}, {overflows} overflow skips, {seconds:.0f} s: "
        + ("ok" if report["ok"] else "FAILED " + ", ".join(k for k, v in checks.items() if not v))
    )
    shutil.rmtree(save_dir, ignore_errors=True)  # Base checkpoints are ~1 GB each
    return report


def run_train_stage(args, budget: Budget, work: Path) -> Dict:
    """The bf16 and fp16 fairseq runs on one synthetic corpus."""
    # 10 ms frames; stage1 drops utterances under 160 model frames and crops to 750 (quick: 100).
    frames = 360 if args.quick else 1600
    data = write_learnable_corpus(work / "corpus", num_utts=16 if args.quick else 128, num_frames=frames, num_classes=args.train_classes)
    runs = {}
    for precision in ("bf16", "fp16"):
        if budget.left() < 20:
            runs[precision] = {"ok": False, "error": "skipped: time budget spent"}
            continue
        runs[precision] = run_training(args, precision, data, work, budget)
    return {"ok": all(r["ok"] for r in runs.values()), "runs": runs}


# --- stage 3: speed and memory --------------------------------------------------------------------


def synchronize(device) -> None:
    """Wait for the GPU (no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_out_of_memory(error: BaseException) -> bool:
    """True for the allocator's out-of-memory error (and the RuntimeErrors that wrap it)."""
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def release(case) -> None:
    """Drop what a failed step left behind: gradients and cached blocks."""
    import torch

    if case.model is not None:
        case.model.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def step_peak_bytes(step: Callable[[], None], device) -> int:
    """Bytes one call of ``step`` allocates above what was allocated before it (activations, grads, workspace)."""
    import torch

    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def largest_batch(fits: Callable[[int], bool], peak_at: Callable[[int], int], base: int, capacity: int, resident: int, tries: int = 3) -> Dict:
    """Largest batch that fits: a linear fit of the step's peak at ``base`` and ``2 * base``, then verified.

    ``peak_at(n)`` is a step's peak bytes above ``resident`` at batch n; ``fits(n)`` runs a
    step at n and says whether it ran. The fit predicts n from ``capacity`` (what the
    allocator can hold) minus ``resident`` bytes, with 3 % left for fragmentation; each try
    that fails shrinks n by 15 %. ``verified`` is the largest batch seen to run (at least
    ``2 * base``, which the fit ran).
    """
    small, large = peak_at(base), peak_at(2 * base)
    per_item = max((large - small) / base, 1.0)
    fixed = small - base * per_item
    predicted = int((capacity * 0.97 - resident - fixed) // per_item)
    report = {"per_item_gib": round(per_item / GIB, 3), "predicted": predicted, "verified": 2 * base, "tried": []}
    batch = predicted
    for _ in range(tries):
        if batch <= 2 * base:
            break
        ok = fits(batch)
        report["tried"].append([batch, ok])
        if ok:
            report["verified"] = batch
            break
        batch = int(batch * 0.85)
    return report


def speed_args(args):
    """The namespace speed_common.build_cases reads."""
    return SimpleNamespace(
        device=args.device, threads=args.threads, utterances=args.utterances, seconds=args.seconds,
        precisions=args.precisions, cases="hubert,ours_20ms,ours_40ms",
        size_overrides=QUICK_SIZES if args.quick else None, hubert_overrides=QUICK_HUBERT_FRONT_END if args.quick else None,
    )


def measure_mode(args, mode: str, budget: Budget, reserve: float) -> Dict:
    """Build, time and (on GPU) size every case of ``mode`` (train or infer); rows for the table."""
    import torch

    from speed_common import build_cases, time_interleaved

    device = torch.device(args.device)
    cases = build_cases(speed_args(args), mode, log=lambda m: log(f"[speed {mode}] {m}"))
    log(f"[speed {mode}] timing {len(cases)} cases, {args.warmup} warm-up + {args.repeats} timed rounds")
    times = time_interleaved(cases, args.repeats, args.warmup, device, log=lambda m: log(f"[speed {mode}] {m}"))
    rows = []
    for case in cases:
        median = statistics.median(times[case.name])
        rows.append({
            "case": case.name, "model": case.name.split("@")[0], "precision": case.precision, "batch": case.batch,
            "seconds_per_step": round(median, 4), "min_seconds_per_step": round(min(times[case.name]), 4),
            "audio_seconds_per_second": round(case.audio_seconds / median, 2), "rounds": [round(t, 4) for t in times[case.name]],
        })
    if device.type == "cuda":
        capacity = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
        for case, row in zip(cases, rows):
            row["peak_gib"] = round(step_peak_bytes(case.step, device) / GIB, 2)
        if mode == "train":
            for case, row in zip(cases, rows):
                if budget.left() < reserve:
                    row["largest_batch"] = {"skipped": "time budget"}
                    continue
                resident = torch.cuda.memory_allocated(device)

                def fits(batch: int, case=case) -> bool:
                    try:
                        case.resize(batch)()
                        synchronize(device)
                        return True
                    except RuntimeError as error:  # OOM, or a kernel's size limit at a huge batch
                        if not is_out_of_memory(error):
                            row.setdefault("largest_batch_errors", []).append(f"{batch}: {str(error)[:200]}")
                        return False
                    finally:
                        release(case)

                def peak_at(batch: int, case=case) -> int:
                    try:
                        return step_peak_bytes(case.resize(batch), device)
                    finally:
                        release(case)

                try:
                    row["largest_batch"] = largest_batch(fits, peak_at, case.batch, capacity, resident)
                except RuntimeError as error:
                    release(case)
                    row["largest_batch"] = {"error": str(error)[:300]}
                found = row["largest_batch"]
                log(f"[speed {mode}] {case.name}: peak {row['peak_gib']} GiB at {case.batch} crops; largest batch {found.get('verified', found)}")
    del cases
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"rows": rows}


def add_ratios(rows: List[Dict]) -> None:
    """Per row: x HuBERT at the same precision (HuBERT's half precision is fairseq's whole-model mode) and x own fp32."""
    speed = {row["case"]: row["audio_seconds_per_second"] for row in rows}
    for row in rows:
        hubert = speed.get(f"hubert@{HUBERT_REFERENCE[row['precision']]}")
        own_fp32 = speed.get(f"{row['model']}@fp32")
        row["x_hubert_same_precision"] = round(row["audio_seconds_per_second"] / hubert, 2) if hubert else None
        row["x_own_fp32"] = round(row["audio_seconds_per_second"] / own_fp32, 2) if own_fp32 else None


def target_verdicts(train_rows: List[Dict]) -> List[Dict]:
    """The issue's targets: ours_20ms >= 3x HuBERT at the same precision; ours_20ms bf16 >= 2x its fp32."""
    verdicts = []
    for row in train_rows:
        if row["model"] != "ours_20ms":
            continue
        if row["x_hubert_same_precision"] is not None:
            verdicts.append({"target": f"ours_20ms@{row['precision']} >= 3x hubert@{HUBERT_REFERENCE[row['precision']]} (train)",
                             "value": row["x_hubert_same_precision"], "met": row["x_hubert_same_precision"] >= 3.0})
        if row["precision"] in ("bf16", "bf16w") and row["x_own_fp32"] is not None:
            verdicts.append({"target": f"ours_20ms@{row['precision']} >= 2x ours_20ms@fp32 (train)",
                             "value": row["x_own_fp32"], "met": row["x_own_fp32"] >= 2.0})
    return verdicts


def run_speed_stage(args, budget: Budget, work: Path) -> Dict:
    """Training and inference speed side by side, then the targets."""
    report: Dict = {"utterances": args.utterances, "seconds": args.seconds, "precisions": args.precisions}
    # Inference first: the training mode ends with the largest-batch probes, the part a short budget drops.
    for mode in ("infer", "train"):
        if budget.left() < (20 if args.quick else 45):
            report[mode] = {"error": "skipped: time budget spent"}
            continue
        try:
            report[mode] = measure_mode(args, mode, budget, reserve=20)
            add_ratios(report[mode]["rows"])
        except Exception as error:  # record and go on: the results file must still be written
            report[mode] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
            log(f"[speed {mode}] FAILED: {error}")
    report["targets"] = target_verdicts(report.get("train", {}).get("rows", []))
    report["ok"] = all("rows" in report.get(mode, {}) for mode in ("train", "infer"))
    return report


# --- report ---------------------------------------------------------------------------------------


def format_table(results: Dict) -> str:
    """The short markdown summary printed at the end and stored in the results file."""
    info = results["environment"]
    lines = [
        f"gpu_check on {info.get('device_name')} ({results['device']}{', quick' if results['quick'] else ''}), "
        f"torch {info.get('torch')}, fairseq {info.get('fairseq')}, {results['seconds']:.0f} s",
        *(["quick mode: tiny models, one timed round: the speed figures check the script, not the code's speed"] if results["quick"] else []),
        "",
        "| check | result |",
        "|---|---|",
    ]
    stages = results["stages"]
    if "tests" in stages:
        tests = stages["tests"]
        lines.append(f"| gpu tests | {'pass' if tests['ok'] else 'FAIL'}: {tests.get('pytest_summary') or tests.get('error', '')} |")
    for precision, run in stages.get("train", {}).get("runs", {}).items():
        if "first_loss" in run:
            detail = (f"loss {run['first_loss']} -> {run['last_loss']} bits (chance {run['chance_loss']}), acc_m {run['last_acc_m']}, "
                      f"{run['updates']} updates, {run['overflow_skips']} overflow skips, loss scale {run.get('loss_scale') or '-'}")
        else:
            detail = run.get("error", "")
        lines.append(f"| train {precision} (fairseq common.{precision}) | {'pass' if run['ok'] else 'FAIL'}: {detail} |")
        if run.get("note"):
            lines.append(f"| | {run['note']} |")
    speed = stages.get("speed", {})
    for mode, title in (("train", "Training step"), ("infer", "Inference")):
        if mode not in speed:
            continue
        if "rows" not in speed[mode]:
            lines += ["", f"{title}: {speed[mode].get('error')}"]
            continue
        lines += [
            "",
            f"{title}, {speed['utterances']} x {speed['seconds']:g} s crops per step, median of {args_repeats(results)} interleaved rounds "
            "(HuBERT's bf16/fp16 reference is fairseq's whole-model bf16w/fp16w):",
            "",
            "| case | s/step | audio-s per s | x HuBERT same precision | x own fp32 | peak GiB | largest batch (crops) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in speed[mode]["rows"]:
            largest = row.get("largest_batch", {})
            largest_text = str(largest.get("verified", "-")) if "verified" in largest else ("-" if not largest else next(iter(largest.values())))
            lines.append(
                f"| {row['case']} | {row['seconds_per_step']:.3f} | {row['audio_seconds_per_second']:.1f} "
                f"| {fmt(row['x_hubert_same_precision'])} | {fmt(row['x_own_fp32'])} | {row.get('peak_gib', '-')} | {largest_text} |"
            )
    if speed.get("targets"):
        lines += ["", "Targets:"] + [f"- {t['target']}: {t['value']:.2f}x, {'met' if t['met'] else 'not met'}" for t in speed["targets"]]
    return "\n".join(lines)


def fmt(value: Optional[float]) -> str:
    """A ratio for the table (``-`` when there is no reference row)."""
    return "-" if value is None else f"{value:.2f}"


def args_repeats(results: Dict) -> int:
    """Timed rounds of the speed stage (from the stored arguments)."""
    return int(results["arguments"]["repeats"])


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the check."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny models, few updates and short crops: the CPU smoke run CI keeps working")
    parser.add_argument("--out", default=None, help="folder of the results file (default: $OUT, else benchmarks/results)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)} (default: all)")
    parser.add_argument("--budget", type=float, default=None, help="seconds the whole check may take; later stages shrink or skip (default 420, which fits a GPU call; quick 600)")
    parser.add_argument("--updates", type=int, default=None, help="fairseq updates per training run (default 100; quick 16)")
    parser.add_argument("--train-classes", type=int, default=None, help="k-means classes of the synthetic training corpus (default 512; quick 32)")
    parser.add_argument("--utterances", type=int, default=None, help="crops per speed step (default 4, the recipe's per-GPU batch; quick 1)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per crop in the speed stage (default 15 = 750 frames at 20 ms; quick 0.5)")
    parser.add_argument("--precisions", default=None, help="speed-stage precisions (default fp32,bf16,bf16w,fp16,fp16w)")
    parser.add_argument("--repeats", type=int, default=None, help="timed speed rounds (median reported; default 5, quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed speed rounds first (default 2, quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (--device cpu)")
    parser.add_argument("--tests-timeout", type=float, default=240.0, help="seconds the pytest stage may take")
    parser.add_argument("--train-timeout", type=float, default=150.0, help="seconds one training run may take")
    return parser


def fill_defaults(args) -> None:
    """Quick and full defaults of the flags left unset."""
    quick = args.quick
    defaults = dict(budget=600.0 if quick else 420.0, updates=16 if quick else 100, train_classes=32 if quick else 512,
                    utterances=1 if quick else 4, seconds=0.5 if quick else 15.0, repeats=1 if quick else 5, warmup=1 if quick else 2,
                    precisions="fp32,bf16,bf16w,fp16,fp16w")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def main(argv=None) -> int:
    """Run the stages, write the results file, print the table; exit 0 only when every check passed."""
    args = build_parser().parse_args(argv)
    fill_defaults(args)
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        print(f"error: --stages {args.stages}: unknown stage(s) {', '.join(unknown)} (use {', '.join(STAGES)})", file=sys.stderr)
        return 2
    out_dir = Path(args.out or os.environ.get("OUT") or BENCHMARKS_DIR / "results")
    budget = Budget(args.budget)
    environment = preflight(args.device)
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    results: Dict = {
        "device": args.device, "quick": args.quick, "environment": environment, "arguments": vars(args), "stages": {},
    }
    runners = {"tests": run_tests_stage, "train": run_train_stage, "speed": run_speed_stage}
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        for stage in stages:
            log(f"== {stage} ({budget.elapsed():.0f} s elapsed, {budget.left():.0f} s left)")
            try:
                results["stages"][stage] = runners[stage](args, budget, work)
            except Exception as error:  # one broken stage must not lose the others' results
                results["stages"][stage] = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
                log(f"[{stage}] FAILED: {error}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(budget.elapsed(), 1)
    results["within_budget"] = budget.left() >= 0
    results["ok"] = all(results["stages"][s].get("ok") for s in stages) and results["within_budget"]
    results["table"] = format_table(results)

    from melhubert_fairseq.atomic_output import atomic_output

    path = out_dir / f"gpu_check_{torch.device(args.device).type}{'_quick' if args.quick else ''}.json"
    with atomic_output(str(path), overwrite=True) as handle:
        json.dump(results, handle, indent=1)
    log("\n" + results["table"] + "\n")
    failed = [s for s in stages if not results["stages"][s].get("ok")]
    log(
        f"done: {'all checks passed' if results['ok'] else 'FAILED: ' + ', '.join(failed or ['time budget'])}; "
        f"{results['seconds']:.0f} s of a {args.budget:.0f} s budget; results in {path}"
    )
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
