"""A training run that can be stopped anywhere: fresh crops every epoch, exact resume across epochs."""
from __future__ import annotations

import os
import random
import re
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

from helpers import (
    REPO_ROOT,
    assert_bit_identical,
    hydra_train_command,
    make_fbank_corpus,
    run_and_kill_during_save,
    run_hydra_train,
    write_indexed_corpus,
)
from melhubert_fairseq.checkpoint_loading import checkpoint_load_problem, safe_torch_load
from melhubert_fairseq.tasks.mel_hubert_pretraining import MelHubertPretrainingTask
from melhubert_fairseq.tasks.pretraining_config import MelHubertPretrainingConfig


def stop_workers(epoch_batch_itr) -> None:
    """Stop the persistent DataLoader workers behind a fairseq EpochBatchIterator now, as torch's exit hook does.

    fairseq reuses one DataLoader with persistent workers for every epoch. Left to the garbage collector,
    the loader's iterator sits in a reference cycle whose queue finalizers may run before its own
    ``__del__``: the stop signal then never reaches the workers, and each waits out torch's 5 s status
    check before exiting (10 s per loader of 2 workers, half a minute over this file).
    """
    loader_itr = getattr(epoch_batch_itr.dataloader, "_iterator", None)
    if isinstance(loader_itr, _MultiProcessingDataLoaderIter):
        loader_itr._shutdown_workers()


def crop_starts_per_epoch(data: Path, num_workers: int, epochs: int = 3, resume_epoch: int = 1):
    """{(epoch, utterance): first 10 ms frame of its crop}, iterating as fairseq's trainer does.

    The trainer asks the task for the train iterator at every epoch (it gets the cached one back)
    and calls ``next_epoch_itr``; a run resumed in epoch k creates the iterator at epoch k.
    """
    cfg = MelHubertPretrainingConfig(data=str(data), label_dir=str(data), num_classes=1000, seed=3, max_sample_size=50)
    task = MelHubertPretrainingTask(cfg)
    task.load_dataset("train")
    dataset = task.datasets["train"]
    starts, batches = {}, {}
    for epoch in range(resume_epoch, epochs + 1):
        itr = task.get_batch_iterator(
            dataset, max_tokens=200, seed=3, epoch=epoch, num_workers=num_workers, required_batch_size_multiple=1
        )
        for batch in itr.next_epoch_itr(shuffle=True):
            ids = batch["id"].tolist()
            batches.setdefault(epoch, []).append(ids)
            for row, utt in enumerate(ids):
                # Feature value = 10 ms frame index, so the first value of the crop is its start.
                starts[(epoch, utt)] = int(batch["net_input"]["source"][row, 0, 0])
    stop_workers(itr)  # the task hands the same iterator back every epoch
    return starts, batches


def test_crops_change_every_epoch_whatever_num_workers(tmp_path):
    # Equal lengths in pairs: batch composition then depends on the seeded tie-breaking.
    data = write_indexed_corpus(tmp_path, [400, 400, 420, 420, 440, 440, 460, 460, 480, 480, 500, 500])
    in_process, batches_in_process = crop_starts_per_epoch(data, num_workers=0)
    in_workers, batches_in_workers = crop_starts_per_epoch(data, num_workers=2)
    assert len(in_workers) == 3 * 12
    # Persistent DataLoader workers draw exactly the crops the main process draws ...
    assert in_workers == in_process and batches_in_workers == batches_in_process
    # ... and they change from epoch to epoch for the same utterance.
    for later in (2, 3):
        changed = sum(in_workers[(1, u)] != in_workers[(later, u)] for u in range(12))
        assert changed >= 10, f"only {changed} of 12 crops moved between epoch 1 and {later}"


