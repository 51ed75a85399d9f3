"""One step of each benchmarked model: a training step through its criterion and optimizer, or feature extraction.

Precisions: fp32; bf16 / fp16 = torch.autocast over fp32 weights; bf16w / fp16w = the whole model in bf16 / fp16
with fp32 master weights in Adam, what fairseq's common.bf16 / common.fp16 do.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn

from melhubert_fairseq.criterions.hard_label_masked_ce import HardLabelMaskedCe
from melhubert_fairseq.data.features import FBANK_SAMPLE_RATE
from melhubert_fairseq.models.mel_hubert import MelHubertModel
from speed_models import NUM_CLASSES

# fp32: no autocast; bf16 / fp16: torch.autocast; bf16w / fp16w: the whole model in bf16 / fp16 with
# fp32 master weights in the optimizer, what fairseq's common.bf16 / common.fp16 do (and the only way
# fairseq's HuBERT runs in half precision).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16w": None, "fp16w": None}
WEIGHT_DTYPES = {"bf16w": torch.bfloat16, "fp16w": torch.float16}
#: fairseq's common.fp16_init_scale: the loss scale its FP16Optimizer starts from.
FP16_INIT_SCALE = 128.0


@dataclass
class Case:
    """One row of a benchmark: a model, its inputs and how to run one step on them."""

    name: str
    precision: str
    audio_seconds: float
    step: Callable[[], None]
    family: str  # "hubert", "straightforward" or "ours"
    #: The model the step runs (for clearing its gradients after an out-of-memory step).
    model: Optional[nn.Module] = None
    #: The same step on ``n`` utterances (the inputs tiled), for memory probes.
    resize: Optional[Callable[[int], Callable[[], None]]] = None
    #: Utterances per step.
    batch: int = 1


def autocast_for(device: torch.device, precision: str):
    """``torch.autocast`` context for ``precision`` (fp32: no autocast)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(model: nn.Module, recipe: str):
    """fairseq's own Adam (what fairseq-hydra-train uses off-GPU) with each recipe's settings."""
    return make_optimizer_for(list(model.parameters()), recipe)


def make_optimizer_for(params: List[torch.Tensor], recipe: str):
    """fairseq's Adam over ``params`` with the ``hubert`` (hubert_base_librispeech.yaml) or ``mel_hubert`` (stage1.yaml) settings."""
    from fairseq.optim.adam import Adam

    if recipe == "hubert":
        return Adam(params, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    return Adam(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


class UpdateRunner:
    """What fairseq's trainer does after the loss: backward, grads / sample_size, clip, Adam step.

    With ``master_params`` (bf16w, fp16w) it does what fairseq's FP16Optimizer does for
    common.bf16 / common.fp16: copy the half-precision grads to fp32 master weights,
    step those, copy back; fp16w also scales the loss (fairseq's dynamic loss scale:
    start at 128, halve and skip the update when the gradients overflow).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer,
        device: torch.device,
        precision: str,
        clip_norm: float = 10.0,
        master_params: Optional[List[torch.Tensor]] = None,
    ):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.master_params = master_params
        self.params = master_params if master_params is not None else self.model_params
        self.optimizer = optimizer
        self.clip_norm = clip_norm
        # fp16 needs loss scaling; bf16 has fp32's range and does not.
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.loss_scale = FP16_INIT_SCALE if precision == "fp16w" else 1.0

    def __call__(self, loss: torch.Tensor, sample_size: int) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        if self.master_params is not None:
            for master, param in zip(self.master_params, self.model_params):
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None
        for param in self.params:
            if param.grad is not None:
                param.grad.mul_(1.0 / (max(sample_size, 1) * self.loss_scale))
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.loss_scale != 1.0 and not torch.isfinite(grad_norm):
            self.loss_scale /= 2.0  # fairseq: overflow -> skip this update, halve the scale
        else:
            self.optimizer.step()
        if self.master_params is not None:
            with torch.no_grad():
                for master, param in zip(self.master_params, self.model_params):
                    param.copy_(master)
        for param in self.params:
            param.grad = None


def phase(name: str):
    """Profiler label of one phase of a step (forward+loss, backward+update)."""
    return torch.profiler.record_function(name)


def mel_hubert_train_step(
    model: MelHubertModel, optimizer, source: torch.Tensor, device: torch.device, precision: str, master_params=None
) -> Callable[[], None]:
    """Closure running one training step of ``model`` through our criterion on ``source``."""
    model.train()
    criterion = HardLabelMaskedCe(task=None, pred_masked_weight=1.0, pred_nomask_weight=0.0)
    batch, frames = source.shape[:2]
    generator = torch.Generator().manual_seed(0)
    sample = {
        "net_input": {
            "source": source.to(device),
            "padding_mask": torch.zeros(batch, frames, dtype=torch.bool, device=device),
            "sample_ids": torch.arange(batch, device=device),
        },
        "target": torch.randint(0, NUM_CLASSES, (batch, frames), generator=generator).to(device),
        "ntokens": batch * frames,
        "nsentences": batch,
    }
    update = UpdateRunner(model, optimizer, device, precision, master_params=master_params)

    def step() -> None:
        model.set_num_updates(model.num_updates + 1)  # new masks every step, as in training
        with phase("forward_and_loss"), autocast_for(device, precision):
            loss, sample_size, _ = criterion(model, sample)
        with phase("backward_and_update"):
            update(loss, sample_size)

    return step


class _FakeHubertTask:
    """The two attributes HubertCriterion reads from a task."""

    target_dictionary = None
    source_dictionary = None




def hubert_train_step(
    model, optimizer, waves: torch.Tensor, device: torch.device, precision: str, master_params=None
) -> Callable[[], None]:
    """Closure running one HuBERT Base training step (fairseq's hubert criterion) on ``waves``."""
    from fairseq.criterions.hubert_criterion import HubertCriterion

    model.train()
    criterion = HubertCriterion(_FakeHubertTask(), pred_masked_weight=1.0, pred_nomask_weight=0.0, loss_weights=[10.0])
    batch = waves.size(0)
    label_frames = int(math.ceil(waves.size(1) / FBANK_SAMPLE_RATE * 50))
    generator = torch.Generator().manual_seed(0)
    num_symbols = model.num_classes[0]  # dictionary size: 4 special symbols + clusters
    sample = {
        "id": torch.arange(batch),
        # fairseq's HuBERT dataset always sends a padding mask (all False for equal lengths).
        "net_input": {"source": waves.to(device), "padding_mask": torch.zeros(waves.shape, dtype=torch.bool, device=device)},
        "target_list": [torch.randint(4, num_symbols, (batch, label_frames), generator=generator).to(device)],
    }
    update = UpdateRunner(model, optimizer, device, precision, master_params=master_params)

    def step() -> None:
        with phase("forward_and_loss"), autocast_for(device, precision):
            loss, sample_size, _ = criterion(model, sample)
        with phase("backward_and_update"):
            update(loss, sample_size)

    return step


def inference_step(model: nn.Module, inputs: torch.Tensor, device: torch.device, precision: str):
    """Closure extracting final-layer features (eval, no grad, no masking); HuBERT and Mel-HuBERT alike."""
    model.eval()
    inputs = inputs.to(device)

    def step() -> None:
        with torch.inference_mode(), autocast_for(device, precision):
            model.extract_features(inputs, padding_mask=None, mask=False)

    return step
