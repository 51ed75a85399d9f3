"""Waveform front end: 16 kHz audio -> the normalised, stacked fbank frames ``mel_hubert`` was trained on.

The model was trained on features written by ``melhubert-wav-to-fbank``
(kaldi-native-fbank with :func:`melhubert_fairseq.data.fbank.fbank_options`),
normalised with the corpus mean/std and stacked by
:func:`melhubert_fairseq.data.features.stack_frames`. This module computes the
same thing in torch, batched, on the input's device and differentiably, so a
checkpoint can take raw audio (fairseq's ``wav2vec_ctc``, s3prl upstreams).
It has no learned weights and no buffers: its constants come from
kaldi-native-fbank with those very options, so checkpoints do not change.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import kaldi_native_fbank as knf
import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from melhubert_fairseq.data.fbank import fbank_options
from melhubert_fairseq.data.features import FBANK_SAMPLE_RATE, INT16_SCALE
from melhubert_fairseq.errors import InputError


def _unsupported_options(opts: knf.FbankOptions) -> list:
    """Options of ``opts`` that :class:`KaldiFbank` does not implement (it implements the project's)."""
    frame = opts.frame_opts
    checks = {
        "dither != 0": frame.dither != 0.0,
        "snip_edges = false": not frame.snip_edges,
        "use_energy": opts.use_energy,
        "htk_compat": opts.htk_compat,
        "use_power = false": not opts.use_power,
        "use_log_fbank = false": not opts.use_log_fbank,
        "use_log_floor = false": not getattr(opts, "use_log_floor", True),
        "window/shift not whole samples": (frame.samp_freq * frame.frame_length_ms / 1000) % 1
        or (frame.samp_freq * frame.frame_shift_ms / 1000) % 1,
    }
    return [name for name, failed in checks.items() if failed]


class KaldiFbank(nn.Module):
    """Batched Kaldi log-Mel fbank in torch, equal to ``melhubert-wav-to-fbank``'s (kaldi-native-fbank).

    Per 25 ms frame every 10 ms (snip_edges: only whole frames): audio x 2**15,
    DC offset removed, pre-emphasis, window, power spectrum of the zero-padded
    FFT, Kaldi mel triangles, log floored at float32 epsilon. Every constant
    (window, mel matrix, pre-emphasis, frame sizes, floor) comes from the options
    object ``melhubert-wav-to-fbank`` uses, so the two cannot drift apart.

    The FFT runs in float32 and the mel sum in float64, whatever the model's
    dtype, autocast and matmul precision settings: int16-scale power spectra
    overflow fp16, and a TF32/bf16 mel sum costs up to ~1e-3 in log fbank. The
    constants are no buffers, since ``model.half()``/``bfloat16()`` would round
    them (bf16 constants: 3.6 log-Mel units off, benchmarks/bench_waveform_frontend.py);
    they are built once per device.
    """

    def __init__(self, opts: Optional[knf.FbankOptions] = None) -> None:
        super().__init__()
        opts = opts if opts is not None else fbank_options()
        unsupported = _unsupported_options(opts)
        if unsupported:
            raise NotImplementedError(f"KaldiFbank does not implement fbank options: {', '.join(unsupported)}")
        frame = opts.frame_opts
        self.sample_rate = int(frame.samp_freq)
        self.window_samples = int(round(frame.samp_freq * frame.frame_length_ms / 1000))
        self.shift_samples = int(round(frame.samp_freq * frame.frame_shift_ms / 1000))
        self.fft_size = (
            1 << (self.window_samples - 1).bit_length() if frame.round_to_power_of_two else self.window_samples
        )
        self.preemph_coeff = float(frame.preemph_coeff)
        self.remove_dc_offset = bool(frame.remove_dc_offset)
        self.log_floor = float(getattr(opts, "eps", np.finfo(np.float32).eps))
        self._window = np.array(knf.FeatureWindowFunction(frame).apply([1.0] * self.window_samples), dtype=np.float32)
        # MelBanks.compute of each unit power spectrum gives one row of the (fft bins, mel bins) matrix.
        banks = knf.MelBanks(opts.mel_opts, frame, 1.0)
        unit_spectra = np.eye(self.fft_size // 2 + 1, dtype=np.float32)
        self._mel_matrix = np.stack([banks.compute(np.ascontiguousarray(row)) for row in unit_spectra]).astype(np.float64)
        self.num_mel_bins = self._mel_matrix.shape[1]
        self._constants: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}

    def constants(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(window,) float32 window and (fft bins, mel bins) float64 mel matrix on ``device``."""
        if device not in self._constants:
            self._constants[device] = (
                torch.from_numpy(self._window).to(device),
                torch.from_numpy(self._mel_matrix).to(device),
            )
        return self._constants[device]

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Frames for ``num_samples`` samples (int tensor, any shape): 1 + (n - window) // shift, 0 if shorter."""
        frames = torch.div(num_samples - self.window_samples, self.shift_samples, rounding_mode="floor") + 1
        return frames.clamp_min(0)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, samples) float audio in [-1, 1] -> (B, frames, num_mel_bins) float32 log-Mel fbank.

        Frame i covers samples [shift*i, shift*i + window); the batch needs at least one window.
        """
        window, mel_matrix = self.constants(waveform.device)
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            samples = waveform.float() * INT16_SCALE
            frames = samples.unfold(-1, self.window_samples, self.shift_samples)  # (B, F, window)
            if self.remove_dc_offset:
                frames = frames - frames.mean(dim=-1, keepdim=True)
            if self.preemph_coeff != 0.0:
                # Kaldi: x[i] -= c x[i-1] for i >= 1, and x[0] -= c x[0].
                previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
                frames = frames - self.preemph_coeff * previous
            spectrum = torch.fft.rfft(frames * window, n=self.fft_size)  # (B, F, fft/2 + 1)
            power = spectrum.real.square() + spectrum.imag.square()
            mel_energies = torch.matmul(power.double(), mel_matrix)
            return mel_energies.clamp_min(self.log_floor).log().float()


def collate_waveforms(waveforms: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """1-D float waveforms -> zero-padded (B, samples) batch and (B, samples) padding mask (True = padding)."""
    if len(waveforms) == 0:
        raise ValueError("no waveforms to collate")
    for index, wav in enumerate(waveforms):
        check_waveform(wav, f"waveform {index}", dims=(1,))
    lengths = torch.tensor([len(wav) for wav in waveforms], device=waveforms[0].device)
    batch = pad_sequence(list(waveforms), batch_first=True)
    padding_mask = torch.arange(batch.size(1), device=batch.device)[None, :] >= lengths[:, None]
    return batch, padding_mask


def check_waveform(waveform, where: str, dims: Tuple[int, ...] = (1, 2)) -> None:
    """Raise InputError naming ``where`` unless ``waveform`` is a floating tensor/array with ``dims`` dimensions."""
    dtype = waveform.dtype
    is_float = dtype.is_floating_point if isinstance(dtype, torch.dtype) else np.issubdtype(dtype, np.floating)
    if waveform.ndim not in dims or not is_float:
        shapes = " or ".join({1: "(samples,)", 2: "(batch, samples)"}[d] for d in dims)
        raise InputError(
            f"{where}: expected a float {shapes} waveform in [-1, 1], got {str(dtype).replace('torch.', '')} "
            f"array of shape {tuple(waveform.shape)}"
        )


def check_sample_rate(sample_rate: int, where: str) -> None:
    """Raise InputError naming ``where`` unless audio is at the 16 kHz every model here was trained on."""
    if sample_rate != FBANK_SAMPLE_RATE:
        raise InputError(
            f"{where}: sample rate is {sample_rate} Hz, the model takes {FBANK_SAMPLE_RATE} Hz audio "
            "(resample it first, e.g. melhubert_fairseq.data.fbank.resample_audio)"
        )


class WaveformFrontEnd(nn.Module):
    """(B, samples) 16 kHz waveform -> (B, T, feat_dim * stack) model input and (B, T) frame padding mask.

    Fbank (:class:`KaldiFbank`), then ``(fbank - mean) / std`` with the training
    corpus statistics, frames past each utterance's end zeroed, then ``stack``
    consecutive frames concatenated with a zero-padded last group: exactly
    ``stack_frames(MeanStd.normalize(compute_fbank(wav)), stack)`` per utterance,
    so each utterance of a padded batch gives the frames it gives alone.
    """

    def __init__(self, stack: int) -> None:
        super().__init__()
        self.fbank = KaldiFbank()
        self.stack = stack

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per model frame (160 x stack): the downsample rate s3prl asks for."""
        return self.fbank.shift_samples * self.stack

    def num_frames(self, num_samples: torch.Tensor) -> torch.Tensor:
        """Model frames for ``num_samples`` samples (int tensor): ceil(fbank frames / stack)."""
        return -torch.div(-self.fbank.num_frames(num_samples), self.stack, rounding_mode="floor")

    def forward(
        self, waveform: torch.Tensor, padding_mask: Optional[torch.Tensor], mean: torch.Tensor, std: torch.Tensor
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Model input (B, T, feat_dim * stack) float32 and frame padding mask (B, T) (None if none given).

        ``padding_mask`` (B, samples), True = padding, marks the end of each row
        (right padding, as fairseq and s3prl collate audio); ``mean``/``std`` are (feat_dim,).
        """
        check_waveform(waveform, "waveform input", dims=(2,))
        if mean.shape[-1] != self.fbank.num_mel_bins:
            raise InputError(
                f"the model takes {mean.shape[-1]}-dim features, the waveform front end computes "
                f"melhubert-wav-to-fbank's {self.fbank.num_mel_bins}-bin fbank"
            )
        batch, num_samples = waveform.shape
        if padding_mask is not None:
            if padding_mask.shape != waveform.shape:
                raise ValueError(
                    f"padding_mask has shape {tuple(padding_mask.shape)}, waveform has {tuple(waveform.shape)}"
                )
            lengths = (~padding_mask).sum(dim=-1)
        else:
            lengths = torch.full((batch,), num_samples, device=waveform.device)
        fbank_lengths = self.fbank.num_frames(lengths)
        too_short = fbank_lengths == 0
        misplaced = torch.zeros_like(too_short)
        if padding_mask is not None:
            positions = torch.arange(num_samples, device=waveform.device)
            misplaced = (padding_mask != (positions[None, :] >= lengths[:, None])).any(dim=-1)
        if bool((too_short | misplaced).any()):  # one host sync for both checks
            if bool(misplaced.any()):
                raise ValueError("padding_mask must be True exactly on the trailing padding of each row")
            raise InputError(
                f"waveform rows {too_short.nonzero().flatten().tolist()} are shorter than one "
                f"{self.fbank.window_samples}-sample fbank window"
            )
        fbank = self.fbank(waveform)  # (B, F, feat_dim)
        normalised = (fbank - mean.float()) / std.float()
        num_fbank = fbank.size(1)
        real = torch.arange(num_fbank, device=waveform.device)[None, :] < fbank_lengths[:, None]
        # Frames past an utterance's end are zeros, as stack_frames pads a short last group.
        normalised = normalised.masked_fill(~real.unsqueeze(-1), 0.0)
        num_model = -(-num_fbank // self.stack)
        normalised = nn.functional.pad(normalised, (0, 0, 0, num_model * self.stack - num_fbank))
        frames = normalised.reshape(batch, num_model, self.stack * normalised.size(-1))
        if padding_mask is None:
            return frames, None
        model_lengths = self.num_frames(lengths)
        frame_padding = torch.arange(num_model, device=waveform.device)[None, :] >= model_lengths[:, None]
        return frames, frame_padding
