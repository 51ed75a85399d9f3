"""Loading checkpoints from Python in a fresh process: melhubert_fairseq.load_checkpoint and the README's
checkpoint_utils.load_model_ensemble_and_task example, for pretrained and fine-tuned checkpoints."""
from __future__ import annotations

import subprocess
import sys

import pytest

LOAD_CHECKPOINT = """
import sys
import melhubert_fairseq
model, cfg, task = melhubert_fairseq.load_checkpoint(sys.argv[1])
print(type(model).__name__, cfg.model._name, type(task).__name__, model.training, sum(p.numel() for p in model.parameters()))
"""

# The README's example: register the plugin, then fairseq's own loader.
README_EXAMPLE = """
import sys
import melhubert_fairseq
melhubert_fairseq.register_with_fairseq()  # mel_hubert_pretraining, mel_hubert, hard_label_masked_ce, apc_l1
from fairseq import checkpoint_utils
models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([sys.argv[1]])
print(type(models[0]).__name__, cfg.model._name, type(task).__name__)
"""

WITHOUT_THE_IMPORT = """
import sys
from fairseq import checkpoint_utils
checkpoint_utils.load_model_ensemble_and_task([sys.argv[1]])
"""


def run_fresh(code: str, checkpoint, cwd) -> subprocess.CompletedProcess:
    """``code`` in a new Python process (nothing imported yet), from ``cwd``, with the checkpoint as argv[1]."""
    return subprocess.run([sys.executable, "-c", code, str(checkpoint)], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["pretrained", "fine-tuned"])
def test_one_call_loads_either_checkpoint_in_a_fresh_process(kind, request, tmp_path):
    if kind == "pretrained":
        checkpoint, expected = request.getfixturevalue("tiny_checkpoint"), ("MelHubertModel", "mel_hubert", "MelHubertPretrainingTask")
    else:
        checkpoint = request.getfixturevalue("tiny_finetuned").checkpoint
        expected = ("Wav2VecCtc", "wav2vec_ctc", "AudioFinetuningTask")
    result = run_fresh(LOAD_CHECKPOINT, checkpoint, tmp_path)  # from a folder without the plugin in it
    assert result.returncode == 0, result.stderr[-3000:]
    model, name, task, training, parameters = result.stdout.split()[-5:]
    assert (model, name, task) == expected and training == "False" and int(parameters) > 10000

    example = run_fresh(README_EXAMPLE, checkpoint, tmp_path)
    assert example.returncode == 0, example.stderr[-3000:]
    assert tuple(example.stdout.split()[-3:]) == expected


def test_without_importing_the_plugin_fairseq_cannot_load_a_pretrained_checkpoint(tiny_checkpoint, tmp_path):
    """Why the README's example registers melhubert_fairseq: fairseq alone does not know the task."""
    result = run_fresh(WITHOUT_THE_IMPORT, tiny_checkpoint, tmp_path)
    assert result.returncode != 0
    assert "Could not infer task type from {'_name': 'mel_hubert_pretraining'" in result.stderr


def test_a_fine_tuned_checkpoint_loads_without_its_data_folder(tiny_finetuned, tmp_path):
    """The letter dictionary is stored in the checkpoint (fairseq's task_state): decoding on another machine
    needs neither the fine-tuning data folder nor the pretrained checkpoint."""
    import melhubert_fairseq

    _model, cfg, task = melhubert_fairseq.load_checkpoint(tiny_finetuned.checkpoint, arg_overrides={"data": str(tmp_path / "gone")})
    symbols = [line.split()[0] for line in (tiny_finetuned.data / "dict.ltr.txt").read_text().splitlines()]
    assert cfg.task.data == str(tmp_path / "gone")
    assert [task.target_dictionary[i] for i in range(task.target_dictionary.nspecial, len(task.target_dictionary))] == symbols
