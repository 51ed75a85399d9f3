"""Stage 3 of gpu_check.py: speed and memory of our 20 ms and 40 ms Base against fairseq's HuBERT Base.

Training steps and inference interleaved in this process (speed_common.py), at fp32, bf16 and fp16, at the
recipe's per-GPU batch: audio-seconds per second, ratios, peak memory and the largest batch a training
step fits. Standard library only at import, like gpu_check.py: the preflight reports missing packages first.
"""
from __future__ import annotations

import gc
import statistics
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List

from gpu_check_common import QUICK_HUBERT_FRONT_END, QUICK_SIZES, Budget, log

#: fairseq's HuBERT runs half precision only with the whole model converted (common.bf16/fp16):
#: the reference row for each of our precisions.
HUBERT_REFERENCE = {"fp32": "fp32", "bf16": "bf16w", "bf16w": "bf16w", "fp16": "fp16w", "fp16w": "fp16w"}
GIB = float(2**30)


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
