"""Inference speed (feature extraction): Mel-HuBERT vs fairseq's HuBERT Base and the straightforward implementation.

One step = ``extract_features`` of the final layer in eval mode under
``torch.inference_mode`` (no masking, no dropout) on the same audio (default
2 x 8 s): HuBERT from the waveform, Mel-HuBERT from its fbank (computed once
beforehand, as a feature-extraction job's data loader would). Same cases,
precisions and interleaved medians as bench_train_step.py.

    python benchmarks/bench_inference.py                      # CPU, 2 threads, ~1 min
    python benchmarks/bench_inference.py --repeats 9 --seconds 15
    python benchmarks/bench_inference.py --device cuda --utterances 8 --seconds 15
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_common import add_common_arguments, format_table, results_path, run_cases, save_text, target_lines  # noqa: E402

TARGETS = {"ours_20ms": ">= 2x HuBERT"}


def main(argv=None) -> None:
    """Time feature extraction side by side, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    cases, times, header = run_cases(args, "infer", "Inference (feature extraction)")
    report = header + "\n\n" + format_table(cases, times, TARGETS) + "\n\n" + "\n".join(target_lines(cases, times, TARGETS))
    print("\n" + report)
    save_text(results_path(args, "inference"), report)
    print(f"done: {len(cases)} cases, {args.utterances * args.seconds:g} s audio per step, {time.perf_counter() - started:.0f} s taken")


if __name__ == "__main__":
    main()
