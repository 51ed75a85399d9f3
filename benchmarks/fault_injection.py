"""Kill training, fine-tuning and the data tools at random moments (SIGKILL); rerunning the same command must recover.

For every scenario (a tool with its inputs), the script first runs the command
uninterrupted, as the reference (its outputs, its duration, and when it first
wrote anything). Then, N times: build the same inputs in a fresh folder, start
the command, SIGKILL its whole process group at a random moment of its working
time (a random delay after its first write into the output folders), look at
what the kill left, rerun the same command to completion and compare. Each
trial is classified as

* ``clean``: the rerun succeeded with outputs equal to the reference, and had
  nothing to clean up (killed before anything was staged);
* ``repaired``: the same, after the rerun removed a killed run's staging folder
  or rolled back its unfinished publish (it says so in a ``note:`` line);
* ``resumed``: the rerun continued the killed run's work (scenarios that can,
  such as training) and ended equal to the reference;
* ``finished``: the run had already published everything (or exited) when
  the kill came; the rerun refused to overwrite it (exit 2, "already exists")
  and the outputs equal the reference;
* ``corrupt``: anything else: inputs modified, a readable manifest over
  inconsistent data (or a mix of old and new outputs) right after the kill, a
  failed rerun, hidden staging/temporary files left after the rerun, or
  outputs that differ from the reference.

    python benchmarks/fault_injection.py [--n 20] [--seed 0] [--scenarios all] [--out results.md]

The scenarios (prepare once, set up inputs per trial, the command, the folders holding inputs and outputs,
the file that makes the outputs readable) are in fault_injection_scenarios.py; a new one (e.g. training) is
one more entry in its :func:`scenarios`. The kill-and-check harness is fault_injection_harness.py.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from tqdm import tqdm

from fault_injection_harness import OUTCOMES, Reference, classify, reference_run, run_trial
from fault_injection_scenarios import scenarios


def format_table(counts: Dict[str, Dict[str, int]], references: Dict[str, Reference]) -> str:
    """Markdown table: one row per scenario, one column per outcome."""
    header = "| scenario | reference run (s) | writes during (s) | kills | " + " | ".join(OUTCOMES) + " |"
    lines = [header, "|" + "---|" * (4 + len(OUTCOMES))]
    for name, row in counts.items():
        ref = references[name]
        cells = " | ".join(str(row[outcome]) for outcome in OUTCOMES)
        writes = f"{ref.first_write:.1f}-{ref.last_write:.1f}"
        lines.append(f"| {name} | {ref.seconds:.1f} | {writes} | {sum(row.values())} | {cells} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the fault injection; print the table and a summary line; exit 1 if any trial is corrupt."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="kills per scenario")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--scenarios", default="all", help="comma-separated scenario names, or 'all'")
    parser.add_argument("--out", help="also write the table, summary and every corrupt trial to this markdown file")
    parser.add_argument("--work-dir", help="scratch folder (default: a temporary folder, removed at the end)")
    parser.add_argument("--reference-runs", type=int, default=2, help="uninterrupted runs per scenario (outputs must agree)")
    args = parser.parse_args(argv)
    chosen = scenarios()
    if args.scenarios != "all":
        wanted = [name.strip() for name in args.scenarios.split(",")]
        unknown = sorted(set(wanted) - {s.name for s in chosen})
        if unknown:
            parser.error(f"unknown scenarios {unknown}; choose from {[s.name for s in chosen]}")
        chosen = [s for s in chosen if s.name in wanted]
    scratch = Path(args.work_dir or tempfile.mkdtemp(prefix="fault_injection_")).resolve()
    rng = random.Random(args.seed)
    started = time.perf_counter()
    counts: Dict[str, Dict[str, int]] = {}
    references: Dict[str, Reference] = {}
    corrupt: List[str] = []
    try:
        with tqdm(total=len(chosen) * args.n, desc="kill + rerun", unit="trial") as progress:
            for scenario in chosen:
                assets = scratch / "assets"
                assets.mkdir(parents=True, exist_ok=True)
                # One fixed work folder: outputs that record absolute paths compare equal across trials.
                work = scratch / "work"
                scenario.prepare(assets, work)
                reference = references[scenario.name] = reference_run(scenario, work, assets, args.reference_runs)
                row = counts[scenario.name] = {outcome: 0 for outcome in OUTCOMES}
                for index in range(args.n):
                    trial = run_trial(scenario, work, assets, reference, rng)
                    classify(trial, reference, scenario)
                    row[trial.outcome] += 1
                    if trial.outcome == "corrupt":
                        corrupt.append(f"{scenario.name} #{index} (kill at {trial.kill_at:.2f} s): {trial.reason}")
                    progress.set_postfix_str(f"{scenario.name}: {trial.outcome}")
                    progress.update(1)
    finally:
        if not args.work_dir:
            shutil.rmtree(scratch, ignore_errors=True)
    table = format_table(counts, references)
    total = sum(sum(row.values()) for row in counts.values())
    totals = {outcome: sum(row[outcome] for row in counts.values()) for outcome in OUTCOMES}
    summary = (
        f"{total} kills over {len(counts)} scenarios in {time.perf_counter() - started:.0f} s (seed {args.seed}): "
        + ", ".join(f"{totals[outcome]} {outcome}" for outcome in OUTCOMES)
    )
    print(table)
    for line in corrupt:
        print(f"corrupt: {line}")
    print(summary)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write("# Fault injection: SIGKILL at a random moment, then rerun the same command\n\n")
            handle.write(f"`python benchmarks/fault_injection.py --n {args.n} --seed {args.seed}`\n\n")
            handle.write(table + "\n\n" + "".join(f"- corrupt: {line}\n" for line in corrupt) + f"\n{summary}\n")
    return 1 if totals["corrupt"] else 0


if __name__ == "__main__":
    sys.exit(main())
