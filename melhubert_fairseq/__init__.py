"""Mel-HuBERT pretraining as a fairseq plugin (``common.user_dir=melhubert_fairseq``).

Importing the package registers the task ``mel_hubert_pretraining``, the model
``mel_hubert`` and the criterion ``hard_label_masked_ce`` with fairseq, and routes
fairseq's checkpoint I/O through :mod:`melhubert_fairseq.checkpoint_io` (weights-only
loads with an allow-list, atomic saves, resuming after a crash).
"""
import os

# torchaudio (pulled in by fairseq) fails to load its native library with
# recent torch; fairseq only imports it lazily, and nothing here needs it.
from melhubert_fairseq.checkpoint_io import install_fairseq_checkpoint_io

install_fairseq_checkpoint_io()

from melhubert_fairseq import criterions, models, tasks  # noqa: E402,F401  (registration)

__version__ = "0.1.0"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
