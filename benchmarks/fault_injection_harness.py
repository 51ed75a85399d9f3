"""The kill-and-check harness of fault_injection.py: run a scenario uninterrupted, then SIGKILL it and rerun.

A :class:`Scenario` says how to prepare and set up its inputs, the command, and which folders hold
inputs and outputs; :func:`reference_run` records the uninterrupted run, :func:`run_trial` kills one
run at a random moment and reruns it, :func:`classify` names the outcome (fault_injection.py's docstring
defines them).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUTCOMES = ("clean", "repaired", "resumed", "finished", "corrupt")
#: Output entries that are never results: staging folders, locks, temporary files.
HIDDEN_PREFIX = "."

Snapshot = Dict[str, str]  # relative path -> sha256 of the content


# --------------------------------------------------------------------------- scenario description
def sha256_of_file(path: Path) -> str:
    """The sha256 of a file's bytes (what "the same output" means for most tools)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclasses.dataclass
class Scenario:
    """One tool run to kill: inputs, command, and where its outputs appear."""

    name: str
    #: Build the trial's inputs (and, for --overwrite, an earlier run's outputs) in an empty folder.
    setup: Callable[[Path, Path], None]  # (work folder, assets folder from prepare)
    #: The command line, run with the work folder as working directory.
    command: Callable[[Path, Path], List[str]]
    #: Folders (relative to the work folder) whose files are the outputs.
    outputs: Sequence[str]
    #: Folders or files (relative to the work folder) that are inputs and must never change.
    inputs: Sequence[str]
    #: Output file (relative to the work folder) whose presence makes the outputs readable, if any.
    commit: Optional[str] = None
    #: Build expensive shared inputs once (e.g. a trained checkpoint) into the assets folder;
    #: the work folder (where every trial runs) is free to use meanwhile.
    prepare: Callable[[Path, Path], None] = lambda assets, work: None
    #: Optional override: classify a trial from its record and the uninterrupted run's
    #: (return None for the default rules).
    classify: Optional[Callable[["Trial", "Reference"], Optional[str]]] = None
    #: What makes two output files "the same" (default: their bytes).
    fingerprint: Callable[[Path], str] = sha256_of_file
    #: Names in the output folders that are no output (a lock taken at startup): they do not start the kill window.
    not_writes: Sequence[str] = ()


@dataclasses.dataclass
class Trial:
    """What one kill-and-rerun produced."""

    kill_at: float
    killed: bool  # False: the run had exited before the kill
    after_kill: Snapshot
    rerun_returncode: int
    rerun_stderr: str
    after_rerun: Snapshot
    leftovers: List[str]
    inputs_changed: bool
    outcome: str = ""
    reason: str = ""


# --------------------------------------------------------------------------- generic helpers
def tool(name: str) -> List[str]:
    """Command prefix of console script ``melhubert-<name>`` (``python -m`` if it is not installed)."""
    script = BIN / f"melhubert-{name}"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", f"melhubert_fairseq.tools.{name.replace('-', '_')}"]


def snapshot(
    work: Path, folders: Sequence[str], hidden: bool = False, fingerprint: Callable[[Path], str] = sha256_of_file
) -> Snapshot:
    """``fingerprint`` of every file below ``folders`` (hidden entries and their contents left out unless ``hidden``)."""
    result: Snapshot = {}
    for folder in folders:
        base = work / folder
        if base.is_file():
            result[folder] = fingerprint(base)
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            if not hidden:
                dirnames[:] = [d for d in dirnames if not d.startswith(HIDDEN_PREFIX)]
            for name in filenames:
                if name.startswith(HIDDEN_PREFIX) and not hidden:
                    continue
                path = Path(dirpath) / name
                result[str(path.relative_to(work))] = fingerprint(path)
    return result


def listing(work: Path, folders: Sequence[str], ignore: Sequence[str] = ()) -> frozenset:
    """Names and sizes of everything below ``folders``, hidden entries included, except names in ``ignore``
    (cheap to poll)."""
    found = set()
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(work / folder):
            for name in dirnames + filenames:
                if name in ignore:
                    continue
                path = os.path.join(dirpath, name)
                with contextlib.suppress(OSError):
                    found.add((path, os.lstat(path).st_size))
    return frozenset(found)


def hidden_entries(work: Path, folders: Sequence[str]) -> List[str]:
    """Hidden files and folders (staging, locks, temporary files) left anywhere below ``folders``."""
    found = []
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(work / folder):
            for name in dirnames + filenames:
                if name.startswith(HIDDEN_PREFIX):
                    found.append(str((Path(dirpath) / name).relative_to(work)))
    return found


def tool_env() -> Dict[str, str]:
    """Environment of every tool run: one BLAS thread (the kill timing should not depend on load)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def run_to_end(command: List[str], work: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``command`` in ``work`` to completion."""
    return subprocess.run(command, cwd=work, capture_output=True, text=True, env=tool_env(), timeout=timeout)


