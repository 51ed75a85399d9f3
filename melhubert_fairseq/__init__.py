"""Mel-HuBERT pretraining as a fairseq plugin (``common.user_dir=melhubert_fairseq``).

The plugin registers the task ``mel_hubert_pretraining``, the model ``mel_hubert`` and the criterion
``hard_label_masked_ce`` with fairseq, and routes fairseq's checkpoint I/O through
:mod:`melhubert_fairseq.checkpoint_io` (weights-only loads with an allow-list, atomic saves, resuming
after a crash), in every process that imports both this package and fairseq, in either order:

* fairseq imports the package (``common.user_dir``), or fairseq was imported before it: on import;
* the package (or any of its modules) was imported first: as soon as fairseq is imported
  (:mod:`melhubert_fairseq.fairseq_registration` waits for it).

Importing the package itself imports neither fairseq nor torch, so the data tools and every tool's
``--help`` start at once. :func:`register_with_fairseq` registers explicitly (it is idempotent).

Loading a checkpoint from Python, pretrained (``mel_hubert``) or fine-tuned (``wav2vec_ctc`` over it)::

    import melhubert_fairseq
    model, cfg, task = melhubert_fairseq.load_checkpoint("checkpoints/checkpoint_best.pt")
"""
import os
import sys

__version__ = "0.1.0"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def register_with_fairseq() -> None:
    """Register the task, model and criterion with fairseq and install the checkpoint I/O (idempotent;
    imports fairseq and torch)."""
    from melhubert_fairseq.checkpoint_io import install_fairseq_checkpoint_io

    install_fairseq_checkpoint_io()
    from melhubert_fairseq import criterions, models, tasks  # noqa: F401  (their modules register themselves)


def load_checkpoint(path: "str | os.PathLike", arg_overrides: "dict | None" = None):
    """``(model, cfg, task)`` of a fairseq checkpoint: a pretrained ``mel_hubert`` one or a fine-tuned
    ``wav2vec_ctc`` one (rebuilt from its stored config; the pretrained file is not needed).

    fairseq's ``checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides)`` after registering the
    plugin (fairseq cannot infer the task ``mel_hubert_pretraining`` otherwise); the model is on the CPU in
    eval mode, and the file is read with ``torch.load(weights_only=True)``.
    """
    register_with_fairseq()
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([os.fspath(path)], arg_overrides=arg_overrides)
    return models[0].eval(), cfg, task


if "fairseq" in sys.modules:
    register_with_fairseq()
else:
    from melhubert_fairseq.fairseq_registration import register_when_fairseq_is_imported

    register_when_fairseq_is_imported(register_with_fairseq)
