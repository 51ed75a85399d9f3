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


if "fairseq" in sys.modules:
    register_with_fairseq()
else:
    from melhubert_fairseq.fairseq_registration import register_when_fairseq_is_imported

    register_when_fairseq_is_imported(register_with_fairseq)
