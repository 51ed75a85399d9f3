"""Shared pieces of the speed benchmarks (bench_train_step.py, bench_inference.py).

Everything the two benchmarks compare is built here from the real code:

* Mel-HuBERT (``mel_hubert``) from the model section of ``config/stage1.yaml``,
  at 10, 20 or 40 ms frames (``stack_frames`` 1, 2, 4);
* the "straightforward implementation": the same model with every ``self_attn``
  swapped for fairseq's ``MultiheadAttention`` running its Python multi-head
  attention (bmm + fp32 softmax + dropout + bmm), torch's ``nn.Dropout`` in place
  of our CPU dropout and fairseq's ``make_conv_pos`` (``nn.Conv1d``) positional conv, same weights;
* fairseq's HuBERT Base (``fairseq.models.hubert.HubertModel``) as its
  LibriSpeech Base recipe configures it (conv waveform front end, 12 x 768,
  label_rate 50) and its ``hubert`` criterion.

All models see the same audio: HuBERT the 16 kHz waveform, Mel-HuBERT the
Kaldi fbank of that waveform (computed once, outside the timed region, as the
data loader would). Timing interleaves the cases round by round so machine
load drifts hit all of them alike; the reported figure is the median.
"""
from __future__ import annotations

import glob
import math
import os
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from melhubert_fairseq.criterions.hard_label_masked_ce import HardLabelMaskedCe
from melhubert_fairseq.data.fbank import compute_fbank, load_audio
from melhubert_fairseq.data.features import FBANK_SAMPLE_RATE, stack_frames
from melhubert_fairseq.models.components import Dropout, SelfAttention
from melhubert_fairseq.models.mel_hubert import MelHubertConfig, MelHubertModel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1_CONFIG = os.path.join(REPO_ROOT, "config", "stage1.yaml")
DEMO_CORPUS = os.path.join(REPO_ROOT, "demo", "corpus")
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
NUM_CLASSES = 512
# fp32: no autocast; bf16 / fp16: torch.autocast; bf16w / fp16w: the whole model in bf16 / fp16 with
# fp32 master weights in the optimizer, what fairseq's common.bf16 / common.fp16 do (and the only way
# fairseq's HuBERT runs in half precision).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "bf16w": None, "fp16w": None}
WEIGHT_DTYPES = {"bf16w": torch.bfloat16, "fp16w": torch.float16}
#: fairseq's common.fp16_init_scale: the loss scale its FP16Optimizer starts from.
FP16_INIT_SCALE = 128.0


# --- inputs ------------------------------------------------------------------------------------


def load_benchmark_audio(num_utterances: int, seconds: float) -> List[np.ndarray]:
    """``num_utterances`` 16 kHz waveforms of exactly ``seconds`` s, made by joining demo corpus files.

    Falls back to seeded noise when the demo corpus is absent (speed does not depend on content).
    """
    files = sorted(glob.glob(os.path.join(DEMO_CORPUS, "*", "*.flac")))
    samples = int(round(seconds * FBANK_SAMPLE_RATE))
    rng = np.random.default_rng(0)
    waves = []
    cursor = 0
    for _ in range(num_utterances):
        if not files:
            waves.append((0.1 * rng.standard_normal(samples)).astype(np.float32))
            continue
        pieces, have = [], 0
        while have < samples:
            piece = load_audio(files[cursor % len(files)])
            cursor += 1
            pieces.append(piece)
            have += len(piece)
        waves.append(np.concatenate(pieces)[:samples].astype(np.float32))
    return waves


def fbank_inputs(waves: Sequence[np.ndarray], stack: int) -> torch.Tensor:
    """(B, T, 40 * stack) normalised, stacked Kaldi fbank of ``waves`` (all the same length)."""
    feats = [compute_fbank(w) for w in waves]
    frames = np.concatenate(feats)
    mean, std = frames.mean(0), frames.std(0) + 1e-5
    stacked = [stack_frames((f - mean) / std, stack) for f in feats]
    length = min(len(s) for s in stacked)
    return torch.from_numpy(np.stack([s[:length] for s in stacked]).astype(np.float32))


