"""Waveform -> Kaldi fbank inside the model: accuracy against melhubert-wav-to-fbank and speed, side by side.

Reference: ``compute_fbank`` (kaldi-native-fbank, C++, one utterance at a
time), which wrote the training features. Candidates, all on the same padded
batches of the bundled real speech (demo/corpus), same process, interleaved:

* ``ours``: :class:`KaldiFbank` (float32 FFT, float64 mel sum, constants
  built per device);
* ``ours, float32 mel sum``: the mel sum in float32, as a plain float32 buffer
  would give (on GPUs with TF32 matmuls on it would be rounded further);
* ``ours, bf16 constants``: window and mel matrix rounded to bf16, what
  ``model.bfloat16()`` would do to them if they were buffers;
* ``DFT as one float64 matmul``: DC removal, pre-emphasis, window and the real
  DFT folded into one (400, 514) float64 matrix (the alternative to the FFT);
* ``lhotse Wav2LogFilterBank`` (hamming, snip_edges, 40 bins) when lhotse imports.

Prints max and mean |difference| to the reference (log-Mel units) and time as
a multiple of real time and of the reference's.

    python benchmarks/bench_waveform_frontend.py [--seconds 120] [--batch 8] [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speed_common import RESULTS_DIR, save_text  # noqa: E402

from melhubert_fairseq.data.fbank import compute_fbank, load_audio  # noqa: E402
from melhubert_fairseq.models.waveform_frontend import KaldiFbank, collate_waveforms  # noqa: E402
from melhubert_fairseq.data.audio_manifest import list_audio_dir  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def variant_fbank(fbank: KaldiFbank, device: torch.device, mel_dtype: torch.dtype, round_to: torch.dtype):
    """:class:`KaldiFbank`'s steps with its constants rounded to ``round_to`` and the mel sum in ``mel_dtype``."""
    window, mel = (c.to(round_to).to(c.dtype) for c in fbank.constants(device))

    def run(batch: torch.Tensor) -> torch.Tensor:
        frames = (batch * 32768.0).unfold(-1, fbank.window_samples, fbank.shift_samples)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        frames = frames - fbank.preemph_coeff * torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        spectrum = torch.fft.rfft(frames * window, n=fbank.fft_size)
        power = spectrum.real.square() + spectrum.imag.square()
        return torch.matmul(power.to(mel_dtype), mel.to(mel_dtype)).clamp_min(fbank.log_floor).log().float()

    return run


def dft_matmul_fbank(fbank: KaldiFbank, device: torch.device):
    """DC removal, pre-emphasis, window and real DFT as one float64 (window, 2 x bins) matrix product."""
    size, bins = fbank.window_samples, fbank.fft_size // 2 + 1
    identity = np.eye(size)
    dc = identity - 1.0 / size
    preemphasis = identity - fbank.preemph_coeff * np.eye(size, k=1)  # y = x @ P, Kaldi's y[0] = (1 - c) x[0]
    preemphasis[0, 0] -= fbank.preemph_coeff
    angles = 2.0 * np.pi * np.outer(np.arange(size), np.arange(bins)) / fbank.fft_size
    window, mel = fbank.constants(device)
    dft = np.concatenate([np.cos(angles), -np.sin(angles)], axis=1) * window.double().cpu().numpy()[:, None]
    to_spectrum = torch.from_numpy(dc @ preemphasis @ dft).to(device)

    def run(batch: torch.Tensor) -> torch.Tensor:
        spectrum = torch.matmul((batch.double() * 32768.0).unfold(-1, size, fbank.shift_samples), to_spectrum)
        real, imaginary = spectrum.chunk(2, dim=-1)
        return torch.matmul(real.square() + imaginary.square(), mel).clamp_min(fbank.log_floor).log().float()

    return run


def lhotse_fbank(device: torch.device):
    """lhotse's torch Kaldi fbank with melhubert-wav-to-fbank's options, or None when lhotse does not import."""
    try:
        from lhotse.features.kaldi.layers import Wav2LogFilterBank
    except ImportError:
        return None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lhotse warns that snip_edges=True is unusual for lhotse
        module = Wav2LogFilterBank(
            sampling_rate=16000, window_type="hamming", snip_edges=True, num_filters=40, low_freq=20.0, high_freq=0.0
        ).to(device)
    return lambda batch: module(batch * 32768.0)


