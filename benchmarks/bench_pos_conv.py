"""Positional convolution: our channels-last ``TimeMajorConv1d`` vs fairseq's ``make_conv_pos`` (``nn.Conv1d``).

Both are HuBERT's weight-normalised 128-tap, 16-group conv with the same
weights, fed the way the encoder feeds them: the (B, C, T) transpose of the
(B, T, C) activations, output transposed back. Timed forward only (inference)
and forward + backward (training), interleaved, medians; prints the ratio.

    python benchmarks/bench_pos_conv.py                   # Base: 2 x 400 frames (2 x 8 s at 20 ms), 768 dim
    python benchmarks/bench_pos_conv.py --frames 750 --batch 4
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from fairseq.models.wav2vec.wav2vec2 import make_conv_pos as fairseq_make_conv_pos

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_common import RESULTS_DIR, save_text  # noqa: E402

from melhubert_fairseq.models.components import make_pos_conv  # noqa: E402


def main(argv=None) -> None:
    """Time both convs side by side, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="utterances per batch")
    parser.add_argument("--frames", type=int, default=400, help="frames per utterance")
    parser.add_argument("--dim", type=int, default=768, help="encoder embedding dim")
    parser.add_argument("--kernel", type=int, default=128, help="conv_pos kernel size")
    parser.add_argument("--groups", type=int, default=16, help="conv_pos_groups")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where pos_conv_cpu.md is written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    torch.manual_seed(0)
    ours = make_pos_conv(args.dim, args.kernel, args.groups, depth=1)
    plain = fairseq_make_conv_pos(args.dim, args.kernel, args.groups)
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(args.batch, args.frames, args.dim, requires_grad=True)
    grad = torch.randn(args.batch, args.frames, args.dim)

    def run(module, backward: bool) -> None:
        out = module(x.transpose(1, 2)).transpose(1, 2)
        if backward:
            out.backward(grad)
        module.zero_grad(set_to_none=True)
        x.grad = None

    cases = {
        (name, backward): (module, backward)
        for backward in (False, True)
        for name, module in (("fairseq nn.Conv1d", plain), ("ours TimeMajorConv1d", ours))
    }
    times = {key: [] for key in cases}
    for round_index in range(args.repeats + 1):
        for key, (module, backward) in cases.items():
            begin = time.perf_counter()
            with torch.set_grad_enabled(backward):
                run(module, backward)
            if round_index:  # round 0 warms up
                times[key].append(time.perf_counter() - begin)

    header = (
        f"Positional conv ({args.dim} dim, kernel {args.kernel}, {args.groups} groups), batch {args.batch} x "
        f"{args.frames} frames, cpu ({platform.processor() or 'cpu'}, {args.threads} threads), torch {torch.__version__}, "
        f"median of {args.repeats}"
    )
    rows = ["| pass | fairseq nn.Conv1d ms | ours ms | speed-up |", "|---|---|---|---|"]
    for backward, label in ((False, "forward"), (True, "forward + backward")):
        base = statistics.median(times[("fairseq nn.Conv1d", backward)]) * 1e3
        mine = statistics.median(times[("ours TimeMajorConv1d", backward)]) * 1e3
        rows.append(f"| {label} | {base:.1f} | {mine:.1f} | {base / mine:.2f}x |")
    report = header + "\n\n" + "\n".join(rows)
    print(report)
    save_text(os.path.join(args.results_dir, "pos_conv_cpu.md"), report)
    print(f"done: {len(cases)} cases x {args.repeats} rounds in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
