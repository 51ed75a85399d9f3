"""Probe runs: labels checked, features extracted once per upstream, heads trained over several seeds.

::

    data = load_probe_data(["train.tsv"], ["valid.tsv"], tasks=("pr", "sid"))
    check_probe_data(data, ("pr", "sid"), shots=2)
    features = extract_probe_features(load_upstream("pretrained", "checkpoint_last.pt"), data.rows, True, True)
    results = [run_pr(features, data, seeds=[1, 2, 3]), run_sid(features, data, seeds=[1, 2, 3], shots=2)]
    print(format_table(results))
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from melhubert_fairseq.cli import with_progress
from melhubert_fairseq.probe.features import ManifestRow, ProbeFeatures, read_probe_manifest
from melhubert_fairseq.probe.heads import (
    HeadSettings,
    accuracy,
    evaluate_pr_head,
    padded_batches,
    train_pr_head,
    train_sid_head,
)
from melhubert_fairseq.probe.labels import (
    PHONES,
    SPEAKERS,
    RowLabel,
    Vocabulary,
    check_known_speakers,
    few_shot_split,
    label_file_beside,
    map_phones,
    read_phone_map,
    read_row_labels,
)
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.probe.settings import DEFAULT_LR, DEFAULT_STEPS, PR, SID, TASKS

#: The probes: phone recognition and speaker identification.
#: Each probe's metric, and whether higher is better.
METRICS = {PR: ("PER", False), SID: ("accuracy", True)}
#: Head settings each probe trains with unless told otherwise.
DEFAULT_SETTINGS = {task: HeadSettings(lr=DEFAULT_LR[task], steps=DEFAULT_STEPS[task]) for task in TASKS}


@dataclass
class ProbeData:
    """The utterances probed and their labels: training manifests' rows first, then the test manifests'."""

    rows: List[ManifestRow]
    num_train: int
    phones: Optional[List[RowLabel]]
    speakers: Optional[List[RowLabel]]
    train_sources: List[str]
    test_sources: List[str]

    @property
    def train_rows(self) -> List[int]:
        """Rows of the training manifests."""
        return list(range(self.num_train))

    @property
    def test_rows(self) -> List[int]:
        """Rows of the test manifests."""
        return list(range(self.num_train, len(self.rows)))

    def label_source(self, extension: str, train: bool = True) -> str:
        """The label files of the training (or test) manifests, for messages."""
        manifests = self.train_sources if train else self.test_sources
        return ", ".join(label_file_beside(path, extension) for path in manifests)


def load_probe_data(
    train: Sequence[str], test: Sequence[str], tasks: Sequence[str], phone_map: Optional[str] = None
) -> ProbeData:
    """Read the manifests and, beside each, the ``.phn`` (for pr, folded by ``phone_map`` if given) and ``.spk``
    (for sid) files."""
    rows: List[ManifestRow] = []
    phones: List[RowLabel] = []
    speakers: List[RowLabel] = []
    num_train = 0
    for index, path in enumerate([*train, *test]):
        manifest_rows = read_probe_manifest(path)
        utt_ids = [row.utt_id for row in manifest_rows]
        if PR in tasks:
            phones.extend(read_row_labels(path, utt_ids, PHONES))
        if SID in tasks:
            speakers.extend(read_row_labels(path, utt_ids, SPEAKERS))
        rows.extend(manifest_rows)
        if index < len(train):
            num_train = len(rows)
    if PR in tasks and phone_map:
        phones = map_phones(phones, read_phone_map(phone_map))
    return ProbeData(
        rows, num_train, phones if PR in tasks else None, speakers if SID in tasks else None, list(train), list(test)
    )


def phone_targets(data: ProbeData) -> tuple:
    """(vocabulary of the training phones, ids of every row); an unseen test phone is an InputError."""
    vocabulary = Vocabulary.from_labels(
        [data.phones[row] for row in data.train_rows], reserve_blank=True, source=data.label_source(PHONES)
    )
    return vocabulary, [vocabulary.encode(label, "phone") for label in data.phones]


def check_probe_data(data: ProbeData, tasks: Sequence[str], shots: Optional[int]) -> None:
    """Every check that can fail on the labels, before any feature is extracted."""
    if PR in tasks:
        if not data.test_rows:
            raise InputError("pr needs test manifests (--test) to score the phone error rate on")
        phone_targets(data)
    if SID in tasks:
        if shots:
            few_shot_split(data.speakers, shots, 0, data.label_source(SPEAKERS) + (
                f" and {data.label_source(SPEAKERS, train=False)}" if data.test_rows else ""
            ))
        else:
            if not data.test_rows:
                raise InputError("sid without --shots needs test manifests (--test); with --shots N it tests on the rest")
            check_known_speakers(
                [data.speakers[row] for row in data.train_rows], [data.speakers[row] for row in data.test_rows],
                data.label_source(SPEAKERS),
            )


@dataclass
class ProbeResult:
    """One probe of one upstream over several seeds."""

    task: str
    upstream: str
    values: List[float]
    layer_weights: List[np.ndarray]
    num_train: int
    num_test: int
    per_layer: Dict[int, List[float]] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        """PER or accuracy."""
        return METRICS[self.task][0]

    @property
    def mean(self) -> float:
        """Mean over seeds."""
        return statistics.fmean(self.values)

    @property
    def spread(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def mean_layer_weights(self) -> np.ndarray:
        """The learned state weights, averaged over seeds."""
        return np.mean(self.layer_weights, axis=0)

    def describe(self) -> str:
        """One line: metric mean ± spread, the seeds' values and the learned weights."""
        values = " ".join(f"{v:.1f}" for v in self.values)
        weights = " ".join(f"{w:.2f}" for w in self.mean_layer_weights())
        line = (
            f"{self.task} {self.upstream}: {self.metric} {self.mean:.1f} ± {self.spread:.1f} % "
            f"({len(self.values)} seeds: {values}; {self.num_train} train / {self.num_test} test utterances); "
            f"state weights 0..{len(self.mean_layer_weights()) - 1}: {weights}"
        )
        for layer, layer_values in sorted(self.per_layer.items()):
            spread = statistics.stdev(layer_values) if len(layer_values) > 1 else 0.0
            line += f"\n  state {layer} alone: {self.metric} {statistics.fmean(layer_values):.1f} ± {spread:.1f} %"
        return line


