"""The scenarios of fault_injection.py: training, fine-tuning and each data tool, with the inputs they run on.

A new scenario is one more entry in :func:`scenarios`.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

import numpy as np

from fault_injection_harness import REPO, Reference, Scenario, Trial, fresh, run_to_end, sha256_of_file, tool, tool_env
from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS, MEAN_STD_NAME
from melhubert_fairseq.data.labels import KM_DICTIONARY_NAME


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
        np.save(data / MEAN_STD_NAME, np.stack([np.full(FBANK_NUM_MEL_BINS, 0.5), np.full(FBANK_NUM_MEL_BINS, 2.0)]).astype(np.float32))
    rng = np.random.default_rng(0)
    manifest = (data / "train.tsv").read_text().splitlines()
    (data / "train.km").write_text(
        "".join(" ".join(map(str, rng.integers(0, 32, int(row.split("\t")[1])))) + "\n" for row in manifest[1:])
    )
    (data / KM_DICTIONARY_NAME).write_text("".join(f"{k} 1\n" for k in range(32)))
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
    (data / KM_DICTIONARY_NAME).write_text("".join(f"{k} 1\n" for k in range(32)))


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