# --- models ------------------------------------------------------------------------------------


def mel_hubert_config(stack: int, **overrides) -> MelHubertConfig:
    """The Base model of config/stage1.yaml at ``stack`` fbank frames per model frame."""
    stage1 = OmegaConf.load(STAGE1_CONFIG)
    model_section = OmegaConf.to_container(stage1["model"])
    model_section.pop("_name", None)
    model_section.update(feat_dim=stage1.task.feat_dim, stack_frames=stack, num_classes=NUM_CLASSES, mask_seed=1)
    model_section.update(overrides)
    return MelHubertConfig(**model_section)


def build_mel_hubert(stack: int, **overrides) -> MelHubertModel:
    """Mel-HuBERT Base (stage1.yaml) at 10/20/40 ms for ``stack`` 1/2/4."""
    return MelHubertModel(mel_hubert_config(stack, **overrides))


class PythonMultiheadAttention(nn.Module):
    """fairseq's ``MultiheadAttention`` behind our ``SelfAttention`` interface, same weights.

    fairseq hands attention to ``F.multi_head_attention_forward`` (torch's fused
    path, itself SDPA in torch 2) unless ``skip_embed_dim_check`` is set; setting
    it runs fairseq's own Python implementation: q scaling, bmm, fp32 softmax,
    dropout, bmm, the "straightforward implementation" of the benchmark.
    """

    def __init__(self, ours: SelfAttention) -> None:
        super().__init__()
        from fairseq.modules import MultiheadAttention

        embed_dim = ours.q_proj.in_features
        self.attention = MultiheadAttention(embed_dim, ours.num_heads, dropout=ours.dropout, self_attention=True)
        self.attention.skip_embed_dim_check = True
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            getattr(self.attention, name).load_state_dict(getattr(ours, name).state_dict())

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        key_padding_mask = None
        if attn_mask is not None:
            if attn_mask.size(-2) != 1:
                raise ValueError("PythonMultiheadAttention takes padding masks only (no causal attention)")
            key_padding_mask = ~attn_mask[:, 0, 0, :]
        time_major = x.transpose(0, 1)
        out, _ = self.attention(time_major, time_major, time_major, key_padding_mask=key_padding_mask, need_weights=False)
        return out.transpose(0, 1)


def straightforward_copy(model: MelHubertModel) -> MelHubertModel:
    """A copy of ``model`` on the unoptimised path: fairseq's Python attention, torch's
    ``nn.Dropout`` and fairseq's positional conv (``nn.Conv1d``);
    same weights, same function."""
    from fairseq.models.wav2vec.wav2vec2 import make_conv_pos

    baseline = MelHubertModel(model.cfg)
    baseline.load_state_dict(model.state_dict())
    cfg = model.cfg
    if cfg.pos_conv_depth == 1 and str(cfg.attention_type) != "causal":
        plain_conv = make_conv_pos(cfg.encoder_embed_dim, cfg.conv_pos, cfg.conv_pos_groups)
        plain_conv.load_state_dict(baseline.encoder.pos_conv.state_dict())
        baseline.encoder.pos_conv = plain_conv
    for layer in baseline.encoder.layers:
        layer.self_attn = PythonMultiheadAttention(layer.self_attn)
    for parent in baseline.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, Dropout):
                setattr(parent, name, nn.Dropout(child.p))
    return baseline.to(next(model.parameters()).device)


class _FakeHubertTask:
    """The two attributes HubertCriterion reads from a task."""

    target_dictionary = None
    source_dictionary = None


