"""The probes' heads on frozen features: SUPERB's learnable weighted sum of the states, then a linear layer.

* PR: linear CTC over phones (blank = 0), greedy decoding, phone error rate;
* SID: mean pooling over each utterance's real frames, a linear classifier, accuracy.

Heads are seeded with a private :class:`torch.Generator` (initial weights, batch order) and
never touch the global random streams, so a probe can run in the middle of a training run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import editdistance
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class WeightedLayerSum(nn.Module):
    """SUPERB's featurizer: softmax-normalised learnable weights over S states, (S, ..., C) -> (..., C)."""

    def __init__(self, num_states: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_states))

    def weights(self) -> torch.Tensor:
        """(S,) the states' weights: positive, summing to 1."""
        return F.softmax(self.logits, dim=0)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        # One contraction: no (S, ..., C) product is materialised, forward or backward.
        return torch.tensordot(self.weights(), states, dims=1)


class LinearProbe(nn.Module):
    """Weighted sum of the states, then one linear layer: (S, ..., C) -> (..., num_outputs)."""

    def __init__(self, num_states: int, dim: int, num_outputs: int, generator: torch.Generator) -> None:
        super().__init__()
        self.featurizer = WeightedLayerSum(num_states)
        self.linear = nn.Linear(dim, num_outputs)
        bound = 1.0 / math.sqrt(dim)  # nn.Linear's own init range, from the private generator
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound, generator=generator)
            self.linear.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.linear(self.featurizer(states))


@dataclass(frozen=True)
class HeadSettings:
    """How a head trains: ``steps`` Adam steps at ``lr``, on batches of at most ``batch_frames`` padded frames
    (PR, the batches in a fresh order every pass) or on all training utterances at once (SID)."""

    lr: float = 5e-3
    steps: int = 200
    batch_frames: int = 8000
    weight_decay: float = 0.0


@dataclass
class HeadResult:
    """One trained head's score on the test rows and its learned state weights."""

    value: float
    layer_weights: np.ndarray


# --- PR ----------------------------------------------------------------------------------------------


def greedy_ctc_decode(logits: torch.Tensor, length: int, blank: int = 0) -> List[int]:
    """(T, V) logits of one utterance -> its ids: best path, repeats merged, blanks removed."""
    best = logits[:length].argmax(dim=-1)
    merged = torch.unique_consecutive(best)
    return [int(i) for i in merged if int(i) != blank]


def error_rate(hypotheses: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Total edit distance over total reference length, in percent (PER for phones)."""
    errors = sum(editdistance.eval(list(h), list(r)) for h, r in zip(hypotheses, references))
    total = sum(len(r) for r in references)
    return 100.0 * errors / total


def padded_batches(
    frames: np.ndarray, offsets: np.ndarray, rows: Sequence[int], batch_frames: int, states: Optional[Sequence[int]]
) -> List[Tuple[List[int], torch.Tensor, torch.Tensor]]:
    """Rows grouped by length into batches of at most ``batch_frames`` padded frames: (rows, (S, B, T, C)
    states zero-padded, (B,) lengths). ``states`` picks some of the S states (None: all)."""
    lengths = offsets[1:] - offsets[:-1]
    order = sorted(rows, key=lambda row: int(lengths[row]))
    groups: List[List[int]] = []
    for row in order:
        if groups and int(lengths[row]) * (len(groups[-1]) + 1) <= batch_frames:
            groups[-1].append(row)
        else:
            groups.append([row])
    picked = list(states) if states is not None else list(range(frames.shape[0]))
    batches = []
    for group in groups:
        longest = int(max(lengths[row] for row in group))
        batch = torch.zeros(len(picked), len(group), longest, frames.shape[2])
        for b, row in enumerate(group):
            start, end = offsets[row], offsets[row + 1]
            batch[:, b, : end - start] = torch.from_numpy(np.asarray(frames[picked, start:end], dtype=np.float32))
        batches.append((group, batch, torch.as_tensor([int(lengths[row]) for row in group])))
    return batches


def train_pr_head(
    train_batches, targets: Sequence[np.ndarray], num_outputs: int, settings: HeadSettings, seed: int, device: str
) -> LinearProbe:
    """Fit a linear CTC head on ``train_batches`` (from :func:`padded_batches`) with ``targets`` per row."""
    generator = torch.Generator().manual_seed(seed)
    num_states, dim = train_batches[0][1].shape[0], train_batches[0][1].shape[-1]
    head = LinearProbe(num_states, dim, num_outputs, generator).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    prepared = []
    for rows, batch, lengths in train_batches:
        labels = [torch.from_numpy(targets[row]) for row in rows]
        label_lengths = torch.as_tensor([len(label) for label in labels])
        prepared.append((batch.to(device), lengths.to(device), torch.cat(labels).to(device), label_lengths.to(device)))
    order: List[int] = []
    with torch.enable_grad():
        for _step in range(settings.steps):
            if not order:
                order = torch.randperm(len(prepared), generator=generator).tolist()
            batch, lengths, labels, label_lengths = prepared[order.pop()]
            log_probs = F.log_softmax(head(batch), dim=-1).transpose(0, 1)  # (T, B, V)
            loss = F.ctc_loss(log_probs, labels, lengths, label_lengths, blank=0, zero_infinity=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head.eval()


@torch.no_grad()
def evaluate_pr_head(head: LinearProbe, test_batches, targets: Sequence[np.ndarray], device: str) -> float:
    """PER (%) of greedy decoding on ``test_batches`` against ``targets``."""
    hypotheses, references = [], []
    for rows, batch, lengths in test_batches:
        logits = head(batch.to(device)).cpu()
        for b, row in enumerate(rows):
            hypotheses.append(greedy_ctc_decode(logits[b], int(lengths[b])))
            references.append(targets[row].tolist())
    return error_rate(hypotheses, references)


# --- SID ---------------------------------------------------------------------------------------------


def mean_pool(states: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """(..., B, T, C) states and (B, T) padding mask (True = padding) -> (..., B, C) mean over real frames."""
    keep = (~padding_mask).to(states.dtype).unsqueeze(-1)
    return (states * keep).sum(dim=-2) / keep.sum(dim=-2).clamp(min=1)


def train_sid_head(
    pooled: torch.Tensor, speakers: torch.Tensor, num_outputs: int, settings: HeadSettings, seed: int, device: str
) -> LinearProbe:
    """Fit a linear speaker classifier on (S, N, C) pooled states with (N,) speaker ids, full batch."""
    generator = torch.Generator().manual_seed(seed)
    head = LinearProbe(pooled.shape[0], pooled.shape[-1], num_outputs, generator).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    pooled, speakers = pooled.to(device), speakers.to(device)
    with torch.enable_grad():
        for _step in range(settings.steps):
            loss = F.cross_entropy(head(pooled), speakers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head.eval()


@torch.no_grad()
def accuracy(head: LinearProbe, pooled: torch.Tensor, speakers: torch.Tensor, device: str) -> float:
    """Percent of (S, N, C) pooled rows whose best-scoring speaker is right."""
    predicted = head(pooled.to(device)).argmax(dim=-1).cpu()
    return 100.0 * float((predicted == speakers).float().mean())
