"""Training-step speed: Mel-HuBERT vs fairseq's HuBERT Base and the straightforward implementation.

One training step = forward with masking + loss (each model's own criterion) +
backward + grads / sample_size + gradient clipping + fairseq's Adam step, on
the same audio (default 2 x 8 s). Cases run interleaved in one process; the
table gives audio-seconds per wall-second and the ratios the targets refer to:

* ``hubert``: fairseq ``HubertModel``, Base recipe (conv front end, 12 x 768, 50 Hz);
* ``straightforward_20ms``: our 20 ms Base with fairseq's Python multi-head
  attention, torch's dropout and fairseq's positional conv (see speed_common.py);
* ``ours_20ms`` / ``ours_10ms`` / ``ours_40ms``: Mel-HuBERT Base at 20/10/40 ms.

Each model runs at every ``--precisions`` entry (fp32 = no autocast; bf16/fp16 =
``torch.autocast``; bf16w = the whole model in bf16 with fp32 master weights in
Adam, as fairseq's ``common.bf16`` runs it, the only bf16 mode fairseq's HuBERT
supports; fp16w likewise in fp16 with fairseq's loss scale, ``common.fp16``; the
loss stays fp32). A torch.profiler table of one ours_20ms
step is written to ``benchmarks/results/profile_train_20ms[_bf16].txt``.

    python benchmarks/bench_train_step.py                     # CPU, 2 threads, ~3 min on an idle machine
    python benchmarks/bench_train_step.py --repeats 7 --seconds 15
    python benchmarks/bench_train_step.py --device cuda --utterances 8 --seconds 15
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_common import add_common_arguments, format_table, results_path, run_cases, save_text, target_lines  # noqa: E402

TARGETS = {
    "ours_20ms": ">= 3.6x HuBERT, >= 1.2x straightforward",
    "ours_40ms": ">= 6x HuBERT",
}


def profile_step(step, device: torch.device, row_limit: int) -> str:
    """torch.profiler table (sorted by self CPU time) of one call of ``step``, with its phase totals first."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    phases = [e for e in averages if e.key in ("forward_and_loss", "backward_and_update")]
    lines = [f"phase {e.key}: {e.cpu_time_total / 1e6:.3f} s CPU total" for e in phases]
    sort_key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return "\n".join(lines) + "\n\n" + averages.table(sort_by=sort_key, row_limit=row_limit)


def main(argv=None) -> None:
    """Time training steps side by side, print the table, save it and the profile."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler run of ours_20ms")
    parser.add_argument("--profile-rows", type=int, default=40, help="rows of the saved profile table")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device(args.device)
    cases, times, header = run_cases(args, "train", "Training step")
    report = header + "\n\n" + format_table(cases, times, TARGETS) + "\n\n" + "\n".join(target_lines(cases, times, TARGETS))
    print("\n" + report)
    save_text(results_path(args, "train_step"), report)

    if not args.no_profile:
        for case in cases:
            if case.name.startswith("ours_20ms@"):
                text = profile_step(case.step, device, args.profile_rows)
                name = "profile_train_20ms" + ("" if case.precision == "fp32" else f"_{case.precision}")
                name += "" if device.type == "cpu" else "_cuda"
                path = os.path.join(args.results_dir, name + ".txt")
                save_text(path, f"{header}\ncase {case.name}\n\n{text}")
                print(f"profile of {case.name} -> {path}")
    print(f"done: {len(cases)} cases, {args.utterances * args.seconds:g} s audio per step, {time.perf_counter() - started:.0f} s taken")


if __name__ == "__main__":
    main()
