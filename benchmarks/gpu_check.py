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

This file holds the preflight, stage 1 and the report; stages 2 and 3 are gpu_check_train.py and
gpu_check_speed.py. All three import only the standard library at the top, so the preflight can name
what is missing before anything else fails.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from gpu_check_common import REPO_ROOT, Budget, log
from gpu_check_speed import run_speed_stage
from gpu_check_train import run_train_stage

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
#: The environment variable tests/test_gpu.py reads its device from.
TEST_DEVICE_VARIABLE = "MELHUBERT_TEST_DEVICE"


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