def build_hubert_base(num_classes: int = NUM_CLASSES, **overrides):
    """fairseq's HuBERT Base as examples/hubert/config/pretrain/hubert_base_librispeech.yaml sets it up.

    ``overrides`` replace HubertConfig fields (the encoder sizes share Mel-HuBERT's names).
    """
    from fairseq.data import Dictionary
    from fairseq.models.hubert import HubertConfig, HubertModel
    from fairseq.tasks.hubert_pretraining import HubertPretrainingConfig

    settings = dict(
        label_rate=50,
        extractor_mode="default",
        encoder_layers=12,
        encoder_embed_dim=768,
        encoder_ffn_embed_dim=3072,
        encoder_attention_heads=12,
        mask_prob=0.80,
        dropout=0.1,
        attention_dropout=0.1,
        activation_dropout=0.0,
        encoder_layerdrop=0.05,
        dropout_input=0.1,
        dropout_features=0.1,
        feature_grad_mult=0.1,
        final_dim=256,
        untie_final_proj=True,
        skip_masked=False,
        skip_nomask=False,
    )
    settings.update(overrides)
    cfg = HubertConfig(**settings)
    task_cfg = HubertPretrainingConfig(label_rate=50, sample_rate=FBANK_SAMPLE_RATE, labels=["km"])
    dictionary = Dictionary()
    for cluster in range(num_classes):
        dictionary.add_symbol(str(cluster))
    return HubertModel(cfg, task_cfg, [dictionary])


# --- one step ----------------------------------------------------------------------------------


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


# --- timing and report -------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(cases: Sequence[Case], repeats: int, warmup: int, device: torch.device, log=print) -> Dict[str, List[float]]:
    """Seconds per step of every case, run round-robin ``repeats`` times after ``warmup`` rounds."""
    times: Dict[str, List[float]] = {case.name: [] for case in cases}
    for round_index in range(warmup + repeats):
        this_round = {}
        for case in cases:
            synchronize(device)
            start = time.perf_counter()
            case.step()
            synchronize(device)
            this_round[case.name] = time.perf_counter() - start
            if round_index >= warmup:
                times[case.name].append(this_round[case.name])
        label = "warm-up" if round_index < warmup else f"round {round_index - warmup + 1}/{repeats}"
        log(f"  {label}: " + ", ".join(f"{name} {seconds:.2f}s" for name, seconds in this_round.items()))
    return times


def format_table(cases: Sequence[Case], times: Dict[str, List[float]], targets: Dict[str, float]) -> str:
    """Markdown table: median (and min) step time, audio-seconds per wall-second and ratios, all from medians.

    ``targets`` maps a model name (``ours_20ms``) to the target text shown in its rows.
    """

    def speed(case: Case) -> float:
        return case.audio_seconds / statistics.median(times[case.name])

    def reference(family: str, precision: str) -> Optional[Case]:
        return next((c for c in cases if c.family == family and c.precision == precision), None)

    hubert_fp32 = reference("hubert", "fp32")
    plain_fp32 = reference("straightforward", "fp32")
    header = (
        "| case | precision | median s/step | min s/step | audio-s per s | x HuBERT fp32 "
        "| x HuBERT same precision | x straightforward fp32 | target |\n|---|---|---|---|---|---|---|---|---|"
    )
    rows = [header]
    for case in cases:

        def ratio(ref: Optional[Case]) -> str:
            return f"{speed(case) / speed(ref):.2f}" if ref is not None else "-"

        target = targets.get(case.name.split("@")[0], "")
        rows.append(
            f"| {case.name} | {case.precision} | {statistics.median(times[case.name]):.3f} "
            f"| {min(times[case.name]):.3f} | {speed(case):.2f} "
            f"| {ratio(hubert_fp32)} | {ratio(reference('hubert', case.precision))} | {ratio(plain_fp32)} | {target} |"
        )
    return "\n".join(rows)


def save_text(path: str, text: str) -> None:
    """Write a results file atomically (replacing the previous run's)."""
    from melhubert_fairseq.atomic_output import atomic_output

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_output(path, overwrite=True) as handle:
        handle.write(text if text.endswith("\n") else text + "\n")


