"""``--help`` start-up of every console script: this tree against a baseline revision, side by side.

Each tool's ``--help`` runs in a fresh ``python -c "from MODULE import main; main(['--help'])"``
(what the console script does), alternating between this tree and the baseline tree round by round
so load on the machine hits both alike; the table gives the median wall time of each and their ratio,
and which heavy packages (fairseq, torch, scikit-learn) each ``--help`` imported. The baseline is
``git archive REV`` of this repository unpacked into a temporary folder (``--baseline-rev``, default
4415444, the last revision whose package import registered everything with fairseq eagerly), this
tree a copy of its package and tools (uncommitted changes included); a first, uncounted round
writes both trees' bytecode caches. Then
``python -X importtime`` of one tool's ``--help`` in both trees lists the packages that cost most.

    python benchmarks/bench_cli_startup.py [--repeats 5] [--baseline-rev 4415444]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
HEAVY = ("fairseq", "torch", "sklearn")

#: Runs one tool's --help the way its console script does, then names the heavy packages it imported.
PROBE = """
import sys
from {module} import {function} as main
try:
    main(["--help"])
except SystemExit:
    pass
print("HEAVY=" + ",".join(name for name in {heavy!r} if name in sys.modules), file=sys.stderr)
"""


def console_scripts(setup_py: str) -> List[Tuple[str, str, str]]:
    """(script, module, function) of every console script declared in ``setup_py``."""
    with open(setup_py, encoding="utf-8") as handle:
        return re.findall(r'"(melhubert-[\w-]+) = ([\w.]+):(\w+)"', handle.read())


def link_tools(root: str) -> str:
    """Make ``root/tools`` importable as ``melhubert_fairseq.tools`` from ``root`` (what setup.py's package_dir does)."""
    os.symlink(os.path.join(root, "tools"), os.path.join(root, "melhubert_fairseq", "tools"))
    return root


def unpack_revision(rev: str, into: str) -> str:
    """``git archive rev`` of this repository unpacked into ``into``, importable from there."""
    archive = subprocess.run(["git", "-C", REPO_ROOT, "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return link_tools(into)


def copy_this_tree(into: str) -> str:
    """The package and tools of this working tree (uncommitted changes included) copied into ``into``."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("melhubert_fairseq", "tools"):
        shutil.copytree(os.path.join(REPO_ROOT, name), os.path.join(into, name), ignore=ignore)
    return link_tools(into)


def tree_env(source_root: str) -> Dict[str, str]:
    """Environment that imports ``melhubert_fairseq`` from ``source_root`` (one thread)."""
    return {**os.environ, "PYTHONPATH": source_root, "OMP_NUM_THREADS": "1"}


def time_help(module: str, function: str, env: Dict[str, str], cwd: str) -> Tuple[float, str]:
    """Wall seconds of one ``--help`` in a fresh interpreter, and the heavy packages it imported."""
    code = PROBE.format(module=module, function=function, heavy=HEAVY)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if result.returncode != 0 or "usage:" not in result.stdout:
        raise RuntimeError(f"{module} --help failed:\n{result.stderr[-2000:]}")
    heavy = re.search(r"^HEAVY=(.*)$", result.stderr, re.M).group(1)
    return seconds, heavy or "-"


def import_costs(module: str, function: str, env: Dict[str, str], cwd: str, top: int) -> List[Tuple[str, float]]:
    """The ``top`` third-party packages with the largest cumulative ``-X importtime`` in one ``--help``
    (a package's time includes what it imported first, so nested packages overlap)."""
    code = PROBE.format(module=module, function=function, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", code], env=env, cwd=cwd,
                            capture_output=True, text=True, timeout=300)
    costs: Dict[str, float] = {}
    for line in result.stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+(\S+)$", line)
        name = match.group(2) if match else ""
        if name and "." not in name and name not in sys.stdlib_module_names and not name.startswith("_"):
            costs[name] = costs.get(name, 0.0) + int(match.group(1)) / 1e6
    return sorted(costs.items(), key=lambda item: -item[1])[:top]


def main(argv=None) -> int:
    """Run the comparison, print the table and write it to ``--results-dir``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-rev", default="4415444", help="git revision to compare against")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (each runs every tool in both trees)")
    parser.add_argument("--importtime-tool", default="melhubert-wav-to-fbank", help="tool whose -X importtime is listed")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where cli_startup_cpu.md is written")
    args = parser.parse_args(argv)

    scripts = console_scripts(os.path.join(REPO_ROOT, "setup.py"))
    with tempfile.TemporaryDirectory(prefix="cli_startup_") as scratch:
        cwd, ours_root, base_root = (os.path.join(scratch, name) for name in ("cwd", "ours", "base"))
        for folder in (cwd, ours_root, base_root):
            os.makedirs(folder)
        trees = {"this tree": tree_env(copy_this_tree(ours_root)),
                 args.baseline_rev: tree_env(unpack_revision(args.baseline_rev, base_root))}
        times: Dict[Tuple[str, str], List[float]] = {}
        heavy: Dict[Tuple[str, str], str] = {}
        for round_index in range(args.repeats + 1):  # round 0 writes the bytecode caches and is not counted
            for script, module, function in scripts:
                for tree, env in trees.items():
                    seconds, loaded = time_help(module, function, env, cwd)
                    if round_index:
                        times.setdefault((script, tree), []).append(seconds)
                    heavy[(script, tree)] = loaded
        module, function = next((m, f) for s, m, f in scripts if s == args.importtime_tool)
        costs = {tree: import_costs(module, function, env, cwd, top=6) for tree, env in trees.items()}

    base = args.baseline_rev
    lines = [
        f"`--help` wall time, median of {args.repeats} fresh interpreters per tool and tree "
        f"({os.cpu_count()} CPUs, Python {sys.version.split()[0]}; this tree vs {base}):",
        "",
        f"| tool | this tree (s) | {base} (s) | {base} / this tree | heavy imports, this tree | heavy imports, {base} |",
        "|---|---|---|---|---|---|",
    ]
    for script, _module, _function in scripts:
        ours, theirs = statistics.median(times[(script, "this tree")]), statistics.median(times[(script, base)])
        lines.append(
            f"| {script} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x | {heavy[(script, 'this tree')]} | "
            f"{heavy[(script, base)]} |"
        )
    lines += ["", f"`python -X importtime` of `{args.importtime_tool} --help`: the packages that cost most (cumulative s, "
              "nested packages counted in their importer too):", ""]
    for tree, top in costs.items():
        lines.append(f"* {tree}: " + ", ".join(f"{name} {seconds:.2f}" for name, seconds in top))
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.results_dir, exist_ok=True)
    with open(os.path.join(args.results_dir, "cli_startup_cpu.md"), "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