def run_pr(
    features: ProbeFeatures, data: ProbeData, seeds: Sequence[int], settings: HeadSettings = DEFAULT_SETTINGS[PR],
    device: str = "cpu", per_layer: bool = False, progress: bool = False,
) -> ProbeResult:
    """Linear CTC heads trained on the training rows, PER on the test rows, once per seed (a progress bar
    over the heads with ``progress``)."""
    vocabulary, targets = phone_targets(data)
    result = ProbeResult(PR, features.upstream, [], [], len(data.train_rows), len(data.test_rows))
    layers = [None] + (list(range(features.num_states)) if per_layer and features.num_states > 1 else [])
    for layer in layers:
        states = None if layer is None else [layer]
        train = padded_batches(features.frames, features.offsets, data.train_rows, settings.batch_frames, states)
        test = padded_batches(features.frames, features.offsets, data.test_rows, settings.batch_frames, states)
        desc = f"pr heads ({features.upstream}{'' if layer is None else f', state {layer}'})"
        for seed in with_progress(seeds, desc=desc, unit="head", disable=not progress):
            head = train_pr_head(train, targets, len(vocabulary), settings, seed, device)
            per = evaluate_pr_head(head, test, targets, device)
            if layer is None:
                result.values.append(per)
                result.layer_weights.append(head.featurizer.weights().detach().cpu().numpy())
            else:
                result.per_layer.setdefault(layer, []).append(per)
    return result


def run_sid(
    features: ProbeFeatures, data: ProbeData, seeds: Sequence[int], shots: Optional[int] = None,
    settings: HeadSettings = DEFAULT_SETTINGS[SID], device: str = "cpu", per_layer: bool = False,
    progress: bool = False,
) -> ProbeResult:
    """Linear speaker classifiers on mean-pooled states, accuracy on held-out rows, once per seed.

    With ``shots`` every seed draws its own ``shots`` training rows per speaker from all rows and
    tests on the rest; without, training rows train and test rows test.
    """
    names = sorted({label.tokens[0] for label in data.speakers})
    speaker_ids = torch.as_tensor([names.index(label.tokens[0]) for label in data.speakers])
    pooled = torch.from_numpy(np.ascontiguousarray(features.pooled.transpose(1, 0, 2)))  # (S, N, C)
    result = ProbeResult(SID, features.upstream, [], [], 0, 0)
    layers = [None] + (list(range(features.num_states)) if per_layer and features.num_states > 1 else [])
    for seed in with_progress(seeds, desc=f"sid heads ({features.upstream})", unit="seed", disable=not progress):
        if shots:
            train, test = few_shot_split(data.speakers, shots, seed, data.label_source(SPEAKERS))
        else:
            train, test = data.train_rows, data.test_rows
        result.num_train, result.num_test = len(train), len(test)
        for layer in layers:
            states = pooled if layer is None else pooled[layer : layer + 1]
            head = train_sid_head(states[:, train], speaker_ids[train], len(names), settings, seed, device)
            value = accuracy(head, states[:, test], speaker_ids[test], device)
            if layer is None:
                result.values.append(value)
                result.layer_weights.append(head.featurizer.weights().detach().cpu().numpy())
            else:
                result.per_layer.setdefault(layer, []).append(value)
    return result


def format_table(results: Sequence[ProbeResult], upstreams: Sequence[str], title: str) -> str:
    """Upstreams x probes: mean ± spread of each probe's metric."""
    tasks = [task for task in TASKS if any(r.task == task for r in results)]
    by_key = {(r.upstream, r.task): r for r in results}
    headers = []
    for task in tasks:
        example = next(r for r in results if r.task == task)
        better = "higher" if METRICS[task][1] else "lower"
        headers.append(f"{task.upper()} {example.metric} % ({better} is better)")
    width = max(len(name) for name in upstreams) + 2
    lines = [title, " " * width + " | ".join(f"{h:<28}" for h in headers)]
    for upstream in upstreams:
        cells = []
        for task in tasks:
            r = by_key.get((upstream, task))
            cells.append(f"{r.mean:5.1f} ± {r.spread:4.1f}" + " " * 15 if r else "-")
        lines.append(f"{upstream:<{width}}" + " | ".join(f"{c:<28}" for c in cells))
    return "\n".join(lines)


def beats(better: ProbeResult, worse: ProbeResult) -> bool:
    """Whether ``better`` wins by more than both spreads together (means at least one spread apart each side)."""
    gap = better.mean - worse.mean if METRICS[better.task][1] else worse.mean - better.mean
    return gap > better.spread + worse.spread


def paired_gap(better: ProbeResult, worse: ProbeResult) -> tuple:
    """(mean, spread) over seeds of how much ``better`` beats ``worse`` (positive = better), seed by seed: the
    same seed gives both the same head initialisation and, for few-shot SID, the same split."""
    sign = 1.0 if METRICS[better.task][1] else -1.0
    gaps = [sign * (b - w) for b, w in zip(better.values, worse.values)]
    return statistics.fmean(gaps), statistics.stdev(gaps) if len(gaps) > 1 else 0.0
