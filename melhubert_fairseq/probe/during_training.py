"""The probes during pretraining: PR and SID of the model being trained, on a small held-out probe set.

The pretraining task (``task.probe_train``, see
:class:`~melhubert_fairseq.tasks.pretraining_config.MelHubertPretrainingConfig`) runs
:meth:`TrainingProbe.run` at the start of every ``task.probe_interval``-th validation
and logs ``probe_pr_per`` and ``probe_sid_acc`` with the validation's other metrics
(fairseq's log and tensorboard). The probe must not change training: the model is read
in eval mode without gradients, the heads draw from private generators, and every
global random stream (torch CPU and CUDA, numpy, Python) is restored afterwards.
"""
from __future__ import annotations

import contextlib
import logging
import random
import time
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Sequence

import numpy as np
import torch

from melhubert_fairseq.errors import InputError
from melhubert_fairseq.feature_reader import MelHubertFeatureReader
from melhubert_fairseq.probe.features import PRETRAINED, Upstream, extract_probe_features
from melhubert_fairseq.probe.run import DEFAULT_SETTINGS, ProbeData, check_probe_data, load_probe_data, run_pr, run_sid
from melhubert_fairseq.probe.settings import PR, SID, TASKS

logger = logging.getLogger(__name__)

#: The metric each probe logs.
METRIC_NAMES = {PR: "probe_pr_per", SID: "probe_sid_acc"}


@contextlib.contextmanager
def isolated_random_streams() -> Iterator[None]:
    """Run a block without consuming any global random stream: torch (CPU and every CUDA device), numpy
    and Python's ``random`` are restored to their states on entry."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def parse_tasks(spec: str) -> List[str]:
    """``"pr,sid"`` -> the probes, checked."""
    tasks = [part.strip() for part in spec.split(",") if part.strip()]
    bad = [task for task in tasks if task not in TASKS]
    if not tasks or bad:
        raise InputError(f"task.probe_tasks must name some of {', '.join(TASKS)}, got {spec!r}")
    return list(dict.fromkeys(tasks))


@dataclass
class TrainingProbe:
    """The probe set, read and checked once before training, and the probe settings."""

    data: ProbeData
    tasks: List[str]
    shots: int
    seeds: Sequence[int]
    pr_steps: int
    sid_steps: int

    @classmethod
    def from_task_config(cls, cfg) -> "TrainingProbe":
        """Read ``cfg.probe_train`` / ``probe_test`` and their labels; fail now, not at a validation."""
        tasks = parse_tasks(cfg.probe_tasks)
        if cfg.probe_interval < 1:
            raise InputError(f"task.probe_interval must be >= 1 (validations between probes), got {cfg.probe_interval}")
        if cfg.probe_seeds < 1 or cfg.probe_shots < 1:
            raise InputError("task.probe_seeds and task.probe_shots must be >= 1")
        test = [cfg.probe_test] if cfg.probe_test else []
        data = load_probe_data([cfg.probe_train], test, tasks, cfg.probe_phone_map)
        check_probe_data(data, tasks, cfg.probe_shots)
        return cls(data, tasks, cfg.probe_shots, list(range(1, cfg.probe_seeds + 1)), cfg.probe_pr_steps, cfg.probe_sid_steps)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, task_cfg, device: str) -> Dict[str, float]:
        """Probe ``model`` (left exactly as it was); return {metric name: mean over seeds}."""
        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with isolated_random_streams():
                reader = MelHubertFeatureReader.for_model(model, task_cfg, device)
                features = extract_probe_features(
                    Upstream(PRETRAINED, reader), self.data.rows, keep_frames=PR in self.tasks,
                    keep_pooled=SID in self.tasks, progress=False,
                )
                values = {}
                if PR in self.tasks:
                    settings = replace(DEFAULT_SETTINGS[PR], steps=self.pr_steps)
                    values[PR] = run_pr(features, self.data, self.seeds, settings, device)
                if SID in self.tasks:
                    settings = replace(DEFAULT_SETTINGS[SID], steps=self.sid_steps)
                    values[SID] = run_sid(features, self.data, self.seeds, self.shots, settings, device)
        finally:
            model.train(was_training)
        metrics = {METRIC_NAMES[task]: result.mean for task, result in values.items()}
        logger.info(
            f"probe of the model in training in {time.perf_counter() - start:.1f} s: "
            + "; ".join(result.describe().splitlines()[0] for result in values.values())
        )
        return metrics