def fresh(work: Path) -> Path:
    """An empty ``work`` folder (removed and recreated)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


@dataclasses.dataclass
class Reference:
    """The uninterrupted run: outputs before and after, its duration, when it first and last wrote."""

    before: Snapshot
    after: Snapshot
    seconds: float
    first_write: float
    last_write: float

    @property
    def working_seconds(self) -> float:
        """From the first to the last change in the output folders."""
        return max(self.last_write - self.first_write, 0.05)


def reference_run(scenario: Scenario, work: Path, assets: Path, repeats: int = 2) -> Reference:
    """Run the scenario uninterrupted ``repeats`` times, polling for its first write into the outputs.

    The outputs must come out identical every time (else no trial could be compared);
    the fastest run's timings place the kills, so that few land after a trial's end.
    """
    runs = []
    for _ in range(repeats):
        scenario.setup(fresh(work), assets)
        before = snapshot(work, scenario.outputs, fingerprint=scenario.fingerprint)
        seen = listing(work, scenario.outputs, scenario.not_writes)
        command = scenario.command(work, assets)
        with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty tool never blocks on it
            start = time.perf_counter()
            process = subprocess.Popen(command, cwd=work, env=tool_env(), stdout=subprocess.DEVNULL, stderr=log)
            first_write = last_write = None
            while process.poll() is None:
                now = listing(work, scenario.outputs, scenario.not_writes)
                if now != seen:
                    last_write = time.perf_counter() - start
                    first_write = last_write if first_write is None else first_write
                    seen = now
                time.sleep(0.01)
            seconds = time.perf_counter() - start
            log.seek(0)
            stderr = log.read()
        if process.returncode != 0:
            raise RuntimeError(f"{scenario.name}: the uninterrupted run failed ({' '.join(command)}):\n{stderr[-3000:]}")
        first_write = seconds if first_write is None else first_write
        after = snapshot(work, scenario.outputs, fingerprint=scenario.fingerprint)
        runs.append(Reference(before, after, seconds, first_write, last_write or seconds))
    if any(run.after != runs[0].after for run in runs):
        raise RuntimeError(f"{scenario.name}: two uninterrupted runs wrote different outputs; trials cannot be compared")
    return max(runs, key=lambda run: run.working_seconds)  # the slower run spans the work of a slow trial


def consistent_after_kill(state: Snapshot, reference: Reference, commit: Optional[str]) -> Optional[str]:
    """Why the outputs a kill left are unsafe to read (None: they are safe).

    Every visible file must be a complete old or new output; with a commit file
    (manifest) visible, the outputs must be exactly the old or the new set;
    without one, they must not mix old and new files.
    """
    old, new = reference.before, reference.after
    for path, digest in state.items():
        if digest not in (old.get(path), new.get(path)):
            return f"{path} is neither the old nor the new output (half-written or mixed)"
    if commit is not None and commit in state:
        if state not in (old, new):
            return f"{commit} is readable over outputs that are neither the old nor the new set"
        return None
    changed = {path for path, digest in state.items() if old.get(path) != digest}
    unchanged_old = {path for path, digest in state.items() if old.get(path) == digest and new.get(path) != digest}
    if changed and unchanged_old:
        return f"old and new outputs mixed ({sorted(unchanged_old)[0]} old, {sorted(changed)[0]} new)"
    return None


def classify(trial: Trial, reference: Reference, scenario: Scenario) -> None:
    """Fill in ``trial.outcome`` and ``trial.reason`` (see the module docstring)."""
    if scenario.classify is not None:
        outcome = scenario.classify(trial, reference)
        if outcome is not None:
            trial.outcome = outcome
            return
    unsafe = consistent_after_kill(trial.after_kill, reference, scenario.commit)
    if trial.inputs_changed:
        trial.outcome, trial.reason = "corrupt", "inputs modified"
    elif unsafe:
        trial.outcome, trial.reason = "corrupt", unsafe
    elif trial.leftovers:
        trial.outcome, trial.reason = "corrupt", f"left after the rerun: {trial.leftovers[:3]}"
    elif trial.after_rerun != reference.after:
        trial.outcome, trial.reason = "corrupt", "outputs after the rerun differ from the uninterrupted run's"
    elif trial.rerun_returncode != 0:
        refused = trial.rerun_returncode == 2 and "already exists" in trial.rerun_stderr
        if refused and trial.after_kill == reference.after:
            trial.outcome = "finished"
        else:
            trial.outcome = "corrupt"
            trial.reason = f"rerun failed ({trial.rerun_returncode}): {trial.rerun_stderr.strip().splitlines()[-1:]}"
    elif "note: " in trial.rerun_stderr:
        trial.outcome = "repaired"
    else:
        trial.outcome = "clean"


def run_trial(scenario: Scenario, work: Path, assets: Path, reference: Reference, rng: random.Random) -> Trial:
    """Set up, start, SIGKILL at a random moment of its working time, inspect, rerun, compare.

    The kill comes a random delay (up to 1.1x the reference run's working time, from its
    first to its last change in the output folders) after this run's own first write: before that a tool is only
    importing and reading its inputs, which a kill cannot harm, and how long that takes
    varies with the machine's load far more than the work itself.
    """
    scenario.setup(fresh(work), assets)
    inputs_before = snapshot(work, scenario.inputs, hidden=True)
    outputs_before = listing(work, scenario.outputs, scenario.not_writes)
    command = scenario.command(work, assets)
    delay = rng.uniform(0.0, 1.1 * reference.working_seconds)
    process = subprocess.Popen(
        command, cwd=work, env=tool_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # the tool and its worker processes, as a cluster pre-emption kills them
    )
    start = time.perf_counter()
    while process.poll() is None and listing(work, scenario.outputs, scenario.not_writes) == outputs_before:
        time.sleep(0.005)
    deadline = time.perf_counter() + delay
    while process.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.005)
    killed = process.poll() is None
    kill_at = time.perf_counter() - start
    if killed:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    after_kill = snapshot(work, scenario.outputs, fingerprint=scenario.fingerprint)
    rerun = run_to_end(command, work)
    return Trial(
        kill_at=kill_at,
        killed=killed,
        after_kill=after_kill,
        rerun_returncode=rerun.returncode,
        rerun_stderr=rerun.stderr,
        after_rerun=snapshot(work, scenario.outputs, fingerprint=scenario.fingerprint),
        leftovers=hidden_entries(work, scenario.outputs),
        inputs_changed=snapshot(work, scenario.inputs, hidden=True) != inputs_before,
    )
