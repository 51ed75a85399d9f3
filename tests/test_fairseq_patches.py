"""melhubert_fairseq.fairseq_patches: what it replaces in fairseq, and how a user mistake ends a fairseq command."""
from __future__ import annotations

import pytest
from fairseq import checkpoint_utils, tasks
from fairseq.distributed import utils as distributed_utils
from omegaconf import OmegaConf

import melhubert_fairseq
from melhubert_fairseq import fairseq_patches
from melhubert_fairseq.errors import InputError


def test_registering_installs_every_patch_once():
    melhubert_fairseq.register_with_fairseq()
    patched = {
        "torch_persistent_save": checkpoint_utils.torch_persistent_save,
        "load_checkpoint": checkpoint_utils.load_checkpoint,
        "load_checkpoint_to_cpu": checkpoint_utils.load_checkpoint_to_cpu,
        "verify_checkpoint_directory": checkpoint_utils.verify_checkpoint_directory,
        "call_main": distributed_utils.call_main,
        "setup_task": tasks.setup_task,
    }
    melhubert_fairseq.register_with_fairseq()  # idempotent: nothing wrapped twice
    assert checkpoint_utils.load_checkpoint is patched["load_checkpoint"]
    assert distributed_utils.call_main is patched["call_main"]
    for name, function in patched.items():
        original = fairseq_patches._original[name]
        assert function is not original and original.__module__.startswith("fairseq"), name
    assert checkpoint_utils.PathManager.__name__ == "AtomicCopyPathManager"
    assert checkpoint_utils.load_ema_from_checkpoint.__module__ == "melhubert_fairseq.checkpoint_loading"


def test_an_input_error_is_one_error_line_and_exit_code_2_and_a_bug_keeps_its_traceback(capsys):
    def mistake():
        raise InputError("train.tsv:3 (utt1): line 1\nline 2")

    def bug():
        raise ValueError("a bug")

    with pytest.raises(SystemExit) as exit_info:
        fairseq_patches.exit_on_input_error(mistake)()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: train.tsv:3 (utt1): line 1 line 2\n"
    with pytest.raises(ValueError, match="a bug"):
        fairseq_patches.exit_on_input_error(bug)()


def test_from_python_a_task_config_mistake_is_raised_not_an_exit(tmp_path):
    melhubert_fairseq.register_with_fairseq()
    cfg = OmegaConf.create({"_name": "mel_hubert_pretraining", "data": str(tmp_path), "labels": None, "label_dir": str(tmp_path)})
    from fairseq.dataclass.utils import merge_with_parent
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    cfg = merge_with_parent(TASK_DATACLASS_REGISTRY["mel_hubert_pretraining"](), cfg)
    with pytest.raises(InputError, match=r"task\.labels=null reads no labels"):
        tasks.setup_task(cfg)
