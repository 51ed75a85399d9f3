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

The scenarios are a list of :class:`Scenario` objects (prepare once, set up
inputs per trial, the command, the folders holding inputs and outputs, the
file that makes the outputs readable); a new one (e.g. training) is one more
entry in :func:`scenarios`.
"""
from __future__ import annotations

import argparse
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

import numpy as np
from tqdm import tqdm

from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS

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


# --------------------------------------------------------------------------- scenario inputs
def write_audio(folder: Path, num_utts: int = 150, seed: int = 0) -> None:
    """``num_utts`` 16 kHz FLAC files (0.3-2 s of noisy chirps) in speaker folders."""
    import soundfile

    rng = np.random.default_rng(seed)
    for index in range(num_utts):
        samples = int(rng.uniform(0.3, 2.0) * 16000)
        t = np.arange(samples) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (150 + 400 * t) * t) + 0.05 * rng.standard_normal(samples)
        path = folder / f"spk{index % 4}" / f"utt{index:03d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), wave.astype(np.float32), 16000, subtype="PCM_16")


def write_fbank_corpus(folder: Path, num_utts: int = 300, seed: int = 0) -> None:
    """``feats/*.npy`` (frames, 40 mel bins) float32 and ``train.tsv`` rooted at ``feats``."""
    rng = np.random.default_rng(seed)
    (folder / "feats").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(num_utts):
        frames = int(rng.integers(100, 600))
        np.save(folder / "feats" / f"utt{index:03d}.npy", rng.standard_normal((frames, FBANK_NUM_MEL_BINS)).astype(np.float32))
        rows.append(f"utt{index:03d}.npy\t{frames}")
    (folder / "train.tsv").write_text(f"{folder / 'feats'}\n" + "\n".join(rows) + "\n")


def write_kaldi_dump(folder: Path, num_utts: int = 200, seed: int = 0) -> None:
    """A Kaldi fbank dump: ``raw.ark`` + ``train.scp`` (kaldiio) and its ``train.mean-var``."""
    import kaldiio

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    total, total_sq, count = np.zeros(FBANK_NUM_MEL_BINS), np.zeros(FBANK_NUM_MEL_BINS), 0
    with kaldiio.WriteHelper(f"ark,scp:{folder / 'raw.ark'},{folder / 'train.scp'}") as writer:
        for index in range(num_utts):
            feats = (rng.standard_normal((int(rng.integers(100, 500)), FBANK_NUM_MEL_BINS)) * 2 + 8).astype(np.float32)
            writer(f"utt{index:04d}", feats)
            total += feats.sum(0)
            total_sq += np.square(feats.astype(np.float64)).sum(0)
            count += len(feats)
    (folder / "train.mean-var").write_text(
        f"[{','.join(map(repr, total.tolist()))}]\n[{','.join(map(repr, total_sq.tolist()))}]\n{count}\n"
    )


def prepared_run(name: str, write_inputs: Callable[[Path], None], command: List[str]) -> Callable[[Path, Path], None]:
    """A prepare step: write inputs in the work folder, run ``command`` there, keep the folder as ``assets/name``.

    Run in the trials' own folder, so outputs that record absolute paths (manifest roots) are right
    when the folder is copied back for each trial by :func:`copy_prepared`.
    """

    def prepare(assets: Path, work: Path) -> None:
        write_inputs(fresh(work))
        result = run_to_end(command, work)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
        shutil.rmtree(assets / name, ignore_errors=True)
        shutil.copytree(work, assets / name, symlinks=True)

    return prepare


def copy_prepared(name: str) -> Callable[[Path, Path], None]:
    """A setup step: copy ``assets/name`` (inputs and the outputs of an earlier run) into the work folder."""

    def setup(work: Path, assets: Path) -> None:
        shutil.copytree(assets / name, work, symlinks=True, dirs_exist_ok=True)

    return setup


def prepare_kmeans(assets: Path, work: Path) -> None:
    """k-means centroids (K=64) fitted on the fbank corpus."""
    work = fresh(assets / "km_work")
    write_fbank_corpus(work)
    result = run_to_end(
        tool("learn-kmeans") + ["--manifest", "train.tsv", "--km-path", str(assets / "km.npy"),
                                "--num-clusters", "64", "--sample-frac", "1", "--no-progress"],
        work,
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])


TINY_MODEL = [
    "model.encoder_layers=2", "model.encoder_embed_dim=64", "model.encoder_ffn_embed_dim=128",
    "model.encoder_attention_heads=4", "model.conv_pos=16", "model.conv_pos_groups=4",
]


def prepare_checkpoint(assets: Path, work: Path, name: str = "ckpt", with_stats: bool = False) -> None:
    """A tiny mel_hubert checkpoint (2 updates with fairseq-hydra-train) in ``assets/name``, for extract-features;
    ``with_stats``: trained with a ``mean-std.npy``, so that it records fbank statistics (fine-tuning needs them)."""
    data = fresh(assets / f"{name}_data")
    write_fbank_corpus(data, num_utts=12)
    if with_stats:
        np.save(data / "mean-std.npy", np.stack([np.full(FBANK_NUM_MEL_BINS, 0.5), np.full(FBANK_NUM_MEL_BINS, 2.0)]).astype(np.float32))
    rng = np.random.default_rng(0)
    manifest = (data / "train.tsv").read_text().splitlines()
    (data / "train.km").write_text(
        "".join(" ".join(map(str, rng.integers(0, 32, int(row.split("\t")[1])))) + "\n" for row in manifest[1:])
    )
    (data / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(32)))
    command = [
        sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", "config", "--config-name", "stage1",
        "common.user_dir=melhubert_fairseq", f"task.data={data}", f"task.label_dir={data}", "task.num_classes=32",
        "optimization.max_update=2", "optimization.update_freq=[1]", "dataset.num_workers=0",
        "dataset.max_tokens=1200", "dataset.disable_validation=true", "common.tensorboard_logdir=null", f"checkpoint.save_dir={assets / name}",
        f"hydra.run.dir={assets / name / 'hydra'}", *TINY_MODEL,
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=tool_env(), timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"training the tiny checkpoint failed:\n{result.stderr[-3000:]}")


#: A small model with a wide feed-forward layer: cheap updates, ~12 MB checkpoints, so saving
#: (every update) is a large part of the run and many kills land inside a save.
SAVE_HEAVY_MODEL = [
    "model.encoder_layers=2", "model.encoder_embed_dim=64", "model.encoder_ffn_embed_dim=4096",
    "model.encoder_attention_heads=4", "model.conv_pos=16", "model.conv_pos_groups=4",
]
TRAINING_UPDATES = 30


def prepare_training_corpus(assets: Path, work: Path) -> None:
    """A synthetic fbank corpus with 32-class labels (10 utterances: 3 batches an epoch, 10 epochs of training)."""
    data = fresh(assets / "train_corpus")
    write_fbank_corpus(data, num_utts=10)
    rng = np.random.default_rng(1)
    rows = (data / "train.tsv").read_text().splitlines()[1:]
    (data / "train.km").write_text("".join(" ".join(map(str, rng.integers(0, 32, int(r.split("\t")[1])))) + "\n" for r in rows))
    (data / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(32)))


def training_command(work: Path) -> List[str]:
    """fairseq-hydra-train of the stage-1 recipe (save-heavy tiny model), saving every update, run from ``work``."""
    return [
        sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", str(REPO / "config"), "--config-name", "stage1",
        f"common.user_dir={REPO / 'melhubert_fairseq'}", f"task.data={work / 'data'}", f"task.label_dir={work / 'data'}",
        "task.num_classes=32", "task.max_sample_size=60", "task.min_sample_size=null",
        f"optimization.max_update={TRAINING_UPDATES}", "optimization.update_freq=[1]", "dataset.num_workers=2",
        "dataset.max_tokens=240", "dataset.disable_validation=true", "common.tensorboard_logdir=null",
        "checkpoint.save_interval_updates=1", "checkpoint.keep_interval_updates=2",
        f"checkpoint.save_dir={work / 'ckpt'}", f"hydra.run.dir={work / 'hydra'}", *SAVE_HEAVY_MODEL,
    ]


FINETUNING_UPDATES = 20


def prepare_finetuning(assets: Path, work: Path) -> None:
    """``finetune_corpus``: a tiny pretrained checkpoint with fbank statistics (``pretrained.pt``), and 4 train +
    2 valid utterances of the bundled corpus in fairseq's audio_finetuning layout (``data``: 2 batches an epoch)."""
    from melhubert_fairseq.finetuning import write_finetuning_data

    prepare_checkpoint(assets, work, name="pretrained", with_stats=True)
    corpus = REPO / "demo" / "corpus"
    folder = fresh(assets / "finetune_corpus")
    manifests = {}
    for split, count in (("train", 4), ("valid", 2)):
        rows = (corpus / f"{split}.tsv").read_text().splitlines()[1 : 1 + count]
        manifests[split] = str(folder / f"{split}_audio.tsv")
        Path(manifests[split]).write_text(f"{corpus}\n" + "\n".join(rows) + "\n")
    write_finetuning_data(manifests, str(corpus / "transcripts.tsv"), str(folder / "data"))
    shutil.copy(assets / "pretrained" / "checkpoint_last.pt", folder / "pretrained.pt")


def finetuning_command(work: Path, assets: Path) -> List[str]:
    """fairseq-hydra-train of config/finetune_demo.yaml (fairseq's wav2vec_ctc) from the tiny pretrained checkpoint,
    saving every update and validating every 2 epochs, run from ``work``."""
    return [
        sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", str(REPO / "config"), "--config-name", "finetune_demo",
        f"common.user_dir={REPO / 'melhubert_fairseq'}", f"task.data={work / 'inputs' / 'data'}",
        f"model.w2v_path={work / 'inputs' / 'pretrained.pt'}", f"optimization.max_update={FINETUNING_UPDATES}",
        "model.freeze_finetune_updates=2", "dataset.max_tokens=120000", "dataset.validate_interval=2",
        "common.log_interval=1", "checkpoint.save_interval_updates=1", "checkpoint.keep_interval_updates=2",
        f"checkpoint.save_dir={work / 'ckpt'}", f"hydra.run.dir={work / 'hydra'}",
    ]


def checkpoint_fingerprint(path: Path) -> str:
    """A checkpoint's update count and parameters (its bytes also hold wall-clock meters), or why it does not load."""
    if not path.name.endswith(".pt"):
        return sha256_of_file(path)
    import torch

    from melhubert_fairseq import register_with_fairseq
    from melhubert_fairseq.checkpoint_loading import checkpoint_load_problem, safe_torch_load

    register_with_fairseq()  # fairseq's checkpoint types (a fine-tuning checkpoint's Dictionary) allow-listed

    problem = checkpoint_load_problem(str(path))
    if problem is not None:
        return f"UNLOADABLE: {problem}"
    state = safe_torch_load(str(path))
    digest = hashlib.sha256()
    for name, tensor in sorted(state["model"].items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return f"update {state['optimizer_history'][-1]['num_updates']}: {digest.hexdigest()}"


def classify_training(trial: Trial, reference: Reference) -> str:
    """corrupt: a checkpoint that does not load right after the kill, a failed rerun, temporary files left
    behind, or final parameters that differ from the uninterrupted run's (bit for bit); else resumed (the
    rerun continued from a checkpoint the killed run saved) or clean (killed before its first save)."""
    unloadable = [path for path, value in trial.after_kill.items() if value.startswith("UNLOADABLE")]
    if unloadable:
        trial.reason = f"{unloadable[0]} left unloadable: {trial.after_kill[unloadable[0]]}"
        return "corrupt"
    if trial.rerun_returncode != 0:
        trial.reason = f"rerun failed ({trial.rerun_returncode}): {trial.rerun_stderr.strip().splitlines()[-1:]}"
        return "corrupt"
    if trial.leftovers:
        trial.reason = f"left after the rerun: {trial.leftovers[:3]}"
        return "corrupt"
    last = "ckpt/checkpoint_last.pt"
    if trial.after_rerun.get(last) != reference.after.get(last):
        trial.reason = "the resumed run ended with other parameters than the uninterrupted run"
        return "corrupt"
    if not trial.killed:
        return "finished"
    return "resumed" if last in trial.after_kill else "clean"


def scenarios() -> List[Scenario]:
    """Every scenario, in table order."""
    from melhubert_fairseq.checkpoint_resume import SAVE_DIR_LOCK  # imports torch: not before it is needed

    return [
        Scenario(
            name="training",
            prepare=prepare_training_corpus,
            setup=lambda work, assets: shutil.copytree(assets / "train_corpus", work / "data"),
            command=lambda work, assets: training_command(work),
            outputs=["ckpt"], inputs=["data"], classify=classify_training, fingerprint=checkpoint_fingerprint,
            not_writes=[SAVE_DIR_LOCK],
        ),
        Scenario(
            name="fine-tuning",
            prepare=prepare_finetuning,
            setup=lambda work, assets: shutil.copytree(assets / "finetune_corpus", work / "inputs"),
            command=finetuning_command,
            outputs=["ckpt"], inputs=["inputs"], classify=classify_training, fingerprint=checkpoint_fingerprint,
            not_writes=[SAVE_DIR_LOCK],
        ),
        Scenario(
            name="wav-to-fbank",
            setup=lambda work, assets: write_audio(work / "audio"),
            command=lambda work, assets: tool("wav-to-fbank") + ["--audio-dir", "audio", "--out-dir", "feats", "--workers", "2"],
            outputs=["feats"], inputs=["audio"], commit="feats/train.tsv",
        ),
        Scenario(
            name="wav-to-fbank --overwrite",
            # The old outputs are raw log-Mel features; the run replaces them by normalised ones.
            prepare=prepared_run(
                "wav_old", lambda work: write_audio(work / "audio"),
                tool("wav-to-fbank") + ["--audio-dir", "audio", "--out-dir", "feats", "--no-normalize"],
            ),
            setup=copy_prepared("wav_old"),
            command=lambda work, assets: tool("wav-to-fbank")
            + ["--audio-dir", "audio", "--out-dir", "feats", "--workers", "2", "--overwrite"],
            outputs=["feats"], inputs=["audio"], commit="feats/train.tsv",
        ),
        Scenario(
            name="import-kaldi-features",
            setup=lambda work, assets: write_kaldi_dump(work / "dump"),
            command=lambda work, assets: tool("import-kaldi-features")
            + ["--scp", "dump/train.scp", "--mean-var", "dump/train.mean-var", "--out-dir", "data"],
            outputs=["data"], inputs=["dump"], commit="data/train.tsv",
        ),
        Scenario(
            name="import-kaldi-features --overwrite",
            prepare=prepared_run(
                "kaldi_old", lambda work: write_kaldi_dump(work / "dump"),
                tool("import-kaldi-features")
                + ["--scp", "dump/train.scp", "--mean-var", "dump/train.mean-var", "--out-dir", "data", "--no-normalize"],
            ),
            setup=copy_prepared("kaldi_old"),
            command=lambda work, assets: tool("import-kaldi-features")
            + ["--scp", "dump/train.scp", "--mean-var", "dump/train.mean-var", "--out-dir", "data", "--overwrite"],
            outputs=["data"], inputs=["dump"], commit="data/train.tsv",
        ),
        Scenario(
            name="dump-km-labels",
            prepare=prepare_kmeans,
            setup=lambda work, assets: write_fbank_corpus(work / "data"),
            command=lambda work, assets: tool("dump-km-labels")
            + ["--manifest", "data/train.tsv", "--km-path", str(assets / "km.npy"), "--out-dir", "labels", "--no-progress"],
            outputs=["labels"], inputs=["data"], commit="labels/train.km",
        ),
        Scenario(
            name="extract-features",
            prepare=prepare_checkpoint,
            setup=lambda work, assets: write_fbank_corpus(work / "data", num_utts=120),
            command=lambda work, assets: tool("extract-features")
            + ["--checkpoint", str(assets / "ckpt" / "checkpoint_last.pt"), "--manifest", "data/train.tsv",
               "--out-dir", "hidden", "--layers", "all", "--no-progress"],
            outputs=["hidden"], inputs=["data"],
        ),
    ]


# --------------------------------------------------------------------------- report
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
