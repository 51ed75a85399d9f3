"""Mel-HuBERT pretraining as a fairseq plugin (``common.user_dir=melhubert_fairseq``).

The plugin registers the task ``mel_hubert_pretraining``, the model ``mel_hubert`` and the criteria
``hard_label_masked_ce`` and ``apc_l1`` with fairseq, and puts its checkpoint I/O into fairseq (weights-only
loads with an allow-list, atomic saves, resuming after a crash; every patch is listed in
:mod:`melhubert_fairseq.fairseq_patches`). Registration is explicit, :func:`register_with_fairseq`
(idempotent), and happens in two ways:

* fairseq imports the package (``common.user_dir``, ``--user-dir``): fairseq is then imported, and
  importing the package registers;
* Python code that uses the plugin (a script loading a checkpoint with fairseq's own functions, the s3prl
  upstream, the tools) calls :func:`register_with_fairseq`, or :func:`load_checkpoint`, which does.

Importing the package without fairseq imports neither fairseq nor torch, so the data tools and every
tool's ``--help`` start at once.

Loading a checkpoint from Python, pretrained (``mel_hubert``) or fine-tuned (``wav2vec_ctc`` over it)::

    import melhubert_fairseq
    model, cfg, task = melhubert_fairseq.load_checkpoint("checkpoints/checkpoint_best.pt")

or with fairseq's own loader::

    import melhubert_fairseq
    melhubert_fairseq.register_with_fairseq()
    from fairseq import checkpoint_utils
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(["checkpoints/checkpoint_best.pt"])
"""
import os
import sys

__version__ = "0.1.0"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def register_with_fairseq() -> None:
    """Register the task, model and criteria with fairseq and install :mod:`melhubert_fairseq.fairseq_patches`
    (idempotent; imports fairseq and torch)."""
    # Deferred: importing the package must not import fairseq or torch (every tool's --help starts at once).
    from melhubert_fairseq import criterions, models, tasks  # noqa: F401  (their modules register themselves)
    from melhubert_fairseq.fairseq_patches import install_fairseq_patches

    install_fairseq_patches()


def load_checkpoint(path: "str | os.PathLike", arg_overrides: "dict | None" = None):
    """``(model, cfg, task)`` of a fairseq checkpoint: a pretrained ``mel_hubert`` one or a fine-tuned
    ``wav2vec_ctc`` one (rebuilt from its stored config; the pretrained file is not needed).

    fairseq's ``checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides)`` after registering the
    plugin (fairseq cannot infer the task ``mel_hubert_pretraining`` otherwise); the model is on the CPU in
    eval mode, and the file is read with ``torch.load(weights_only=True)``.
    """
    register_with_fairseq()
    from fairseq import checkpoint_utils  # deferred like the registration above

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([os.fspath(path)], arg_overrides=arg_overrides)
    return models[0].eval(), cfg, task


if "fairseq" in sys.modules:  # imported by fairseq (common.user_dir), or after it: register now
    register_with_fairseq()