def test_a_valid_split_scores_the_same_crops_at_every_validation(tmp_path):
    data = write_indexed_corpus(tmp_path, [400, 420, 440, 460, 480, 500])
    (tmp_path / "valid.tsv").write_text((tmp_path / "train.tsv").read_text())
    (tmp_path / "valid.km").write_text((tmp_path / "train.km").read_text())
    cfg = MelHubertPretrainingConfig(data=str(data), label_dir=str(data), num_classes=1000, seed=3, max_sample_size=50)
    task = MelHubertPretrainingTask(cfg)
    task.load_dataset("valid")
    seen = []
    for _validation in range(3):  # as fairseq's trainer.get_valid_iterator, with its fixed epoch=1
        itr = task.get_batch_iterator(task.datasets["valid"], max_tokens=200, seed=3, epoch=1, num_workers=2)
        batches = list(itr.next_epoch_itr(shuffle=False, set_dataset_epoch=False))
        seen.append(sorted((int(i), int(b["net_input"]["source"][r, 0, 0])) for b in batches for r, i in enumerate(b["id"])))
    stop_workers(itr)  # the task hands the same iterator back at every validation
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 6


def test_update_ordered_indices_seed_is_refused(tmp_path):
    data = write_indexed_corpus(tmp_path, [400, 420])
    task = MelHubertPretrainingTask(MelHubertPretrainingConfig(data=str(data), label_dir=str(data), num_classes=1000, seed=3))
    task.load_dataset("train")
    with pytest.raises(ValueError, match="update_ordered_indices_seed"):
        task.get_batch_iterator(task.datasets["train"], max_tokens=200, seed=3 + 2, epoch=2)


def test_batches_do_not_depend_on_the_epoch_the_iterator_was_created_in(tmp_path):
    data = write_indexed_corpus(tmp_path, [400, 400, 420, 420, 440, 440, 460, 460, 480, 480, 500, 500])
    starts, batches = crop_starts_per_epoch(data, num_workers=2, epochs=3)
    resumed_starts, resumed_batches = crop_starts_per_epoch(data, num_workers=2, epochs=3, resume_epoch=3)
    assert resumed_batches[3] == batches[3]
    assert {k: v for k, v in starts.items() if k[0] == 3} == resumed_starts
    assert batches[2] != batches[3]  # composition is rebuilt every epoch


# --- end to end through fairseq-hydra-train ------------------------------------------------------

#: 10 utterances of 90-200 model frames, cropped to 60: max_tokens 240 makes batches of 4, 4 and 2,
#: so an epoch is 3 batches and 12 updates are 4 epochs.
RESUME_OVERRIDES = ["task.max_sample_size=60", "task.min_sample_size=null"]
BATCHES_PER_EPOCH = 3


def train(data, save_dir, max_update, num_workers, update_freq=1, save_interval_updates=0):
    """One fairseq-hydra-train run on the RESUME corpus layout (saving every N updates if given)."""
    return run_hydra_train(
        data,
        save_dir,
        max_update=max_update,
        num_workers=num_workers,
        update_freq=update_freq,
        max_tokens=240,
        overrides=[
            *RESUME_OVERRIDES,
            f"checkpoint.save_interval_updates={save_interval_updates}",
            "checkpoint.keep_interval_updates=-1",
        ],
    )


