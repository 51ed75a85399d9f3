"""s3prl ``UpstreamExpert`` for a ``mel_hubert`` checkpoint: 16 kHz waveforms in, every hidden state out.

s3prl's contract (``s3prl/upstream/example/expert.py``): ``forward`` takes a
list of 1-D 16 kHz float waveforms and returns ``{"hidden_states": [...]}``,
each (B, T, C); ``get_downsample_rates`` gives the samples per output frame.
The fbank is computed inside the model, in torch, on the waveforms' device,
and nothing runs under ``no_grad``, so s3prl's upstream fine-tuning (``-f``)
trains through the whole model. s3prl itself is not imported here.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from melhubert_fairseq.feature_reader import load_mel_hubert
from melhubert_fairseq.models.waveform_frontend import collate_waveforms


class UpstreamExpert(nn.Module):
    """A ``mel_hubert`` checkpoint as an s3prl upstream (hidden_states: L + 1 tensors (B, T, C))."""

    def __init__(self, ckpt: str, model_config: Optional[str] = None, **kwargs) -> None:
        """Load ``ckpt`` (s3prl's ``-k``); ``model_config`` (``-g``) and s3prl's other keywords are unused:
        the checkpoint holds its config and fbank statistics."""
        super().__init__()
        self.name = "[melhubert_fairseq UpstreamExpert]"
        model, _task_cfg = load_mel_hubert(ckpt)
        model.require_fbank_stats(ckpt)  # audio is all this upstream takes
        model.remove_pretraining_modules()
        # Every forward must give the same number of hidden states for s3prl's weighted sum (and s3prl's
        # HuBERT upstream does the same); our layerdrop keeps the count, but -f should train every layer.
        model.encoder.layerdrop = 0.0
        self.model = model

    def get_downsample_rates(self, key: str) -> int:
        """Input samples per output frame, for every key: 160 (10 ms) x the checkpoint's stack_frames."""
        return self.model.waveform_frontend.samples_per_frame

    def forward(self, wavs: List[torch.Tensor]) -> Dict[str, List[torch.Tensor]]:
        """1-D 16 kHz float waveforms -> ``hidden_states``: the input of the first transformer layer, then every
        layer's output, each (B, T, C); ``last_hidden_state`` is the last of them.

        Frames past an utterance's end are zeros: s3prl's Featurizer keeps round(len(wav) / downsample rate)
        frames, one more than Kaldi framing gives when the tail is over half a frame.
        """
        batch, padding_mask = collate_waveforms(wavs)
        out = self.model.extract_features(batch, padding_mask, mask=False)
        padded = out["padding_mask"].unsqueeze(-1)
        hidden_states = [state.masked_fill(padded, 0.0) for state in out["hidden_states"]]
        return {"hidden_states": hidden_states, "last_hidden_state": hidden_states[-1]}
