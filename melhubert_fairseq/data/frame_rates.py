"""The one rule of how labels line up with fbank frames and model frames.

Features on disk are 10 ms fbank frames (:data:`FBANK_FRAME_RATE_HZ`); the
model stacks ``stack`` of them per model frame; labels come at ``label_rate``
Hz, one per ``label_stride`` fbank frames, and that stride must divide the
stack so that every model frame has a label (stage 1: 100 Hz labels, one per
fbank frame; stage 2 of a 20 ms model: 50 Hz, one per model frame).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from melhubert_fairseq.data.features import FBANK_FRAME_RATE_HZ
from melhubert_fairseq.errors import InputError

#: Help of every ``label_rate`` setting (the task's field, the label tools' ``--label-rate``).
LABEL_RATE_HELP = (
    f"labels per second: {FBANK_FRAME_RATE_HZ} = one per 10 ms fbank frame (stage 1), "
    f"{FBANK_FRAME_RATE_HZ // 2} = one per 20 ms model frame (stage 2 of a 20 ms model)"
)


def label_stride(label_rate: float) -> int:
    """10 ms fbank frames per label for labels at ``label_rate`` Hz (100 -> 1, 50 -> 2, 25 -> 4).

    The one check that a rate is 100 Hz over an integer; a model's rate ``100 / stack``
    passes for every stack although float division does not always give it back exactly (100 / 11).
    """
    stride = FBANK_FRAME_RATE_HZ / label_rate if label_rate > 0 else 0
    if round(stride) < 1 or abs(stride - round(stride)) > 1e-6:
        raise InputError(
            f"label rate {label_rate:g} Hz is not {FBANK_FRAME_RATE_HZ} Hz divided by an integer (100, 50, 25, ...)"
        )
    return int(round(stride))


def expected_label_count(num_frames, stride: int):
    """Labels a ``.km`` line should hold for ``num_frames`` fbank frames at ``stride`` frames per label."""
    return -(-num_frames // stride)


def label_count_tolerance(stride: int) -> int:
    """Allowed |labels - expected|: labels per fbank frame must match exactly; coarser labels may be
    one short or long, the rounding a 20 ms feature dump causes."""
    return 0 if stride == 1 else 1


def subsample_labels(labels: np.ndarray, step: int) -> np.ndarray:
    """Keep every ``step``-th label (the label of each stacked frame's first 10 ms frame)."""
    return labels[::step] if step > 1 else labels


@dataclass(frozen=True)
class FrameRates:
    """How fbank frames, model frames and label frames line up (all in 10 ms fbank frames)."""

    stack: int  # fbank frames per model frame
    label_stride: int  # fbank frames per label

    @classmethod
    def from_config(cls, stack_frames: int, label_rate: float) -> "FrameRates":
        """Validate that labels at ``label_rate`` Hz can be read at the model's rate."""
        model_rate = FBANK_FRAME_RATE_HZ / stack_frames
        error = InputError(
            f"label_rate={label_rate:g} Hz does not divide the model frame rate: the model runs at "
            f"{model_rate:g} Hz (stack_frames={stack_frames}); labels must be at "
            f"{FBANK_FRAME_RATE_HZ} Hz (one per fbank frame) or at a rate that is a multiple of "
            f"{model_rate:g} Hz dividing {FBANK_FRAME_RATE_HZ}"
        )
        try:
            stride = label_stride(label_rate)
        except InputError:
            raise error from None
        if stack_frames % stride:
            raise error
        return cls(stack=stack_frames, label_stride=stride)

    @property
    def labels_per_model_frame_step(self) -> int:
        """Take every n-th label to get one label per model frame."""
        return self.stack // self.label_stride

    def expected_labels(self, fbank_frames: np.ndarray) -> np.ndarray:
        """Number of labels a ``.km`` line should hold for utterances of ``fbank_frames`` frames."""
        return expected_label_count(fbank_frames, self.label_stride)

    @property
    def label_tolerance(self) -> int:
        """Allowed |labels - expected| (see ``label_count_tolerance``)."""
        return label_count_tolerance(self.label_stride)
