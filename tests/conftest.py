"""Shared fixtures: tiny synthetic fbank corpora and a tiny trained checkpoint (helpers live in helpers.py)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import make_fbank_corpus, run_ctc_finetuning, run_hydra_train, small_corpus


@pytest.fixture
def fbank_corpus(tmp_path: Path) -> Path:
    """A 12-utterance synthetic corpus (32 classes) in a fresh directory."""
    return make_fbank_corpus(tmp_path / "data")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """checkpoint_last.pt of a 2-layer, 64-dim model trained 2 updates on a synthetic corpus."""
    root = tmp_path_factory.mktemp("tiny_run")
    data_dir = make_fbank_corpus(root / "data")
    np.save(data_dir / "mean-std.npy", np.stack([np.full(40, 0.5), np.full(40, 2.0)]).astype(np.float32))
    run_hydra_train(data_dir, root / "ckpt")
    return root / "ckpt" / "checkpoint_last.pt"


@pytest.fixture(scope="session")
def tiny_finetuned(tiny_checkpoint, tmp_path_factory) -> SimpleNamespace:
    """``tiny_checkpoint`` fine-tuned 3 updates with wav2vec_ctc (config/finetune_demo.yaml) on 4 bundled
    utterances, validated on 6: ``checkpoint`` (checkpoint_last.pt), ``data`` (its audio_finetuning folder),
    ``log`` (its hydra_train.log)."""
    root = tmp_path_factory.mktemp("tiny_finetune")
    data = small_corpus(root, train=4, valid=6)
    log = run_ctc_finetuning(tiny_checkpoint, data, root / "ft")
    return SimpleNamespace(checkpoint=root / "ft" / "checkpoint_last.pt", data=data, log=log)


#: Session fixtures that run fairseq-hydra-train: every test that uses one (directly or through another fixture) is slow.
TRAINING_FIXTURES = ("tiny_checkpoint", "tiny_finetuned")


@pytest.hookimpl(tryfirst=True)  # before pytest's own hook deselects by -m
def pytest_collection_modifyitems(items):
    """Mark ``slow`` every test that needs a trained fixture, so that ``-m "not slow"`` never trains."""
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in TRAINING_FIXTURES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def hang_guard():
    """Fail a test that blocks (e.g. reading a FIFO) after 30 s instead of hanging the suite."""
    import signal

    def blocked(signum, frame):
        raise TimeoutError("blocked for 30 s (reading a FIFO?)")

    previous = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
