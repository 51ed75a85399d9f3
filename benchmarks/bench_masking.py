"""Span masking per batch: the vectorised path vs fairseq's ``compute_mask_indices``, side by side.

Three ways to draw the recipe's masks (mask_prob 0.7, mask_length 5, min_masks 2, per-utterance counts)
for a batch of B crops of T frames:

* ``vectorized``: ``span_mask(mask_impl="vectorized")``, seeded by (seed, update, sample id);
* ``fairseq_seeded``: ``span_mask(mask_impl="fairseq")``, i.e. fairseq's ``compute_mask_indices`` with
  ``seed/epoch/indices`` (one ``np.random.default_rng(hash((seed, epoch, id)) % 1e6)`` per utterance);
* ``fairseq_plain``: ``compute_mask_indices`` without a seed (numpy's unseeded generators).

Interleaved rounds, medians, ratios printed; with ``--step`` also one Base training step at 20 ms
(speed_common's ``mel_hubert_train_step``, fp32) at the first batch shape, for the fraction of a step
masking costs.

    python benchmarks/bench_masking.py                  # 8 x 750 and 32 x 750 frames
    python benchmarks/bench_masking.py --step           # + one Base training step at 8 x 750 (slow on CPU)
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
from speed_common import RESULTS_DIR, build_mel_hubert, make_optimizer, mel_hubert_train_step, save_text  # noqa: E402

from fairseq.data.data_utils import compute_mask_indices  # noqa: E402
from melhubert_fairseq.models.masking import SpanMaskConfig, span_mask  # noqa: E402

MASK_PROB, MASK_LENGTH, MIN_MASKS, SEED = 0.7, 5, 2, 1


def mask_cases(batch: int, frames: int) -> Dict[str, Callable[[], object]]:
    """The three masking calls for one (batch, frames) shape; each call draws a new update's masks."""
    padding = torch.zeros(batch, frames, dtype=torch.bool)
    ids = torch.arange(batch) * 997  # sample ids of a shuffled corpus
    update = [0]

    def masker(impl: str) -> Callable[[], object]:
        config = SpanMaskConfig(mask_prob=MASK_PROB, mask_length=MASK_LENGTH, mask_min_masks=MIN_MASKS, mask_impl=impl)

        def run() -> object:
            update[0] += 1
            return span_mask(config, (batch, frames), padding, SEED, update[0], ids)

        return run

    def plain() -> object:
        return torch.from_numpy(
            compute_mask_indices((batch, frames), padding, MASK_PROB, MASK_LENGTH, "static", 0.0,
                                 min_masks=MIN_MASKS, require_same_masks=False)
        )

    return {"vectorized": masker("vectorized"), "fairseq_seeded": masker("fairseq"), "fairseq_plain": plain}


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
    rows = ["| batch | vectorized ms | fairseq seeded ms | fairseq plain ms | seeded / vectorized | plain / vectorized |",
            "|---|---|---|---|---|---|"]
    measured = {}
    for batch, frames in shapes:
        medians = median_times(mask_cases(batch, frames), args.repeats)
        measured[(batch, frames)] = medians
        fast, seeded, plain = (medians[k] * 1e3 for k in ("vectorized", "fairseq_seeded", "fairseq_plain"))
        rows.append(f"| {batch} x {frames} | {fast:.2f} | {seeded:.2f} | {plain:.2f} | {seeded / fast:.2f}x | {plain / fast:.2f}x |")
        print(rows[-1], flush=True)
    lines = [header, "", *rows]

    if args.step:
        batch, frames = shapes[0]
        model = build_mel_hubert(2)
        source = torch.randn(batch, frames, model.cfg.feat_dim * 2)
        step = mel_hubert_train_step(model, make_optimizer(model, "mel_hubert"), source, torch.device("cpu"), "fp32")
        step_s = median_times({"step": step}, args.step_repeats)["step"]
        medians = measured[shapes[0]]
        saved = medians["fairseq_seeded"] - medians["vectorized"]
        lines += [
            "",
            f"Base training step, 20 ms, fp32, {batch} x {frames} frames, median of {args.step_repeats}: {step_s:.2f} s; "
            f"masking is {100 * medians['vectorized'] / step_s:.3f}% of it vectorized, "
            f"{100 * medians['fairseq_seeded'] / step_s:.3f}% fairseq seeded; the vectorised path saves "
            f"{100 * saved / step_s:.3f}% of a step.",
        ]
        print(lines[-1], flush=True)

    path = os.path.join(args.results_dir, "masking_cpu.md")
    save_text(path, "\n".join(lines))
    print(f"done: {len(shapes)} shapes timed; results in {path}")


if __name__ == "__main__":
    main()
