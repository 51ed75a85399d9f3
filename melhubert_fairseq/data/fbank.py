"""Waveform -> 40-dim Kaldi log-Mel fbank, exactly as the original Mel-HuBERT computed it.

The original release ran, on 16 kHz audio loaded as float in [-1, 1)::

    torchaudio.compliance.kaldi.fbank(wav * 2**15, num_mel_bins=40,
        sample_frequency=16000, window_type="hamming", frame_length=25, frame_shift=10)

Here the same computation runs in kaldi-native-fbank (Kaldi's own C++ code),
with every option set explicitly to torchaudio's defaults because
kaldi-native-fbank's defaults differ (dither 3e-5, povey window, 23 bins).
torchaudio is never imported.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import kaldi_native_fbank as knf
import numpy as np
import soundfile

from melhubert_fairseq.data.features import (
    FBANK_FRAME_RATE_HZ,
    FBANK_NUM_MEL_BINS,
    FBANK_SAMPLE_RATE,
    FBANK_SHIFT_SAMPLES,
    FBANK_WINDOW_SAMPLES,
    INT16_SCALE,
)
from melhubert_fairseq.errors import InputError, check_regular_file

#: A line of libsndfile's header log where the file is shorter than a chunk's declared size.
_TRUNCATED_CHUNK = re.compile(r"^(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)")


def fbank_options(num_mel_bins: int = FBANK_NUM_MEL_BINS) -> knf.FbankOptions:
    """kaldi-native-fbank options equal to the original ``torchaudio.compliance.kaldi.fbank`` call."""
    opts = knf.FbankOptions()
    frame = opts.frame_opts
    frame.samp_freq = float(FBANK_SAMPLE_RATE)
    frame.frame_shift_ms = 1000.0 / FBANK_FRAME_RATE_HZ
    frame.frame_length_ms = 1000.0 * FBANK_WINDOW_SAMPLES / FBANK_SAMPLE_RATE
    frame.dither = 0.0  # torchaudio's default; Kaldi's (and knf's) default adds noise
    frame.preemph_coeff = 0.97
    frame.remove_dc_offset = True
    frame.window_type = "hamming"  # the original's choice; torchaudio's default is povey
    frame.round_to_power_of_two = True  # 512-point FFT
    frame.blackman_coeff = 0.42
    frame.snip_edges = True  # frames = 1 + (samples - 400) // 160
    mel = opts.mel_opts
    mel.num_bins = num_mel_bins
    mel.low_freq = 20.0
    mel.high_freq = 0.0  # 0 means the Nyquist frequency
    mel.vtln_low = 100.0
    mel.vtln_high = -500.0
    mel.htk_mode = False
    mel.is_librosa = False  # Kaldi mel scale 1127 ln(1 + f/700), unnormalised triangles
    opts.use_energy = False
    opts.raw_energy = True
    opts.htk_compat = False
    opts.use_log_fbank = True
    opts.use_power = True
    return opts


_DEFAULT_OPTIONS = fbank_options()


def num_fbank_frames(num_samples: int) -> int:
    """Frames Kaldi fbank (snip_edges=True) yields for ``num_samples`` samples at 16 kHz."""
    if num_samples < FBANK_WINDOW_SAMPLES:
        return 0
    return 1 + (num_samples - FBANK_WINDOW_SAMPLES) // FBANK_SHIFT_SAMPLES


def compute_fbank(waveform: np.ndarray, sample_rate: int = FBANK_SAMPLE_RATE) -> np.ndarray:
    """(frames, 40) float32 Kaldi log-Mel fbank of a mono 16 kHz waveform.

    Float input is taken as audio in [-1, 1] and scaled by 2**15 (the original's
    ``wav * 32768``); integer input is taken as already on the int16 scale.
    Audio shorter than one 25 ms window gives a (0, 40) array.
    """
    if sample_rate != FBANK_SAMPLE_RATE:
        raise InputError(
            f"fbank needs {FBANK_SAMPLE_RATE} Hz audio, got {sample_rate} Hz (resample it first)"
        )
    waveform = np.asarray(waveform)
    if waveform.ndim != 1:
        raise InputError(f"fbank needs a 1-D mono waveform, got shape {waveform.shape}")
    if np.issubdtype(waveform.dtype, np.integer):
        samples = waveform.astype(np.float32)
    elif np.issubdtype(waveform.dtype, np.floating):
        samples = (waveform * INT16_SCALE).astype(np.float32, copy=False)
    else:
        raise TypeError(f"fbank needs a float or integer waveform, got dtype {waveform.dtype}")
    extractor = knf.OnlineFbank(_DEFAULT_OPTIONS)
    extractor.accept_waveform(float(FBANK_SAMPLE_RATE), samples)
    extractor.input_finished()
    num_frames = extractor.num_frames_ready
    feats = np.empty((num_frames, FBANK_NUM_MEL_BINS), dtype=np.float32)
    for index in range(num_frames):
        # get_frame returns a view into the extractor's buffer: copy it out.
        feats[index] = extractor.get_frame(index)
    return feats


def resample_audio(waveform: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Polyphase resampling (scipy.signal.resample_poly, Kaiser-windowed FIR) to ``target_sr``."""
    if orig_sr == target_sr:
        return waveform
    from scipy.signal import resample_poly  # deferred on purpose: scipy.signal is slow to import and only resampling needs it

    divisor = math.gcd(int(orig_sr), int(target_sr))
    resampled = resample_poly(waveform, int(target_sr) // divisor, int(orig_sr) // divisor, axis=0)
    return resampled.astype(np.float32, copy=False)


def check_audio_header(path: str, info) -> None:
    """Refuse a file whose header promises more audio than the file holds (a truncated copy).

    libsndfile reads such a WAV/AIFF without complaint, only as many frames as
    the file holds, and records the disagreement in its header log as
    ``data : <declared bytes> (should be <bytes present>)``.
    """
    for line in info.extra_info.splitlines():
        match = _TRUNCATED_CHUNK.match(line.strip())
        if match and int(match.group(3)) < int(match.group(2)):
            raise InputError(
                f"{path}: truncated audio file: its header declares {match.group(2)} bytes of audio data "
                f"but the file holds {match.group(3)} (an interrupted copy?)"
            )


def check_audio(waveform: np.ndarray, where: str) -> None:
    """Refuse audio no feature can honestly be computed from, as features are checked before use: no samples
    (an empty file), or NaN / infinite samples (a broken float WAV or conversion); ``where`` names it."""
    if waveform.size == 0:
        raise InputError(f"{where}: has no audio samples (an empty recording)")
    finite = np.isfinite(waveform)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(-1))
        raise InputError(
            f"{where}: {len(bad)} of {waveform.size} samples are NaN or infinite (the first is sample {bad[0]}); "
            "fix or drop this recording"
        )


