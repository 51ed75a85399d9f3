"""fairseq's own command lines, run the way users run them: from any directory, with fairseq's defaults."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO_ROOT, hydra_train_command, make_fbank_corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def user_dir() -> str:
    """What ``melhubert-user-dir`` prints (the README's ``common.user_dir=$(melhubert-user-dir)``)."""
    result = subprocess.run(
        [sys.executable, "-m", "melhubert_fairseq.tools.user_dir"], capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_user_dir_is_the_installed_package():
    import melhubert_fairseq

    assert Path(user_dir()) == Path(melhubert_fairseq.__file__).parent
    assert (Path(user_dir()) / "tasks" / "mel_hubert_pretraining.py").is_file()


@pytest.mark.slow  # trains with fairseq-hydra-train
def test_training_runs_from_any_directory_and_under_a_config_that_changes_directory(tmp_path):
    data_dir = make_fbank_corpus(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    command = hydra_train_command(data_dir, tmp_path / "ckpt", max_update=1)
    command[command.index("config")] = str(REPO_ROOT / "config")
    command[command.index("common.user_dir=melhubert_fairseq")] = f"common.user_dir={user_dir()}"
    # fairseq's own configs run in the hydra run directory (hydra's chdir), ours keep the cwd.
    command.append("hydra.job.chdir=true")
    result = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ckpt" / "checkpoint_last.pt").is_file()


@pytest.mark.slow  # spawns fairseq-hydra-train
@pytest.mark.parametrize(
    "config, labels, overrides, message",
    [
        # an InputError in the task's setup
        ("stage1", True, ["task.labels=null"], "error: task.label_dir="),
        # an InputError in the task's build_model (no labels for a model that predicts them)
        ("stage1", False, ["task.labels=null"], "error: task.labels=null gives no k-means labels"),
        # APC: labels given to a criterion that reads none (build_criterion)
        ("causal_apc", True, ["task.labels=km"], "error: task.labels=km: criterion apc_l1 reads no labels"),
        # APC: a time shift no crop is longer than (the criterion's constructor)
        ("causal_apc", False, ["criterion.time_shift=100000"], "error: criterion.time_shift=100000 is not shorter than the crop"),
        # APC on a model that sees its target (found at the first forward, inside fairseq's training loop)
        ("causal_apc", False, ["model.attention_type=original", "model.pos_conv_causal=null"],
         "error: model.attention_type=original: bidirectional attention sees frame t+3 from frame t"),
    ],
    ids=["task-setup", "build-model", "apc-given-labels", "apc-shift-not-shorter-than-crop", "apc-sees-target"],
)
def test_a_config_mistake_is_one_error_line_with_exit_code_2(tmp_path, config, labels, overrides, message):
    # All are found in the first hydra job, after fairseq imported the plugin inside that job's main
    # (fairseq_patches: tasks.setup_task, the task's methods and fairseq_cli.train.train).
    data_dir = make_fbank_corpus(tmp_path / "data", num_utts=4)
    command = hydra_train_command(data_dir, tmp_path / "ckpt", config_name=config, overrides=overrides, labels=labels)
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith(message), last
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    assert not (tmp_path / "ckpt" / "checkpoint_last.pt").exists()


def test_fairseq_validate_scores_every_utterance_with_fairseqs_defaults(tiny_checkpoint, tmp_path):
    # Data and labels in a folder the checkpoint has never seen; fairseq-validate's default
    # --required-batch-size-multiple is 8, which made fairseq drop the utterances past a multiple of 8.
    valid_dir = make_fbank_corpus(tmp_path / "moved", num_utts=12, split="valid", seed=5, min_frames=330, max_frames=600)
    result = subprocess.run(
        [
            sys.executable, "-m", "fairseq_cli.validate", str(valid_dir),
            "--user-dir", user_dir(), "--task", "mel_hubert_pretraining", "--label-dir", str(valid_dir),
            "--path", str(tiny_checkpoint), "--valid-subset", "valid", "--max-tokens", "1200",
        ],
        cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = re.search(r"valid on 'valid' subset .*\| bsz (\d+)", result.stdout + result.stderr)
    assert summary, (result.stdout + result.stderr)[-3000:]
    assert int(summary.group(1)) == 12  # bsz: the number of utterances scored


@pytest.mark.slow  # a fresh interpreter imports fairseq and the plugin
def test_plain_name_resolves_from_anywhere_in_a_regular_install_layout(tmp_path):
    # A regular install puts the package next to fairseq in site-packages; fairseq's
    # import_user_module falls back to <fairseq>/../<user_dir>. Lay that out in tmp_path
    # (the package linked in) and point fairseq's fallback at it, from a cwd without the package.
    import melhubert_fairseq

    site = tmp_path / "site-packages"
    (site / "fairseq").mkdir(parents=True)
    (site / "melhubert_fairseq").symlink_to(Path(melhubert_fairseq.__file__).parent)
    code = (
        "import argparse, fairseq.utils as u\n"
        f"u.__file__ = {str(site / 'fairseq' / 'utils.py')!r}\n"
        "u.import_user_module(argparse.Namespace(user_dir='melhubert_fairseq'))\n"
        "from fairseq.tasks import TASK_REGISTRY; from fairseq.models import MODEL_REGISTRY\n"
        "print('mel_hubert_pretraining' in TASK_REGISTRY, 'mel_hubert' in MODEL_REGISTRY)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True"]


def test_install_guide_without_ve_fairseq_lists_every_other_dependency():
    # docs/install.md's "keep your own fairseq" command must install what setup.py would, minus torch and ve-fairseq.
    import ast
    import shlex

    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    setup_call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    requires = next(k.value for k in setup_call.keywords if k.arg == "install_requires")
    wanted = {ast.literal_eval(e) for e in requires.elts} - {"torch>=2.1"}
    wanted = {r for r in wanted if not r.startswith("ve-fairseq")}
    guide = (REPO_ROOT / "docs" / "install.md").read_text()
    command = re.search(r"`pip install (numpy [^`]*)`", guide).group(1)
    assert set(shlex.split(command)) == wanted