def main(argv=None) -> None:
    """Run every method on the same audio, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120.0, help="seconds of demo-corpus speech to use")
    parser.add_argument("--batch", type=int, default=8, help="utterances per padded batch for the torch methods")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per method (round-robin); the fastest counts")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (kaldi-native-fbank uses one)")
    parser.add_argument("--device", default="cpu", help="device of the torch methods")
    parser.add_argument("--results-dir", default=RESULTS_DIR, help="where waveform_frontend_<device>.md is written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()

    waveforms, total = [], 0
    for item in list_audio_dir(os.path.join(REPO, "demo", "corpus")):
        if total >= args.seconds * 16000:
            break
        waveforms.append(load_audio(item.full_path))
        total += len(waveforms[-1])
    audio_seconds = total / 16000
    batches = [
        collate_waveforms([torch.from_numpy(w) for w in waveforms[i : i + args.batch]])[0].to(device)
        for i in range(0, len(waveforms), args.batch)
    ]
    fbank = KaldiFbank()
    methods = {
        "ours: float32 FFT, float64 mel sum": fbank,
        "ours, float32 mel sum": variant_fbank(fbank, device, torch.float32, torch.float32),
        "ours, bf16 constants": variant_fbank(fbank, device, torch.float64, torch.bfloat16),
        "DFT as one float64 matmul": dft_matmul_fbank(fbank, device),
    }
    lhotse = lhotse_fbank(device)
    if lhotse is not None:
        methods["lhotse Wav2LogFilterBank"] = lhotse

    def run_torch(method):
        with torch.no_grad():
            outputs = [method(batch) for batch in batches]
        if device.type == "cuda":
            torch.cuda.synchronize()
        return outputs

    reference_name = "kaldi-native-fbank (reference)"
    runners = {reference_name: lambda: [compute_fbank(w) for w in waveforms]}
    runners.update({name: (lambda m=method: run_torch(m)) for name, method in methods.items()})
    for runner in runners.values():  # warm up (allocations, one-off constants)
        runner()
    best = {name: float("inf") for name in runners}
    outputs = {}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            begin = time.perf_counter()
            outputs[name] = runner()
            best[name] = min(best[name], time.perf_counter() - begin)

    reference = outputs[reference_name]
    rows = [
        "| method | max abs diff | mean abs diff | seconds | x real time | time / reference |",
        "|---|---|---|---|---|---|",
    ]
    for name in runners:
        if name == reference_name:
            diffs = [np.zeros(1)]
        else:
            per_utt = [b.float().cpu().numpy()[row] for b in outputs[name] for row in range(b.shape[0])]
            diffs = [np.abs(ours[: len(ref)] - ref) for ours, ref in zip(per_utt, reference)]
        max_diff = max(float(d.max()) for d in diffs)
        mean_diff = float(np.mean([d.mean() for d in diffs]))
        rows.append(
            f"| {name} | {max_diff:.2e} | {mean_diff:.2e} | {best[name]:.3f} | {audio_seconds / best[name]:.0f}x "
            f"| {best[name] / best[reference_name]:.2f}x |"
        )
    if lhotse is None:
        rows.append("| lhotse Wav2LogFilterBank | not importable here | | | | |")
    header = (
        f"Waveform -> 40-dim Kaldi fbank, {len(waveforms)} utterances ({audio_seconds:.1f} s of demo-corpus speech), "
        f"torch methods in padded batches of {args.batch} on {device} ({platform.processor() or 'cpu'}, "
        f"{args.threads} thread(s)), torch {torch.__version__}, best of {args.repeats}"
    )
    report = header + "\n\n" + "\n".join(rows)
    print(report)
    save_text(os.path.join(args.results_dir, f"waveform_frontend_{device.type}.md"), report)
    print(f"done: {len(runners)} methods x {args.repeats} rounds in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
