"""Timing, tables and cases of the speed benchmarks (bench_train_step.py, bench_inference.py), shared with gpu_check.py.

The models and inputs are built in speed_models.py, one step of each in speed_steps.py. Timing
interleaves the cases round by round so machine load drifts hit all of them alike; the reported
figure is the median.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from melhubert_fairseq.models.mel_hubert import MelHubertModel
from speed_models import (
    REPO_ROOT, build_hubert_base, build_mel_hubert, fbank_inputs, load_benchmark_audio, straightforward_copy,
)
from speed_steps import (
    PRECISIONS, WEIGHT_DTYPES, Case, hubert_train_step, inference_step, make_optimizer, make_optimizer_for,
    mel_hubert_train_step,
)

RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")


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