def add_common_arguments(parser) -> None:
    """Flags shared by the train-step and inference benchmarks."""
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU rows run only where a GPU exists)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for the CPU run")
    parser.add_argument("--utterances", type=int, default=2, help="utterances per batch")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each utterance in seconds")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported); more = steadier")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument(
        "--precisions",
        default=None,
        help="comma list of fp32, bf16, fp16 (autocast), bf16w / fp16w (bf16 / fp16 model, fp32 master weights: "
        "fairseq's common.bf16 / common.fp16); default cpu: fp32,bf16,bf16w; cuda: fp32,bf16,bf16w,fp16,fp16w",
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="comma list of models: hubert, straightforward_20ms, ours_20ms, ours_10ms, ours_40ms (default: all)",
    )
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where the table (and profile) are written")


ALL_MODELS = ("hubert", "straightforward_20ms", "ours_20ms", "ours_10ms", "ours_40ms")


def same_weights_copy(name: str, model: nn.Module, size_overrides: Optional[Dict] = None) -> nn.Module:
    """A new instance of case ``name``'s model holding ``model``'s weights (deepcopy fails on weight-normed convs)."""
    twin = build_hubert_base(**(size_overrides or {})) if name == "hubert" else MelHubertModel(model.cfg)
    twin.load_state_dict(model.state_dict())
    return twin


