"""Checkpoint files through fairseq: never half-written, never unpickled unsafely."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils

import melhubert_fairseq
from melhubert_fairseq.checkpoint_loading import UnsafeCheckpointError, safe_torch_load
from melhubert_fairseq.feature_reader import MelHubertFeatureReader

melhubert_fairseq.register_with_fairseq()  # installs the checkpoint I/O into fairseq


class RunsCode:
    """Unpickling this runs code: it creates the file named by ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def planted_checkpoint(tmp_path, tiny_checkpoint) -> Path:
    """A real fairseq checkpoint of ours with a code-running object hidden in ``extra_state``."""
    state = safe_torch_load(str(tiny_checkpoint))
    state["extra_state"]["payload"] = RunsCode(str(tmp_path / "payload-ran"))
    path = tmp_path / "planted.pt"
    torch.save(state, path)
    return path


def test_environment_variable_cannot_turn_off_the_safe_loader(planted_checkpoint, tmp_path, monkeypatch):
    # torch's own refusal message suggests this variable; it must not open the door here.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    loaders = {
        "MelHubertFeatureReader": lambda: MelHubertFeatureReader(str(planted_checkpoint)),
        "load_model_ensemble_and_task": lambda: checkpoint_utils.load_model_ensemble_and_task([str(planted_checkpoint)]),
        "load_checkpoint_to_cpu": lambda: checkpoint_utils.load_checkpoint_to_cpu(str(planted_checkpoint)),
        "load_ema_from_checkpoint (ema.ema_seed_model)": lambda: checkpoint_utils.load_ema_from_checkpoint(
            str(planted_checkpoint)
        ),
    }
    for name, load in loaders.items():
        with pytest.raises(UnsafeCheckpointError, match="system"):
            load()
        assert not (tmp_path / "payload-ran").exists(), f"{name} ran the pickled code"


def test_safe_loader_still_loads_what_fairseq_saves(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(tiny_checkpoint)])
    assert type(models[0]).__name__ == "MelHubertModel" and cfg.task.stack_frames == 2


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_a_save_or_a_copy_leaves_the_old_checkpoint(tmp_path, tiny_checkpoint, monkeypatch):
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    last = save_dir / "checkpoint_last.pt"
    shutil.copy(tiny_checkpoint, last)
    old = last.read_bytes()
    state = safe_torch_load(str(tiny_checkpoint))
    real_save, real_copyfileobj = torch.save, shutil.copyfileobj

    def save_then_fail(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        disk_full()

    def copy_part_then_fail(source, target, length=0):
        target.write(source.read(1000))
        disk_full()

    # fairseq's first write of a checkpoint (trainer.save_checkpoint -> torch_persistent_save) ...
    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="(?i)no space left"):
        checkpoint_utils.torch_persistent_save(state, str(last))
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == old

    # ... and its copy of checkpoint_N_M.pt onto checkpoint_last.pt (in checkpoint_utils.save_checkpoint).
    newer = save_dir / "checkpoint_1_3.pt"
    checkpoint_utils.torch_persistent_save({**state, "marker": 3}, str(newer))
    monkeypatch.setattr(shutil, "copyfileobj", copy_part_then_fail)
    with pytest.raises(OSError, match="(?i)no space left"):
        checkpoint_utils.PathManager.copy(str(newer), str(last), overwrite=True)
    monkeypatch.setattr(shutil, "copyfileobj", real_copyfileobj)
    assert last.read_bytes() == old
    assert sorted(p.name for p in save_dir.iterdir()) == ["checkpoint_1_3.pt", "checkpoint_last.pt"]
    assert checkpoint_utils.PathManager.copy(str(newer), str(last), overwrite=True)
    assert safe_torch_load(str(last))["marker"] == 3


