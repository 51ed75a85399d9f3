"""Span masking per batch: the model's masking (fairseq's seeded ``compute_mask_indices``) vs unseeded, and vs a step.

The recipe's masks (mask_prob 0.7, mask_length 5, min_masks 2, per-utterance counts) for a batch of B crops of
T frames, drawn two ways:

* ``seeded``: ``span_mask``, the model's masking: fairseq's ``compute_mask_indices`` with ``seed/epoch/indices``
  (one ``np.random.default_rng(hash((seed, epoch, id)) % 1e6)`` per utterance);
* ``plain``: ``compute_mask_indices`` without a seed (numpy's unseeded generators).

Interleaved rounds, medians, the ratio printed; with ``--step`` also one Base training step at 20 ms
(speed_common's ``mel_hubert_train_step``, fp32) at the first batch shape, for the fraction of a step masking
costs: no faster masking can save more than that. Commit 1f537c8 of this script also timed the vectorised
masking with its own hash RNG that the model had then (``git checkout 1f537c8``, same command); it saved 0.001%
of a step and was removed (benchmarks/README.md).

    python benchmarks/bench_masking.py                  # 8 x 750 and 32 x 750 frames
    python benchmarks/bench_masking.py --step           # + one Base training step at 8 x 750 (minutes on CPU)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_common import RESULTS_DIR, save_text  # noqa: E402
from speed_models import build_mel_hubert  # noqa: E402
from speed_steps import make_optimizer, mel_hubert_train_step  # noqa: E402

from fairseq.data.data_utils import compute_mask_indices  # noqa: E402
from melhubert_fairseq.models.masking import SpanMaskConfig, span_mask  # noqa: E402

MASK_PROB, MASK_LENGTH, MIN_MASKS, SEED = 0.7, 5, 2, 1


def mask_cases(batch: int, frames: int) -> Dict[str, Callable[[], object]]:
    """The two masking calls for one (batch, frames) shape; each seeded call draws a new update's masks."""
    padding = torch.zeros(batch, frames, dtype=torch.bool)
    ids = torch.arange(batch) * 997  # sample ids of a shuffled corpus
    config = SpanMaskConfig(mask_prob=MASK_PROB, mask_length=MASK_LENGTH, mask_min_masks=MIN_MASKS)
    update = [0]

    def seeded() -> object:
        update[0] += 1
        return span_mask(config, (batch, frames), padding, SEED, update[0], ids)

    def plain() -> object:
        return torch.from_numpy(
            compute_mask_indices((batch, frames), padding, MASK_PROB, MASK_LENGTH, "static", 0.0,
                                 min_masks=MIN_MASKS, require_same_masks=False)
        )

    return {"seeded": seeded, "plain": plain}


def median_times(cases: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median wall seconds of each case, run interleaved after one warm-up round."""
    times: Dict[str, List[float]] = {name: [] for name in cases}
    for round_index in range(repeats + 1):
        for name, function in cases.items():
            begin = time.perf_counter()
            function()
            if round_index:
                times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    """Time the masking cases (and optionally a training step), print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x750,32x750", help="comma-separated BxT batch shapes (frames at 20 ms)")
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds per shape")
    parser.add_argument("--step", action="store_true", help="also time one Base training step (20 ms, fp32) at the first shape")
    parser.add_argument("--step-repeats", type=int, default=3, help="timed training steps with --step")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where masking_cpu.md goes")
    args = parser.parse_args()
    torch.manual_seed(0)

    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    header = (
        f"Span masking per batch (mask_prob {MASK_PROB}, length {MASK_LENGTH}, min_masks {MIN_MASKS}), cpu "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"median of {args.repeats} interleaved rounds"
    )
    rows = ["| batch | seeded (span_mask) ms | plain compute_mask_indices ms | seeded / plain |", "|---|---|---|---|"]
    measured = {}
    for batch, frames in shapes:
        medians = median_times(mask_cases(batch, frames), args.repeats)
        measured[(batch, frames)] = medians
        seeded, plain = medians["seeded"] * 1e3, medians["plain"] * 1e3
        rows.append(f"| {batch} x {frames} | {seeded:.2f} | {plain:.2f} | {seeded / plain:.2f}x |")
        print(rows[-1], flush=True)
    lines = [header, "", *rows]

    if args.step:
        batch, frames = shapes[0]
        model = build_mel_hubert(2)
        source = torch.randn(batch, frames, model.cfg.feat_dim * 2)
        step = mel_hubert_train_step(model, make_optimizer(model, "mel_hubert"), source, torch.device("cpu"), "fp32")
        step_s = median_times({"step": step}, args.step_repeats)["step"]
        seeded = measured[shapes[0]]["seeded"]
        lines += [
            "",
            f"Base training step, 20 ms, fp32, {batch} x {frames} frames, median of {args.step_repeats}: {step_s:.2f} s; "
            f"the model's masking is {100 * seeded / step_s:.4f}% of it.",
        ]
        print(lines[-1], flush=True)

    path = os.path.join(args.results_dir, "masking_cpu.md")
    save_text(path, "\n".join(lines))
    print(f"done: {len(shapes)} shapes timed; results in {path}")


if __name__ == "__main__":
    main()
