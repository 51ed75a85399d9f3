"""The ``hard_label_masked_ce`` criterion: cross-entropy on k-means ids of masked frames."""

import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass

from melhubert_fairseq.errors import InputError

#: The name fairseq registers the criterion under (``criterion._name``).
CRITERION_NAME = "hard_label_masked_ce"


@dataclass
class HardLabelMaskedCeConfig(FairseqDataclass):
    """Weights of the masked and unmasked prediction losses."""

    pred_masked_weight: float = field(default=1.0, metadata={"help": "weight of the loss on masked frames"})
    pred_nomask_weight: float = field(
        default=0.0, metadata={"help": "weight of the loss on unmasked frames (0 = not computed)"}
    )


@register_criterion(CRITERION_NAME, dataclass=HardLabelMaskedCeConfig)
class HardLabelMaskedCe(FairseqCriterion):
    """Plain cross-entropy of ``final_proj`` logits against hard cluster ids.

    Loss is summed over predicted frames (masked, plus unmasked when weighted);
    ``sample_size`` is the number of predicted frames, so fairseq's gradient
    normalisation gives the per-frame mean.
    """

    #: The task must give k-means labels (``task.labels``) for this criterion.
    needs_labels = True

    def __init__(self, task, pred_masked_weight: float, pred_nomask_weight: float) -> None:
        super().__init__(task)
        self.pred_masked_weight = pred_masked_weight
        self.pred_nomask_weight = pred_nomask_weight

    def frame_loss(self, model, features: torch.Tensor, targets: torch.Tensor):
        """Summed CE (fp32) and number of correct predictions on the selected frames."""
        if getattr(model, "final_proj", True) is None:
            raise InputError(
                f"model.prediction_head={model.cfg.prediction_head}: criterion hard_label_masked_ce predicts k-means ids "
                "through model.prediction_head=cluster_ids"
            )
        # Logits in fp32: the softmax over 512 classes is where fp16 overflows.
        logits = model.cluster_logits(features).float()
        loss = F.cross_entropy(logits, targets, reduction="sum")
        with torch.no_grad():
            correct = (logits.argmax(-1) == targets).sum()
        return loss, correct

    def forward(self, model, sample: Dict, reduce: bool = True):
        """Compute the loss for ``sample``; returns (loss, sample_size, logging_output)."""
        net_output = model(**sample["net_input"])
        x = net_output["x"]
        real = ~sample["net_input"]["padding_mask"]
        masked = net_output["mask_indices"]
        masked = real & masked if masked is not None else torch.zeros_like(real)
        unmasked = real & ~masked
        targets = sample["target"]

        loss = x.new_zeros((), dtype=torch.float32)
        logging_output = {"ntokens": sample["ntokens"], "nsentences": sample["nsentences"]}
        sample_size = 0
        for name, selection, weight in (("m", masked, self.pred_masked_weight), ("u", unmasked, self.pred_nomask_weight)):
            count = int(selection.sum())
            logging_output[f"count_{name}"] = count
            logging_output[f"correct_{name}"] = 0
            logging_output[f"loss_{name}"] = 0.0
            if weight <= 0 or count == 0:
                continue
            part_loss, correct = self.frame_loss(model, x[selection], targets[selection])
            loss = loss + weight * part_loss
            sample_size += count
            logging_output[f"correct_{name}"] = int(correct)
            logging_output[f"loss_{name}"] = part_loss.item()
        logging_output["loss"] = loss.item()
        logging_output["sample_size"] = sample_size
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs: List[Dict]) -> None:
        """Aggregate loss (in bits per frame, as fairseq logs) and accuracies across workers."""

        def total(key: str) -> float:
            return sum(log.get(key, 0) for log in logging_outputs)

        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1) / math.log(2), sample_size, round=3)
        for name in ("m", "u"):
            count = total(f"count_{name}")
            metrics.log_scalar(f"count_{name}", count, round=0)
            if count and total(f"loss_{name}") > 0:
                metrics.log_scalar(f"loss_{name}", total(f"loss_{name}") / count / math.log(2), count, round=3)
            if count and (name == "m" or total(f"loss_{name}") > 0):
                metrics.log_scalar(f"acc_{name}", total(f"correct_{name}") / count, count, round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """Every logged value is a sum, so fairseq can all-reduce instead of all-gather."""
        return True