def load_audio(
    path: str,
    expected_sr: int = FBANK_SAMPLE_RATE,
    resample: bool = False,
    downmix: bool = False,
    expected_samples: Optional[int] = None,
) -> np.ndarray:
    """Read an audio file as a 1-D float32 waveform in [-1, 1] at ``expected_sr``.

    A different sample rate is an error naming the file unless ``resample`` is
    set; more than one channel is an error unless ``downmix`` is set (then the
    channels are averaged). A truncated file, a file that decodes to fewer
    frames than its header says, or one whose length is not ``expected_samples``
    (an audio manifest's count) is an error, as is anything but a regular file,
    an empty file and NaN / infinite samples (:func:`check_audio`).
    16-bit files come back as int16 / 2**15 exactly, the same values
    ``torchaudio.load`` gave the original.
    """
    check_regular_file(path, what="audio file")
    try:
        info = soundfile.info(path)
        check_audio_header(path, info)
        if expected_samples is not None and info.frames != expected_samples:
            raise InputError(f"{path}: manifest says {expected_samples} samples, the file has {info.frames}")
        audio, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except RuntimeError as err:  # soundfile.LibsndfileError (older soundfile: RuntimeError)
        raise InputError(f"{path}: cannot read audio ({err})") from None
    if len(audio) != info.frames:
        raise InputError(f"{path}: header says {info.frames} frames but only {len(audio)} could be decoded (truncated?)")
    num_channels = audio.shape[1]
    if num_channels != 1 and not downmix:
        raise InputError(
            f"{path}: has {num_channels} channels, expected mono (downmix=True / --downmix averages them)"
        )
    check_audio(audio, path)
    waveform = audio[:, 0] if num_channels == 1 else audio.mean(axis=1, dtype=np.float32)
    if sample_rate != expected_sr:
        if not resample:
            raise InputError(
                f"{path}: sample rate is {sample_rate} Hz, expected {expected_sr} Hz "
                "(resample=True / --resample converts it)"
            )
        waveform = resample_audio(waveform, sample_rate, expected_sr)
    return waveform
