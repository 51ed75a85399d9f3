"""The s3prl upstream: hidden states, downsample rate, training through it, and s3prl's own Featurizer."""
from __future__ import annotations

import pytest
import torch

from melhubert_fairseq.data.fbank import load_audio
from melhubert_fairseq.s3prl_upstream.expert import UpstreamExpert
from melhubert_fairseq.s3prl_upstream.hubconf import melhubert_fairseq_local

from helpers import DEMO_CORPUS, checkpoint_without_stats

SPEECH = sorted(DEMO_CORPUS.glob("*/*.flac"))[::40]  # 3 real utterances, 3 speakers


@pytest.fixture
def upstream(tiny_checkpoint) -> UpstreamExpert:
    """The tiny checkpoint (2 layers, 64 dim, 20 ms) built as s3prl's runner builds an upstream."""
    return melhubert_fairseq_local(ckpt=str(tiny_checkpoint), model_config=None, refresh=False)


def speech() -> list:
    return [torch.from_numpy(load_audio(str(path))) for path in SPEECH]


def test_hidden_states_are_the_first_layer_input_then_every_layer(upstream):
    upstream.eval()
    wavs = speech()
    first_layer_inputs = []
    hook = upstream.model.encoder.layers[0].register_forward_hook(lambda m, args, out: first_layer_inputs.append(args[0]))
    with torch.no_grad():
        out = upstream(wavs)
        hook.remove()
        alone = [upstream(wavs[i : i + 1])["hidden_states"] for i in range(len(wavs))]
    states = out["hidden_states"]
    assert upstream.get_downsample_rates("hidden_states") == 320  # 160 samples x 2 stacked frames
    assert len(states) == 3 and all(h.shape == states[0].shape for h in states) and states[0].shape[-1] == 64
    assert out["last_hidden_state"] is states[-1]
    for row, wav in enumerate(wavs):
        frames = -(-(1 + (len(wav) - 400) // 160) // 2)
        torch.testing.assert_close(states[0][row, :frames], first_layer_inputs[0][row, :frames])
        assert not states[-1][row, frames:].any(), "frames past the utterance are zeros"
        for batched, single in zip(states, alone[row]):
            torch.testing.assert_close(batched[row, :frames], single[0], atol=1e-5, rtol=1e-5)


def test_upstream_trains_through_for_s3prl_finetuning(upstream):
    upstream.train()  # s3prl -f: upstream.train() and no torch.no_grad around it
    out = upstream(speech())
    sum(h.square().mean() for h in out["hidden_states"]).backward()
    without_grad = [name for name, p in upstream.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not without_grad, without_grad


def test_checkpoint_without_fbank_stats_is_refused(tiny_checkpoint, tmp_path):
    path = checkpoint_without_stats(tiny_checkpoint, tmp_path)
    with pytest.raises(ValueError, match=f"{path}.* does not record the corpus mean/std"):
        UpstreamExpert(str(path))


@pytest.mark.s3prl
def test_with_s3prl_featurizer(upstream):
    interfaces = pytest.importorskip("s3prl.upstream.interfaces", reason="s3prl is not installed (extra 's3prl')")
    featurizer = interfaces.Featurizer(upstream=upstream, upstream_device="cpu")
    assert featurizer.layer_num == 3 and featurizer.output_dim == 64 and featurizer.downsample_rate == 320
    upstream.train()
    wavs = speech()
    out = upstream(wavs)
    features = featurizer(wavs, out)
    padded_frames = out["hidden_states"][0].size(1)
    # s3prl keeps round(samples / downsample rate) frames: ours, or one more (a zero frame) on a long tail
    assert [len(f) for f in features] == [min(round(len(w) / 320), padded_frames) for w in wavs]
    weights = torch.softmax(featurizer.weights, dim=0)
    torch.testing.assert_close(features[0], sum(w * h[0, : len(features[0])] for w, h in zip(weights, out["hidden_states"])))
    sum(f.square().mean() for f in features).backward()
    assert featurizer.weights.grad.abs().sum() > 0
    assert upstream.model.pre_extract_proj.weight.grad.abs().sum() > 0