def build_cases(args, mode: str, log=print) -> List[Case]:
    """Build every requested model once and a Case per (model, precision); ``mode`` is train or infer.

    ``args.size_overrides`` (optional dict of encoder sizes, e.g. ``encoder_layers``) shrinks
    every model alike and ``args.hubert_overrides`` (optional) HuBERT's other fields (its conv
    front end), for smoke runs; absent = the Base models.
    """
    device = torch.device(args.device)
    sizes = dict(getattr(args, "size_overrides", None) or {})
    hubert_sizes = {**sizes, **(getattr(args, "hubert_overrides", None) or {})}
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    precisions = (args.precisions or ("fp32,bf16,bf16w" if device.type == "cpu" else "fp32,bf16,bf16w,fp16,fp16w")).split(",")
    for precision in precisions:
        if precision not in PRECISIONS:
            raise SystemExit(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    models = (args.cases or ",".join(ALL_MODELS)).split(",")
    for name in models:
        if name not in ALL_MODELS:
            raise SystemExit(f"unknown case {name!r}: use {', '.join(ALL_MODELS)}")
    waves_np = load_benchmark_audio(args.utterances, args.seconds)
    waves = torch.from_numpy(np.stack(waves_np))
    audio_seconds = args.utterances * args.seconds
    torch.manual_seed(0)
    cases: List[Case] = []
    built: Dict[str, nn.Module] = {}
    for name in models:
        if name == "hubert":
            model = build_hubert_base(**hubert_sizes).to(device)
        elif name == "straightforward_20ms":
            if "ours_20ms" not in built:
                built["ours_20ms"] = build_mel_hubert(2, **sizes).to(device)
            model = straightforward_copy(built["ours_20ms"])
        else:
            stack = {"ours_10ms": 1, "ours_20ms": 2, "ours_40ms": 4}[name]
            model = built.get(name) or build_mel_hubert(stack, **sizes).to(device)
        built[name] = model
        log(f"built {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
        # The fp32 and autocast precisions of one model share its weights and Adam state;
        # only the autocast dtype differs between their steps. bf16w / fp16w get their own
        # bf16 / fp16 copy and fp32 master weights below.
        recipe = "hubert" if name == "hubert" else "mel_hubert"
        optimizer = make_optimizer(model, recipe) if mode == "train" else None
        for precision in precisions:
            if name == "hubert" and precision in ("bf16", "fp16"):
                # fairseq's HubertModel.apply_mask does x[mask] = mask_emb (fp32) into the
                # autocast (bf16/fp16) features: index_put dtype error. fairseq itself runs
                # HuBERT in half precision by converting the whole model (--fp16): the bf16w rows.
                log(f"skipping hubert@{precision}: fairseq's HubertModel fails under torch.autocast")
                continue
            if name.startswith("straightforward") and precision != "fp32":
                continue  # the unoptimised reference is fp32 by definition
            if name == "hubert":
                family, inputs, train_step = "hubert", waves, hubert_train_step
            else:
                family = "straightforward" if name.startswith("straightforward") else "ours"
                inputs, train_step = fbank_inputs(waves_np, model.cfg.stack_frames), mel_hubert_train_step
            run_model, run_optimizer, master = model, optimizer, None
            if precision in WEIGHT_DTYPES:
                dtype = WEIGHT_DTYPES[precision]
                run_model, inputs = same_weights_copy(name, model, hubert_sizes).to(device, dtype), inputs.to(dtype)
                if mode == "train":
                    master = [p.detach().float().clone() for p in run_model.parameters() if p.requires_grad]
                    run_optimizer = make_optimizer_for(master, recipe)

            def make_step(batch: int, model=run_model, optimizer=run_optimizer, inputs=inputs, master=master,
                          precision=precision, train_step=train_step) -> Callable[[], None]:
                batch_inputs = tile_batch(inputs, batch)
                if mode == "train":
                    return train_step(model, optimizer, batch_inputs, device, precision, master_params=master)
                return inference_step(model, batch_inputs, device, precision)

            cases.append(
                Case(f"{name}@{precision}", precision, audio_seconds, make_step(args.utterances), family,
                     model=run_model, resize=make_step, batch=args.utterances)
            )
    return cases


def tile_batch(inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """``inputs`` (B, ...) repeated along the batch to ``batch`` rows (speed does not depend on content)."""
    if batch == inputs.size(0):
        return inputs
    repeats = -(-batch // inputs.size(0))
    return inputs.repeat(repeats, *([1] * (inputs.dim() - 1)))[:batch]


def run_cases(args, mode: str, title: str):
    """Build and time every case of ``mode`` (train or infer); return (cases, times, header line)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible to torch")
    cases = build_cases(args, mode)
    print(f"timing {len(cases)} cases, {args.warmup} warm-up + {args.repeats} timed rounds")
    times = time_interleaved(cases, args.repeats, args.warmup, device)
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    header = (
        f"{title}, {args.utterances} x {args.seconds:g} s audio, {args.device} ({where}), "
        f"torch {torch.__version__}, median of {args.repeats} interleaved rounds"
    )
    return cases, times, header


def results_path(args, stem: str, extension: str = "md") -> str:
    """``{results_dir}/{stem}_{cpu|cuda}.{extension}``."""
    return os.path.join(args.results_dir, f"{stem}_{torch.device(args.device).type}.{extension}")


def target_lines(cases: Sequence[Case], times: Dict[str, List[float]], targets: Dict[str, str]) -> List[str]:
    """One line per case of a targeted model: its median speed over HuBERT fp32 (and the straightforward fp32 model)."""

    def speed(name: str) -> float:
        case = next(c for c in cases if c.name == name)
        return case.audio_seconds / statistics.median(times[name])

    lines = []
    for model, target in targets.items():
        for case in cases:
            if not case.name.startswith(model + "@"):
                continue
            parts = []
            if "hubert@fp32" in times:
                parts.append(f"{speed(case.name) / speed('hubert@fp32'):.2f}x HuBERT fp32")
            if case.precision != "fp32" and f"hubert@{case.precision}" in times:
                same = speed(case.name) / speed(f"hubert@{case.precision}")
                parts.append(f"{same:.2f}x HuBERT {case.precision}")
            if "straightforward" in target and "straightforward_20ms@fp32" in times:
                parts.append(f"{speed(case.name) / speed('straightforward_20ms@fp32'):.2f}x straightforward fp32")
            lines.append(f"{case.name}: " + ", ".join(parts) + f"  (target {target})")
    return lines