def test_saves_work_where_the_file_system_cannot_lock(tmp_path, tiny_checkpoint, monkeypatch):
    """Lustre without flock, some FUSE/SMB mounts: flock fails with ENOSYS; checkpoints still save atomically."""
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    state = safe_torch_load(str(tiny_checkpoint))
    target = tmp_path / "checkpoint_1_2.pt"
    checkpoint_utils.torch_persistent_save(state, str(target))
    assert checkpoint_utils.PathManager.copy(str(target), str(tmp_path / "checkpoint_last.pt"), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_1_2.pt", "checkpoint_last.pt"]
    assert safe_torch_load(str(tmp_path / "checkpoint_last.pt"))["model"].keys() == state["model"].keys()


def test_every_tool_reads_a_checkpoint_resaved_after_fairseqs_loader(tiny_checkpoint, tmp_path):
    # load_checkpoint_to_cpu + torch.save (the usual way to strip the optimizer before sharing) leaves
    # cfg as an omegaconf DictConfig; tools that load before the plugin registers with fairseq
    # (average-checkpoints, export-original) must allow the same types fairseq's loader does.
    import subprocess
    import sys

    state = checkpoint_utils.load_checkpoint_to_cpu(str(tiny_checkpoint))
    state.pop("last_optimizer_state", None)
    resaved = tmp_path / "shared.pt"
    torch.save(state, resaved)
    commands = {
        "average": ["melhubert_fairseq.tools.average_checkpoints", "--inputs", str(resaved), str(tiny_checkpoint),
                    "--output", str(tmp_path / "avg.pt")],
        "export": ["melhubert_fairseq.tools.export_original_checkpoint", str(resaved), str(tmp_path / "orig.ckpt")],
    }
    for name, command in commands.items():
        result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{name}: {result.stderr[-2000:]}"
    assert (tmp_path / "avg.pt").is_file() and (tmp_path / "orig.ckpt").is_file()


def test_feature_reader_names_another_fairseq_model_before_building_it(tiny_checkpoint, tmp_path):
    from melhubert_fairseq.file_sniffing import CheckpointFormatError

    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    state["cfg"]["model"]["_name"] = "hubert"  # what a fairseq HuBERT checkpoint says
    state["cfg"]["task"]["data"] = str(tmp_path / "nowhere")
    other = tmp_path / "hubert.pt"
    torch.save(state, other)
    with pytest.raises(CheckpointFormatError, match="a fairseq 'hubert' checkpoint, not 'mel_hubert'"):
        MelHubertFeatureReader(str(other))


def test_checkpoint_saved_with_the_removed_mask_impl_field_loads(tiny_checkpoint, tmp_path):
    # Checkpoints from before masking had one implementation carry model.mask_impl, a field the model no longer has.
    state = safe_torch_load(str(tiny_checkpoint))
    state["cfg"]["model"]["mask_impl"] = "vectorized"
    path = tmp_path / "with_mask_impl.pt"
    torch.save(state, path)
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    assert type(models[0]).__name__ == "MelHubertModel" and "mask_impl" not in cfg.model


def test_loading_never_shrinks_the_allow_list(tiny_checkpoint, tmp_path):
    """Every load leaves torch's process-wide allow-list as large as it was: a checkpoint holding a fairseq
    Dictionary (a fine-tuning checkpoint) still loads after a pretrained checkpoint was read in the same process."""
    from fairseq.data import Dictionary

    from melhubert_fairseq.checkpoint_loading import load_fairseq_state
    from melhubert_fairseq.original.format import original_checkpoint_safe_globals

    before = set(torch.serialization.get_safe_globals())
    assert Dictionary in before  # registered with the plugin
    load_fairseq_state(str(tiny_checkpoint))  # what fine-tuning does with model.w2v_path
    safe_torch_load(str(tiny_checkpoint), original_checkpoint_safe_globals())
    assert before <= set(torch.serialization.get_safe_globals())
    holds_dictionary = tmp_path / "finetuned.pt"
    torch.save({**safe_torch_load(str(tiny_checkpoint)), "target_dictionary": Dictionary()}, holds_dictionary)
    assert isinstance(safe_torch_load(str(holds_dictionary))["target_dictionary"], Dictionary)
