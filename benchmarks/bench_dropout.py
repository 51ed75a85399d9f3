"""CPU dropout and training attention: our paths vs torch's, side by side.

1. Mask drawing: ``cpu_kernels.keep_mask`` (16-bit lanes of numpy's SFC64) against
   torch's ``bernoulli_`` (what ``F.dropout`` and SDPA's math path sample with on
   CPU), for an attention-probability mask (B x heads x T x T) and a feed-forward
   activation (B x T x 4C).
2. Attention with dropout, forward + backward: ``cpu_kernels.softmax_attention``
   with a ``keep_mask`` against ``F.scaled_dot_product_attention(dropout_p=p)``
   (SDPA's CPU math path with torch's sampler), and SDPA without dropout (its
   flash kernel) for scale.
3. Dropout of a feed-forward activation, forward + backward: ``components.dropout``
   against ``F.dropout``.

Interleaved rounds, medians, ratios printed.

    python benchmarks/bench_dropout.py                 # Base: 2 x 400 frames, 12 heads, 768 / 3072 dim
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_common import RESULTS_DIR, save_text  # noqa: E402

from melhubert_fairseq.models.components import dropout  # noqa: E402
from melhubert_fairseq.models.cpu_kernels import keep_mask, softmax_attention  # noqa: E402


def with_backward(forward: Callable[[], torch.Tensor], grad: torch.Tensor, leaves: List[torch.Tensor]) -> Callable[[], None]:
    """A closure running ``forward`` then its backward with ``grad``, clearing the leaves' grads."""

    def run() -> None:
        forward().backward(grad)
        for leaf in leaves:
            leaf.grad = None

    return run


def timed(function: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    begin = time.perf_counter()
    function()
    return time.perf_counter() - begin


def time_pairs(pairs: Dict[str, Tuple[Callable[[], object], Callable[[], object]]], repeats: int) -> Dict[str, Tuple[float, float]]:
    """Median seconds of (ours, torch's) for every pair, run interleaved after one warm-up round."""
    times = {name: ([], []) for name in pairs}
    for round_index in range(repeats + 1):
        for name, functions in pairs.items():
            for slot, function in enumerate(functions):
                seconds = timed(function)
                if round_index:
                    times[name][slot].append(seconds)
    return {name: (statistics.median(a), statistics.median(b)) for name, (a, b) in times.items()}


def main(argv=None) -> None:
    """Time our dropout paths against torch's, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2, help="utterances per batch")
    parser.add_argument("--frames", type=int, default=400, help="frames per utterance")
    parser.add_argument("--heads", type=int, default=12, help="attention heads")
    parser.add_argument("--head-dim", type=int, default=64, help="dimension per head")
    parser.add_argument("--ffn-dim", type=int, default=3072, help="feed-forward dimension")
    parser.add_argument("--p", type=float, default=0.1, help="dropout probability")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where dropout_cpu.md is written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    p, batch, frames, heads = args.p, args.batch, args.frames, args.heads

    scores_shape = (batch, heads, frames, frames)
    ffn_shape = (batch, frames, args.ffn_dim)
    scratch = {shape: torch.empty(shape) for shape in (scores_shape, ffn_shape)}
    q, k, v = (torch.randn(batch, heads, frames, args.head_dim, requires_grad=True) for _ in range(3))
    attention_grad = torch.randn(batch, heads, frames, args.head_dim)
    activation = torch.randn(ffn_shape, requires_grad=True)
    activation_grad = torch.randn(ffn_shape)

    pairs = {
        f"mask {'x'.join(map(str, scores_shape))}": (
            lambda: keep_mask(scores_shape, p),
            lambda: scratch[scores_shape].bernoulli_(1 - p),
        ),
        f"mask {'x'.join(map(str, ffn_shape))}": (
            lambda: keep_mask(ffn_shape, p),
            lambda: scratch[ffn_shape].bernoulli_(1 - p),
        ),
        "attention + dropout, fwd+bwd": (
            with_backward(lambda: softmax_attention(q, k, v, None, keep_mask(scores_shape, p), p), attention_grad, [q, k, v]),
            with_backward(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p), attention_grad, [q, k, v]),
        ),
        "feed-forward dropout, fwd+bwd": (
            with_backward(lambda: dropout(activation, p, True), activation_grad, [activation]),
            with_backward(lambda: F.dropout(activation, p, True), activation_grad, [activation]),
        ),
    }
    medians = time_pairs(pairs, args.repeats)
    no_dropout = with_backward(lambda: F.scaled_dot_product_attention(q, k, v), attention_grad, [q, k, v])
    flash = statistics.median(timed(no_dropout) for _ in range(args.repeats))

    header = (
        f"CPU dropout, p={p}, cpu ({platform.processor() or 'cpu'}, {args.threads} threads), torch {torch.__version__}, "
        f"median of {args.repeats} interleaved rounds"
    )
    rows = ["| what | ours ms | torch ms | speed-up |", "|---|---|---|---|"]
    for name, (ours, theirs) in medians.items():
        rows.append(f"| {name} | {ours * 1e3:.2f} | {theirs * 1e3:.2f} | {theirs / ours:.2f}x |")
    report = (
        header + "\n\n" + "\n".join(rows) + "\n\n"
        "ours: keep_mask (numpy SFC64, 16-bit lanes) / softmax_attention / components.dropout; "
        "torch: bernoulli_ / F.scaled_dot_product_attention(dropout_p) / F.dropout.\n"
        f"For scale: SDPA without dropout (flash kernel), fwd+bwd: {flash * 1e3:.2f} ms."
    )
    print(report)
    save_text(os.path.join(args.results_dir, "dropout_cpu.md"), report)
    print(f"done: {len(pairs)} pairs x {args.repeats} rounds in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