def run_in_parallel(*jobs):
    """Run independent training commands two at a time (the runs use one thread each)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return [future.result() for future in [pool.submit(train, *job) for job in jobs]]


@pytest.mark.slow  # trains with fairseq-hydra-train
@pytest.mark.parametrize("update_freq", [1, 2])
def test_resume_anywhere_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, update_freq):
    data = make_fbank_corpus(tmp_path / "data", num_utts=10)
    total = 4 * BATCHES_PER_EPOCH if update_freq == 1 else 6  # 4 epochs either way (the last group of an epoch is short)
    # Stop points: the first epoch boundary, inside epoch 2, inside epoch 3 (several epochs in).
    stops = [3, 5, 8] if update_freq == 1 else [2, 3, 5]
    straight = tmp_path / "straight"
    runs = {stop: (tmp_path / f"stop{stop}", 0 if i % 2 == 0 else 2) for i, stop in enumerate(stops)}
    first = run_in_parallel(
        (data, straight, total, 2, update_freq),
        *[(data, run_dir, stop, workers, update_freq) for stop, (run_dir, workers) in runs.items()],
    )
    epochs = [int(e) for e in re.findall(r"end of epoch (\d+)", first[0].stdout + first[0].stderr)]
    assert epochs[:3] == [1, 2, 3], "the corpus must span several epochs"
    # Resume each with the other num_workers value, to the uninterrupted run's end.
    run_in_parallel(*[(data, run_dir, total, 2 - workers, update_freq) for run_dir, workers in runs.values()])
    for stop, (run_dir, _workers) in runs.items():
        assert_bit_identical(straight, run_dir, f"stopped at update {stop}, update_freq {update_freq}")


# --- checkpoints that survive a crash -------------------------------------------------------------


@pytest.mark.slow  # trains with fairseq-hydra-train
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_unreadable_checkpoint_last_resumes_from_the_newest_good_checkpoint(tmp_path, damage):
    data = make_fbank_corpus(tmp_path / "data", num_utts=10)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    # broken saves at updates 2 and 4 (checkpoint_1_2.pt, checkpoint_2_4.pt) and 5 (checkpoint_last.pt only).
    run_in_parallel((data, straight, 7, 0), (data, broken, 5, 0, 1, 2))
    last = broken / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2] if damage == "truncated" else b"")
    (broken / ".checkpoint_last.pt.abc123.tmp").write_bytes(b"partial")  # what a killed save leaves
    resumed = train(data, broken, 7, 0, 1, 2)
    log = resumed.stdout + resumed.stderr
    assert "checkpoint_last.pt cannot be loaded" in log and "checkpoint_2_4.pt (update 4)" in log
    assert "removed 1 temporary file" in log and not (broken / ".checkpoint_last.pt.abc123.tmp").exists()
    assert [int(n) for n in re.findall(r'"num_updates": "(\d+)"', log)] == [5, 6, 7]
    # Resumed from update 4, the run repeats updates 5-7 exactly as the uninterrupted run did.
    assert_bit_identical(straight, broken, f"resumed past a {damage} checkpoint_last.pt")


@pytest.mark.slow  # trains with fairseq-hydra-train
def test_rerunning_a_finished_run_says_so_and_changes_nothing(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_utts=10)
    save_dir = tmp_path / "run"
    train(data, save_dir, 4, 0)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in save_dir.glob("*.pt")}
    again = train(data, save_dir, 4, 0)
    log = again.stdout + again.stderr
    assert "training already finished" in log and "max_update=4" in log
    assert '"num_updates": "5"' not in log
    assert "done training in" in log  # fairseq's main ended normally (a hydra multirun goes on)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in save_dir.glob("*.pt")} == before


@pytest.mark.slow  # trains with fairseq-hydra-train
def test_killing_training_during_checkpoint_saves_never_breaks_resume(tmp_path):
    """SIGKILL while fairseq writes or copies a checkpoint, again and again: rerunning the same
    command always resumes, and the run ends bit for bit where an uninterrupted one ends."""
    data = make_fbank_corpus(tmp_path / "data", num_utts=10)
    total = 30  # more than 8 killed runs can reach (each is killed within its first 3 saves, one per update)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    command = training_command(data, killed, total, save_interval_updates=1)
    rng = random.Random(0)
    outcomes = []
    straight_run = threading.Thread(target=subprocess.run, args=(training_command(data, straight, total, 1),),
                                    kwargs=dict(cwd=REPO_ROOT, capture_output=True, check=True,
                                                env={**os.environ, "OMP_NUM_THREADS": "1"}))
    straight_run.start()
    for _attempt in range(8):
        # Kill at a random moment of the first, second or third save of this run: inside the write of
        # checkpoint_E_U.pt, its copy onto checkpoint_last.pt, a rename, or the clean-up after.
        outcomes.append(run_and_kill_during_save(command, nth_save=rng.randint(1, 3), delay=rng.uniform(0, 0.08)))
        last = killed / "checkpoint_last.pt"
        assert not last.exists() or checkpoint_load_problem(str(last)) is None, "a kill left checkpoint_last.pt unloadable"
    assert sum(outcomes) >= 4, f"only {sum(outcomes)} of {len(outcomes)} kills landed while saving"
    resumed_at = safe_torch_load(str(killed / "checkpoint_last.pt"))["optimizer_history"][-1]["num_updates"]
    assert 0 < resumed_at < total
    final = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert not [p.name for p in killed.iterdir() if p.name.endswith(".tmp")]
    straight_run.join()
    assert_bit_identical(straight, killed, "killed during saves and rerun")
    assert "Loaded checkpoint" in final.stdout + final.stderr


#: A small model with a wide feed-forward layer: cheap steps, 12 MB checkpoints (saving dominates a run).
SAVE_HEAVY_MODEL = [
    "model.encoder_layers=2",
    "model.encoder_embed_dim=64",
    "model.encoder_ffn_embed_dim=4096",
    "model.encoder_attention_heads=4",
    "model.conv_pos=16",
    "model.conv_pos_groups=4",
]


def training_command(data: Path, save_dir: Path, max_update: int, save_interval_updates: int):
    """fairseq-hydra-train of the save-heavy model, saving every ``save_interval_updates``."""
    return hydra_train_command(
        data, save_dir, max_update=max_update, max_tokens=240, tiny=False,
        overrides=[*RESUME_OVERRIDES, *SAVE_HEAVY_MODEL, f"checkpoint.save_interval_updates={save_interval_updates}",
                   "checkpoint.keep_interval_updates=2"],
    )


def test_the_training_split_is_shuffled_whatever_its_name(tmp_path):
    # dataset.train_subset=ls960: fairseq's trainer loads that split; it must get fresh crops every
    # epoch like "train", while another split keeps its crops.
    data = write_indexed_corpus(tmp_path, [400, 420, 440, 460, 480, 500])
    for split in ("ls960", "dev"):
        (tmp_path / f"{split}.tsv").write_text((tmp_path / "train.tsv").read_text())
        (tmp_path / f"{split}.km").write_text((tmp_path / "train.km").read_text())
    cfg = MelHubertPretrainingConfig(data=str(data), label_dir=str(data), num_classes=1000, seed=3, max_sample_size=50, train_subset="ls960")
    task = MelHubertPretrainingTask(cfg)

    def crops(split, epoch):
        task.load_dataset(split)
        itr = task.get_batch_iterator(task.datasets[split], max_tokens=200, seed=3, epoch=epoch)
        batches = itr.next_epoch_itr(shuffle=task.datasets[split].shuffle)
        return sorted((int(i), int(b["net_input"]["source"][r, 0, 0])) for b in batches for r, i in enumerate(b["id"]))

    assert sum(a != b for a, b in zip(crops("ls960", 1), crops("ls960", 2))) >= 5
    task.load_dataset("dev")
    assert task.datasets["ls960"].shuffle and not task.datasets["dev"].shuffle


def test_fairseq_validate_can_score_the_training_split(tmp_path):
    # fairseq-validate passes its own --seed (default 1), not the checkpoint's common.seed.
    data = write_indexed_corpus(tmp_path, [400, 420])
    task = MelHubertPretrainingTask(MelHubertPretrainingConfig(data=str(data), label_dir=str(data), num_classes=1000, seed=1337))
    task.load_dataset("train")
    itr = task.get_batch_iterator(task.datasets["train"], max_tokens=1000, seed=1, epoch=1)
    assert sum(len(b["id"]) for b in itr.next_epoch_itr(shuffle=False)) == 2
