"""Waveform -> 40-dim Kaldi fbank throughput, as a multiple of real time on one core.

Ours: ``melhubert_fairseq.data.fbank.compute_fbank`` (kaldi-native-fbank, C++).
Baseline: the same Kaldi computation (DC removal, pre-emphasis, Hamming
window, 512-point power spectrum, 40 Kaldi mel triangles, log) written the
straightforward way, one numpy FFT per frame, as python_speech_features-style
code does. A third row runs the same numpy code vectorised over frames, for
reference. All run on the same real speech (the bundled demo corpus) in the
same process; the script prints how far they differ and the speed ratio.

    python benchmarks/bench_wav_to_fbank.py [--seconds 60] [--repeats 5]
"""
import argparse
import glob
import os
import time

# "Per core": keep BLAS single-threaded, else its thread hand-offs on small
# per-utterance matrices dominate the numpy rows on a busy 2-core machine.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings)

from melhubert_fairseq.data.fbank import compute_fbank, load_audio  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kaldi_mel_banks(num_bins=40, fft_size=512, sample_rate=16000, low_hz=20.0):
    """Kaldi's triangular mel filters, built bin by bin."""
    def to_mel(hz):
        return 1127.0 * np.log(1.0 + hz / 700.0)

    mel_low, mel_high = to_mel(low_hz), to_mel(sample_rate / 2)
    step = (mel_high - mel_low) / (num_bins + 1)
    banks = np.zeros((num_bins, fft_size // 2))
    for b in range(num_bins):
        left, center, right = mel_low + b * step, mel_low + (b + 1) * step, mel_low + (b + 2) * step
        for k in range(fft_size // 2):
            mel = to_mel(k * sample_rate / fft_size)
            if left < mel < right:
                banks[b, k] = (mel - left) / (center - left) if mel <= center else (right - mel) / (right - center)
    return banks


def baseline_fbank(waveform, banks, window=np.hamming(400)):
    """Per-frame numpy Kaldi fbank of a float waveform in [-1, 1]."""
    samples = waveform.astype(np.float64) * 32768.0
    num_frames = 1 + (len(samples) - 400) // 160
    out = np.empty((num_frames, banks.shape[0]), dtype=np.float32)
    for i in range(num_frames):
        frame = samples[i * 160 : i * 160 + 400].copy()
        frame -= frame.mean()
        frame[1:] -= 0.97 * frame[:-1].copy()
        frame[0] -= 0.97 * frame[0]
        spectrum = np.fft.rfft(frame * window, n=512)[:256]
        energies = banks @ (spectrum.real ** 2 + spectrum.imag ** 2)
        out[i] = np.log(np.maximum(energies, np.finfo(np.float32).eps))
    return out


def vectorised_fbank(waveform, banks, window=np.hamming(400)):
    """The same computation on all frames at once (one batched FFT), for reference."""
    samples = waveform.astype(np.float32) * np.float32(32768.0)
    num_frames = 1 + (len(samples) - 400) // 160
    frames = np.lib.stride_tricks.sliding_window_view(samples, 400)[::160][:num_frames]
    frames = frames - frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= 0.97 * frames[:, :-1].copy()
    frames[:, 0] *= 0.03
    spectrum = np.fft.rfft(frames * window.astype(np.float32), n=512, axis=1)[:, :256]
    energies = (spectrum.real ** 2 + spectrum.imag ** 2) @ banks.T.astype(np.float32)
    return np.log(np.maximum(energies, np.finfo(np.float32).eps))


def interleaved_best_times(methods, repeats):
    """Fastest of ``repeats`` runs of each method, run round-robin so background load hits all alike."""
    best = {name: float("inf") for name in methods}
    results = {}
    for _ in range(repeats):
        for name, func in methods.items():
            start = time.perf_counter()
            results[name] = func()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def main():
    """Time ours and the baseline on the same audio and print the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of demo-corpus speech to use")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method (round-robin); the fastest counts")
    args = parser.parse_args()

    paths = sorted(glob.glob(os.path.join(REPO, "demo", "corpus", "*", "*.flac")))
    waveforms, total = [], 0
    for path in paths:
        if total >= args.seconds * 16000:
            break
        waveforms.append(load_audio(path))
        total += len(waveforms[-1])
    audio_seconds = total / 16000
    banks = kaldi_mel_banks()

    methods = {
        "ours": lambda: [compute_fbank(w, 16000) for w in waveforms],
        "ours+decode": lambda: [compute_fbank(load_audio(p), 16000) for p in paths[: len(waveforms)]],
        "baseline": lambda: [baseline_fbank(w, banks) for w in waveforms],
        "vectorised": lambda: [vectorised_fbank(w, banks) for w in waveforms],
    }
    best, results = interleaved_best_times(methods, args.repeats)
    ours_s, load_s, base_s, vec_s = (best[name] for name in methods)
    ours, base, vec = results["ours"], results["baseline"], results["vectorised"]
    max_diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, base))
    vec_diff = max(float(np.abs(a - b).max()) for a, b in zip(ours, vec))

    print(f"{len(waveforms)} utterances, {audio_seconds:.1f} s of speech, one process, best of {args.repeats}")
    print(f"ours (kaldi-native-fbank):        {ours_s:.3f} s = {audio_seconds / ours_s:7.0f}x real time")
    print(f"ours incl. FLAC decode:           {load_s:.3f} s = {audio_seconds / load_s:7.0f}x real time")
    print(f"baseline (numpy, FFT per frame):  {base_s:.3f} s = {audio_seconds / base_s:7.0f}x real time")
    print(f"numpy vectorised over frames:     {vec_s:.3f} s = {audio_seconds / vec_s:7.0f}x real time"
          f"   (max |difference| to ours {vec_diff:.2e})")
    print(f"speed-up ours / baseline: {base_s / ours_s:.1f}x   (max |difference| {max_diff:.2e} log-energy)")


if __name__ == "__main__":
    main()
