"""One training run per checkpoint.save_dir: a second is refused, a killed one never blocks its rerun."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO_ROOT, hydra_train_command, make_fbank_corpus, run_hydra_train
from melhubert_fairseq import checkpoint_resume
from melhubert_fairseq.checkpoint_loading import checkpoint_load_problem, checkpoint_num_updates
from melhubert_fairseq.checkpoint_resume import SAVE_DIR_LOCK


def wait_for(condition, what: str, timeout: float = 300.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def saved_update(save_dir: Path) -> int:
    """The update of ``save_dir``'s checkpoint_last.pt (-1 while there is none that loads)."""
    last = save_dir / "checkpoint_last.pt"
    return checkpoint_num_updates(str(last)) if last.exists() and checkpoint_load_problem(str(last)) is None else -1


@pytest.mark.slow  # two fairseq-hydra-train runs
def test_a_second_training_into_a_busy_save_dir_is_refused_and_a_killed_run_never_blocks(tmp_path):
    data = make_fbank_corpus(tmp_path / "data", num_utts=10)
    save_dir = tmp_path / "run"
    lock = save_dir / SAVE_DIR_LOCK
    saving = ["task.max_sample_size=60", "task.min_sample_size=null", "checkpoint.save_interval_updates=1",
              "checkpoint.keep_interval_updates=1"]
    with open(tmp_path / "first.log", "w") as first_log:
        first = subprocess.Popen(
            hydra_train_command(data, save_dir, max_update=100000, max_tokens=240, overrides=saving),
            cwd=REPO_ROOT, stdout=first_log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        wait_for(lambda: lock.exists() and f"pid {first.pid} " in lock.read_text(), "the first run's lock")
        second = run_hydra_train(data, save_dir, check=False, max_update=3)
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert errors == [second.stderr.strip().splitlines()[-1]], second.stderr[-2000:]
        assert errors[0].startswith(f"error: {save_dir}: another training run is writing checkpoints here "
                                    f"(pid {first.pid} on {socket.gethostname()}, started 20"), errors
        # The first run goes on training and saving.
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
        wait_for(lambda: saved_update(save_dir) >= 0, "a checkpoint of the first run")
        at_refusal = saved_update(save_dir)
        wait_for(lambda: saved_update(save_dir) > at_refusal, "the first run to save again")
    finally:
        first.kill()  # SIGKILL: the lock file stays behind, its flock dies with the process
        first.wait()
    assert lock.exists()
    killed_at = saved_update(save_dir)
    rerun = run_hydra_train(data, save_dir, max_update=killed_at + 1, max_tokens=240, overrides=saving)
    assert f"@ {killed_at} updates" in rerun.stdout + rerun.stderr  # resumed the killed run
    assert not lock.exists(), "a run that ends removes its lock file"


def test_the_lock_is_the_process_s_own_across_a_multirun_and_saves_go_on_without_flock(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    try:
        checkpoint_resume.lock_save_dir(str(first))
        checkpoint_resume.lock_save_dir(str(first))  # the same process again: not refused by its own lock
        assert (first / SAVE_DIR_LOCK).read_text().startswith(f"pid {os.getpid()} on {socket.gethostname()}, started ")
        other_process = subprocess.run(
            [sys.executable, "-c", f"from melhubert_fairseq.checkpoint_resume import lock_save_dir; lock_save_dir({str(first)!r})"],
            capture_output=True, text=True, timeout=300,
        )
        assert other_process.returncode != 0 and f"another training run is writing checkpoints here (pid {os.getpid()} " in other_process.stderr
        checkpoint_resume.lock_save_dir(str(second))  # the next job of a hydra multirun releases the first folder
        assert not (first / SAVE_DIR_LOCK).exists() and (second / SAVE_DIR_LOCK).exists()
    finally:
        checkpoint_resume.release_save_dir_locks()
    assert not (second / SAVE_DIR_LOCK).exists()

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)  # Lustre without flock, some FUSE/SMB mounts
    try:
        checkpoint_resume.lock_save_dir(str(first))  # cannot detect a second run there, but never stops this one
    finally:
        checkpoint_resume.release_save_dir_locks()
