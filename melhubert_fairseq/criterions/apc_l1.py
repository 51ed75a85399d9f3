"""The ``apc_l1`` criterion: autoregressive predictive coding (Chung et al. 2019; the Transformer APC of 2020).

From the hidden state of frame t, the model's ``apc_proj`` (``model.prediction_head=frames``)
predicts the normalised input frame t + n; the loss is the L1 distance over real (not padded)
target frames. Nothing is masked and no labels are read. The model must not see frame t + n
from frame t: with bidirectional attention, or a centred positional conv whose half-kernel
reaches t + n, it would copy its target; such a model is refused before the first update.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from melhubert_fairseq.data.features import FBANK_FRAME_RATE_HZ
from melhubert_fairseq.errors import InputError

#: The APC paper's time shift: 3 frames of 10 ms.
APC_PAPER_SHIFT_MS = 30


@dataclass
class ApcL1Config(FairseqDataclass):
    """How far ahead APC predicts."""

    time_shift: Optional[int] = field(
        default=None,
        metadata={
            "help": "n: predict model frame t + n from the hidden state at t; null = the APC paper's 30 ms "
            "(3 x 10 ms) at the model's frame rate, rounded up to whole model frames (3 at 10 ms, 2 at 20 ms)"
        },
    )


def default_time_shift(stack_frames: int) -> int:
    """The APC paper's 30 ms in model frames of ``stack_frames`` x 10 ms, rounded up (never easier than 30 ms)."""
    frame_ms = 1000 // FBANK_FRAME_RATE_HZ * stack_frames
    return max(1, math.ceil(APC_PAPER_SHIFT_MS / frame_ms))


@register_criterion("apc_l1", dataclass=ApcL1Config)
class ApcL1(FairseqCriterion):
    """L1 loss of ``apc_proj(hidden[t])`` against input frame t + n, summed over frames and dimensions;
    ``sample_size`` is the number of predicted frames, so fairseq's normalisation gives the per-frame L1."""

    #: The task reads no label files for this criterion (see ``MelHubertPretrainingTask.build_criterion``).
    needs_labels = False

    def __init__(self, task, time_shift: Optional[int] = None) -> None:
        super().__init__(task)
        stack_frames = int(task.cfg.stack_frames)
        self.time_shift = default_time_shift(stack_frames) if time_shift is None else int(time_shift)
        if self.time_shift < 1:
            raise InputError(f"criterion.time_shift={time_shift}: APC predicts a later frame, so it must be >= 1")
        crop = getattr(task.cfg, "max_sample_size", None)
        if crop is not None and self.time_shift >= int(crop):
            raise InputError(
                f"criterion.time_shift={self.time_shift} is not shorter than the crop task.max_sample_size={crop} "
                "(model frames): no frame of a crop would have a target"
            )
        self._model_checked = False

    def check_model(self, model) -> None:
        """Refuse a model without the frame head, or one that can see frame t + n from frame t."""
        cfg = model.cfg
        if getattr(model, "apc_proj", None) is None:
            raise InputError(
                f"model.prediction_head={cfg.prediction_head}: criterion apc_l1 predicts frames through "
                "model.prediction_head=frames (a linear head onto the input frame)"
            )
        lookahead = model.lookahead_frames()
        n = self.time_shift
        if lookahead is None:
            raise InputError(
                f"model.attention_type={cfg.attention_type}: bidirectional attention sees frame t+{n} from frame t, so "
                "APC (criterion apc_l1) would copy its target; use model.attention_type=causal with "
                "model.pos_conv_causal=true (config/causal_apc.yaml)"
            )
        if lookahead >= n:
            raise InputError(
                f"model.pos_conv_causal=false: the centred positional conv (model.conv_pos={cfg.conv_pos}) reads "
                f"{lookahead} frames ahead, which reaches the APC target t+{n} (criterion.time_shift={n}); set "
                "model.pos_conv_causal=true"
            )

    def forward(self, model, sample: Dict, reduce: bool = True):
        """Compute the loss for ``sample``; returns (loss, sample_size, logging_output)."""
        if not self._model_checked:
            self.check_model(model)
            self._model_checked = True
        net_input = sample["net_input"]
        source = net_input["source"]
        if source.dim() != 3:
            raise InputError(f"apc_l1 predicts input frames: expected (batch, frames, dim) input, got {tuple(source.shape)}")
        padding_mask = net_input.get("padding_mask")
        if padding_mask is None:
            padding_mask = torch.zeros(source.shape[:2], dtype=torch.bool, device=source.device)
        net_output = model(source, padding_mask=padding_mask, sample_ids=net_input.get("sample_ids"), mask=False)
        n = self.time_shift
        # Padding is at the end, so a real target frame t + n implies a real input frame t.
        real_target = ~padding_mask[:, n:]
        features = net_output["x"][:, :-n][real_target]
        targets = source[:, n:][real_target]
        predicted = model.predicted_frames(features).float()
        loss = (predicted - targets.float()).abs().sum()
        count = int(real_target.sum())
        logging_output = {
            "loss": loss.item(),
            "sample_size": count,
            "ntokens": sample["ntokens"],
            "nsentences": sample["nsentences"],
            "count_values": count * source.size(-1),
        }
        return loss, count, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs: List[Dict]) -> None:
        """Log the L1 per predicted frame (``loss``, summed over dimensions) and per value (``l1``)."""

        def total(key: str) -> float:
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1), sample_size, round=3)
        values = total("count_values")
        metrics.log_scalar("l1", total("loss") / max(values, 1), values, round=4)
        metrics.log_scalar("count_frames", sample_size, round=0)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Every logged value is a sum, so fairseq can all-reduce instead of all-gather."""
        return True
