"""Staged outputs: a kill at any step of a publish leaves the old or the new outputs, and the next run recovers."""
from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

from melhubert_fairseq.atomic_output import atomic_output, remove_stale_temp_files
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.staged_outputs import StagedOutputs

OLD = {"a.npy": "old a", "sub/b.npy": "old b", "mean-std.npy": "old stats", "train.tsv": "old manifest"}
NEW = {"a.npy": "new a", "sub/b.npy": "new b", "sub/c.npy": "new c", "mean-std.npy": "new stats", "train.tsv": "new manifest"}
PUBLISH_ORDER = ["a.npy", "sub/b.npy", "sub/c.npy", "mean-std.npy", "train.tsv"]


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, and the run's cleanup never runs."""


def visible(out: Path) -> Dict[str, str]:
    """Every non-hidden file below ``out`` with its text."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(out):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                path = Path(dirpath) / name
                found[str(path.relative_to(out))] = path.read_text()
    return found


def hidden(out: Path):
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*"))


def write_files(out: Path, files: Dict[str, str]) -> None:
    for rel, text in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)


def publish_killed_after(out: Path, renames: int, overwrite: bool, monkeypatch) -> bool:
    """Stage NEW and publish it, 'killed' after ``renames`` renames; True if the publish completed."""
    staged = StagedOutputs("train.tool", [str(out)], overwrite)
    staged.__enter__()
    for rel in PUBLISH_ORDER:
        Path(staged.path(str(out / rel))).write_text(NEW[rel])
    done = [0]
    real_rename = os.rename

    def rename(source, target):
        if done[0] == renames:
            raise Killed
        done[0] += 1
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    try:
        staged.publish([str(out / rel) for rel in PUBLISH_ORDER])
        completed = True
    except Killed:
        completed = False
    finally:
        monkeypatch.setattr(os, "rename", real_rename)
    os.close(staged._lock_fd)  # the kernel drops a killed process's flock; __exit__ never runs
    return completed


@pytest.mark.parametrize("overwrite", [False, True], ids=["first-run", "overwrite"])
def test_a_kill_at_every_rename_leaves_old_or_new_and_the_next_run_recovers(tmp_path, monkeypatch, overwrite):
    old = OLD if overwrite else {}
    renames = len([rel for rel in PUBLISH_ORDER if rel in old]) + len(PUBLISH_ORDER)
    for step in range(renames + 1):
        out = tmp_path / f"kill{step}"
        write_files(out, old)
        completed = publish_killed_after(out, step, overwrite, monkeypatch)
        assert completed == (step == renames)
        state = visible(out)
        # Right after the kill: a readable manifest only over exactly the old or the new outputs,
        # and every visible file is a complete old or new one.
        if "train.tsv" in state:
            assert state in (old, NEW), (step, state)
        assert all(text in (old.get(rel), NEW.get(rel)) for rel, text in state.items()), (step, state)
        with StagedOutputs("train.tool", [str(out)], overwrite):  # the next run, on entry
            pass
        assert visible(out) == (NEW if completed else old), step
        assert hidden(out) == [], step


def test_a_kill_while_staging_is_cleaned_up_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "out"
    write_files(out, OLD)
    staged = StagedOutputs("train.tool", [str(out)], overwrite=True)
    staged.__enter__()
    Path(staged.path(str(out / "a.npy"))).write_text("half")
    os.close(staged._lock_fd)  # killed before publishing
    assert visible(out) == OLD
    with StagedOutputs("train.tool", [str(out)], overwrite=True):
        assert "removed the staging folder" in capsys.readouterr().err
    assert visible(out) == OLD and hidden(out) == []


def test_an_error_during_publish_rolls_back_at_once(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_files(out, OLD)
    real_rename = os.rename
    calls = []

    def failing_rename(source, target):
        calls.append(target)
        if len(calls) == 7:
            raise OSError(28, "No space left on device")
        real_rename(source, target)

    with pytest.raises(OSError, match="(?i)no space"):
        with StagedOutputs("train.tool", [str(out)], overwrite=True) as staged:
            for rel in PUBLISH_ORDER:
                Path(staged.path(str(out / rel))).write_text(NEW[rel])
            monkeypatch.setattr(os, "rename", failing_rename)
            staged.publish([str(out / rel) for rel in PUBLISH_ORDER])
    assert visible(out) == OLD and hidden(out) == []


def test_a_second_live_run_is_refused_and_nothing_is_touched(tmp_path):
    out = tmp_path / "out"
    with StagedOutputs("train.tool", [str(out)], overwrite=False) as first:
        Path(first.path(str(out / "a.npy"))).write_text("first")
        with pytest.raises(InputError, match="another run is writing these outputs"):
            with StagedOutputs("train.tool", [str(out)], overwrite=False):
                pass
        first.publish([str(out / "a.npy")])
    assert visible(out) == {"a.npy": "first"} and hidden(out) == []


def test_existing_outputs_need_overwrite_and_empty_new_folders_are_removed(tmp_path):
    out = tmp_path / "out"
    write_files(out, {"a.npy": "old a"})
    with pytest.raises(FileExistsError, match="--overwrite"):
        with StagedOutputs("train.tool", [str(out)], overwrite=False) as staged:
            Path(staged.path(str(out / "a.npy"))).write_text("new a")
            staged.publish([str(out / "a.npy")])
    assert visible(out) == {"a.npy": "old a"} and hidden(out) == []
    with pytest.raises(ValueError):
        with StagedOutputs("train.tool", [str(tmp_path / "never")], overwrite=False):
            raise ValueError("bad input found before anything was written")
    assert not (tmp_path / "never").exists()


def test_atomic_output_removes_temp_files_of_killed_writers_only(tmp_path):
    target = tmp_path / "train.km"
    dead = tmp_path / ".train.km.abcd1234.tmp"
    dead.write_text("half-written by a killed run")
    live = tmp_path / ".train.km.live5678.tmp"
    live.write_text("being written")
    with open(live) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # a writer that is still running
        other = tmp_path / ".train.tsv.abcd1234.tmp"  # another output's temp file
        other.write_text("x")
        with atomic_output(str(target)) as out:
            out.write("0 1 2\n")
        assert not dead.exists() and live.exists()
        assert remove_stale_temp_files(str(target)) == []
    assert target.read_text() == "0 1 2\n"
    assert remove_stale_temp_files(str(target)) == [str(live)]
    assert other.exists()


def test_an_output_that_is_an_input_is_refused_however_it_is_named(tmp_path):
    from melhubert_fairseq.output_guards import refuse_replacing_inputs

    (tmp_path / "data").mkdir()
    feature = tmp_path / "data" / "u1.npy"
    feature.write_text("features")
    os.symlink(feature, tmp_path / "link.npy")
    os.link(feature, tmp_path / "hard.npy")
    spellings = [str(feature), str(tmp_path / "data" / ".." / "data" / "u1.npy"), str(tmp_path / "link.npy"),
                 str(tmp_path / "hard.npy")]
    for output in spellings:
        with pytest.raises(InputError, match="this output is an input of the run.*also with --overwrite"):
            refuse_replacing_inputs([str(tmp_path / "new.npy"), output], ["unrelated.tsv", str(feature)])
    # An output folder replaced as a whole must not hold an input.
    with pytest.raises(InputError, match="output folder, replaced as a whole, holds the input"):
        refuse_replacing_inputs([str(tmp_path / "data")], [str(feature)])
    refuse_replacing_inputs([str(tmp_path / "other.npy")], [str(feature)])  # a new file replaces nothing

    def never_read():
        raise AssertionError("the inputs were listed although no output exists")
        yield

    refuse_replacing_inputs([str(tmp_path / "missing.npy")], never_read())


def test_a_full_disk_is_one_error_naming_the_file_and_the_old_file_stays(tmp_path, monkeypatch):
    from helpers import FillingDisk

    from melhubert_fairseq import disk_full as module
    from melhubert_fairseq.atomic_output import atomic_save_npy
    from melhubert_fairseq.disk_full import DiskFullError, save_npy

    target = tmp_path / "out" / "km.npy"
    atomic_save_npy(str(target), np.zeros((2, 40), np.float32))
    old = target.read_bytes()
    monkeypatch.setattr(module, "open_for_writing", FillingDisk(room=300))
    with pytest.raises(DiskFullError, match=rf"^{re.escape(str(target))}: no space left on device \(ENOSPC"):
        atomic_save_npy(str(target), np.ones((100, 40), np.float32), overwrite=True)
    assert target.read_bytes() == old and sorted(os.listdir(target.parent)) == ["km.npy"]
    # numpy's own tofile would say only "16000 requested and 0 written"; a staged file is removed.
    monkeypatch.setattr(module, "open_for_writing", FillingDisk(room=300))
    staged = tmp_path / "stage" / "u1.npy"
    with pytest.raises(DiskFullError, match=r"u1\.npy: no space left on device"):
        save_npy(str(staged), np.ones((100, 40), np.float32))
    assert not staged.exists()
