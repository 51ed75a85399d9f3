"""The configs compose as fairseq-hydra-train composes them: every name the guide and the docs give, the
entries at config/'s top level, and the groups combined on the command line."""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import pytest
from fairseq.dataclass.initialize import hydra_init
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from helpers import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "config"
#: Where users read the config names they type.
GUIDES = [REPO_ROOT / "README.md", CONFIG_DIR / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def compose_config(name: str, overrides: Optional[List[str]] = None) -> DictConfig:
    """``--config-dir config --config-name name`` as fairseq-hydra-train composes it (its schema registered,
    Hydra's 1.1 semantics: fairseq's hydra.main names no version_base)."""
    hydra_init("config")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.1"):
        return compose(config_name=name, overrides=overrides or [])


def names_in_guides() -> Dict[str, str]:
    """Every ``--config-name NAME`` in the README, config/README.md and docs/, with the file naming it."""
    found = {}
    for path in GUIDES:
        for name in re.findall(r"--config-name[ =]+([\w/]+)", path.read_text(encoding="utf-8")):
            found.setdefault(name, path.name)
    return found


def test_every_config_name_in_the_guides_composes():
    names = names_in_guides()
    assert {"stage1", "demo", "finetune_demo"} <= set(names), names
    for name, where in names.items():
        cfg = compose_config(name)
        assert cfg.task._name and cfg.model._name, f"{name} (named in {where})"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_top_level_config_composes_into_a_whole_recipe(path):
    cfg = compose_config(path.stem)
    assert cfg.task._name in ("mel_hubert_pretraining", "audio_finetuning")
    assert {"common", "checkpoint", "dataset", "criterion", "optimization", "optimizer", "model"} <= set(cfg)


@pytest.mark.parametrize(
    "name, stack_frames, label_rate, criterion, max_epoch",
    [
        ("stage1", 2, 100, "hard_label_masked_ce", 200),
        ("stage1_10ms", 1, 100, "hard_label_masked_ce", 200),
        ("stage1_40ms", 4, 100, "hard_label_masked_ce", 200),
        ("stage1_multigpu", 2, 100, "hard_label_masked_ce", 200),
        ("stage2", 2, 50, "hard_label_masked_ce", 100),
        ("stage2_from_stage1", 2, 50, "hard_label_masked_ce", 100),
        ("causal_apc", 1, 100, "apc_l1", 30),
        ("demo", 2, 100, "hard_label_masked_ce", 0),
    ],
)
def test_each_pretraining_entry_is_the_recipe_plus_its_groups(name, stack_frames, label_rate, criterion, max_epoch):
    cfg = compose_config(name)
    assert (cfg.task.stack_frames, cfg.task.label_rate, cfg.criterion._name) == (stack_frames, label_rate, criterion)
    assert cfg.optimization.max_epoch == max_epoch
    # What no group changes stays the recipe's (not fairseq's schema default).
    assert cfg.optimization.clip_norm == 10.0 and cfg.model.mask_prob == 0.7


def test_groups_combine_on_the_command_line_as_the_entries_do():
    assert compose_config("stage1", ["+pretrain/frame_rate=40ms"]) == compose_config("stage1_40ms")
    assert compose_config("pretrain/stage1") == compose_config("stage1")
    both = compose_config("stage2", ["+pretrain/run=multigpu"])
    assert both.task.label_rate == 50 and both.distributed_training.distributed_world_size == 8
