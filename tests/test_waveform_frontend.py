"""The model's waveform front end against melhubert-wav-to-fbank on the bundled real speech, and its contracts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from melhubert_fairseq.data.fbank import compute_fbank, fbank_options, load_audio, num_fbank_frames
from melhubert_fairseq.data.features import load_mean_std, stack_frames
from melhubert_fairseq.models.mel_hubert import MelHubertConfig, MelHubertModel
from melhubert_fairseq.models.waveform_frontend import KaldiFbank, collate_waveforms
from melhubert_fairseq.data.audio_manifest import list_audio_dir
from melhubert_fairseq.tools.wav_to_fbank import main as wav_to_fbank_main

from helpers import DEMO_CORPUS



@pytest.fixture(scope="module")
def corpus_features(tmp_path_factory):
    """melhubert-wav-to-fbank run on the bundled corpus: raw and normalised features and the audio items."""
    root = tmp_path_factory.mktemp("demo_fbank")
    for name, extra in (("raw", ["--no-normalize"]), ("normalised", [])):
        wav_to_fbank_main(["--audio-dir", str(DEMO_CORPUS), "--out-dir", str(root / name), *extra])
    return root, list_audio_dir(str(DEMO_CORPUS))


def tiny_model(stack: int = 2, **overrides) -> MelHubertModel:
    """A 2-layer, 32-dim mel_hubert (random weights)."""
    cfg = dict(feat_dim=40, stack_frames=stack, num_classes=8, mask_seed=3, encoder_layers=2, encoder_embed_dim=32,
               encoder_ffn_embed_dim=64, encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4)
    cfg.update(overrides)
    return MelHubertModel(MelHubertConfig(**cfg))


def with_stats(model: MelHubertModel, mean_std_path: Path) -> MelHubertModel:
    stats = load_mean_std(str(mean_std_path))
    model.set_fbank_stats(torch.from_numpy(stats.mean), torch.from_numpy(stats.std))
    return model


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """max |ours - reference| over the largest |reference|: the error on the tensor's own scale."""
    return float((ours - reference).abs().max() / reference.abs().max())


def test_torch_fbank_matches_wav_to_fbank_on_the_bundled_speech(corpus_features):
    root, items = corpus_features
    fbank = KaldiFbank()
    worst = 0.0
    for start in range(0, len(items), 8):  # padded batches of 8 utterances
        chunk = items[start : start + 8]
        waves = [torch.from_numpy(load_audio(item.full_path)) for item in chunk]
        batch, _ = collate_waveforms(waves)
        with torch.no_grad():
            ours = fbank(batch)
        for row, (item, wave) in enumerate(zip(chunk, waves)):
            expected = np.load(root / "raw" / item.feature_path)
            assert num_fbank_frames(len(wave)) == len(expected)
            worst = max(worst, float(np.abs(ours[row, : len(expected)].numpy() - expected).max()))
    assert len(items) == 120 and worst <= 1e-3, f"max |torch - kaldi-native-fbank| = {worst}"


@pytest.mark.parametrize("stack", [1, 2])
def test_waveform_hidden_states_match_the_training_features_with_padding(corpus_features, stack):
    root, items = corpus_features
    model = with_stats(tiny_model(stack), root / "normalised" / "mean-std.npy").eval()
    chosen = items[::20]  # 6 utterances of different lengths, one padded batch
    batch, padding_mask = collate_waveforms([torch.from_numpy(load_audio(item.full_path)) for item in chosen])
    with torch.no_grad():
        out = model.extract_features(batch, padding_mask)
        assert len(out["hidden_states"]) == 3
        for row, item in enumerate(chosen):
            frames = stack_frames(np.load(root / "normalised" / item.feature_path), stack)  # as training read it
            expected = model.extract_features(torch.from_numpy(frames)[None])
            assert int((~out["padding_mask"][row]).sum()) == len(frames)
            for layer, (ours, theirs) in enumerate(zip(out["hidden_states"], expected["hidden_states"])):
                error = relative_error(ours[row, : len(frames)], theirs[0])
                assert error <= 1e-4, f"{item.where} layer {layer}: relative error {error}"


def test_each_utterance_of_a_padded_batch_gives_what_it_gives_alone(corpus_features):
    root, items = corpus_features
    model = with_stats(tiny_model(2), root / "normalised" / "mean-std.npy").eval()
    waves = [torch.from_numpy(load_audio(items[i].full_path)) for i in (0, 7, 33)]
    waves.append(waves[0][: 400 + 160 * 4])  # 5 fbank frames: a half-empty last stacked frame
    batch, padding_mask = collate_waveforms(waves)
    batch = batch.masked_fill(padding_mask, 0.5)  # whatever sits in the padding must not matter
    with torch.no_grad():
        out = model.extract_features(batch, padding_mask)
        for row, wave in enumerate(waves):
            alone = model.extract_features(wave[None])
            assert alone["padding_mask"] is None
            length = alone["x"].size(1)
            assert out["padding_mask"][row].tolist() == [i >= length for i in range(out["x"].size(1))]
            for ours, theirs in zip(out["hidden_states"], alone["hidden_states"]):
                torch.testing.assert_close(ours[row, :length], theirs[0], atol=1e-5, rtol=1e-5)


def test_gradients_flow_from_the_outputs_to_the_waveform():
    torch.manual_seed(0)
    model = tiny_model(2, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    model.set_fbank_stats(torch.full((40,), 5.0), torch.full((40,), 3.0))
    model.train()
    waves = [torch.randn(n) * 0.1 for n in (8000, 6000)]
    batch, padding_mask = collate_waveforms(waves)
    batch.requires_grad_(True)
    out = model(batch, padding_mask, mask=False)  # masked frames would be replaced, so get no gradient
    out["x"][~out["padding_mask"]].square().mean().backward()
    assert torch.isfinite(batch.grad).all()
    assert (batch.grad[0].abs() > 0).float().mean() > 0.9 and (batch.grad[1, :6000].abs() > 0).float().mean() > 0.9
    assert not batch.grad[1, 6000:].any(), "padding samples get no gradient"
    assert model.pre_extract_proj.weight.grad.abs().sum() > 0


def test_wav2vec_ctc_encoder_contract():
    """fairseq's Wav2VecEncoder calls extract_features(source=, padding_mask=, mask=) on (B, samples)
    audio and reads back res["x"] (B, T, C) and the frame-level res["padding_mask"] (B, T)."""
    torch.manual_seed(0)
    model = tiny_model(2, mask_prob=0.5, mask_length=2)
    model.set_fbank_stats(torch.zeros(40), torch.ones(40))
    model.train()
    lengths = [16000, 12345, 4000]
    batch, padding_mask = collate_waveforms([torch.randn(n) * 0.1 for n in lengths])
    res = model.extract_features(source=batch, padding_mask=padding_mask, mask=True)
    frames = [-(-num_fbank_frames(n) // 2) for n in lengths]
    assert res["x"].shape == (3, max(frames), 32) and len(res["layer_results"]) == 2
    assert res["padding_mask"].dtype == torch.bool
    assert (~res["padding_mask"]).sum(dim=1).tolist() == frames
    assert res["mask_indices"].any() and not (res["mask_indices"] & res["padding_mask"]).any()
    assert model.extract_features(source=batch[:1], padding_mask=None, mask=False)["padding_mask"] is None


def test_front_end_adds_nothing_to_checkpoints_and_ignores_autocast():
    model = tiny_model(2)
    assert not [key for key in model.state_dict() if "waveform_frontend" in key]
    assert not list(model.waveform_frontend.parameters())
    wave = torch.randn(1, 8000, generator=torch.Generator().manual_seed(0)) * 0.3
    fbank = model.waveform_frontend.fbank
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = fbank(wave)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, fbank(wave), atol=0, rtol=0)
    # fairseq --fp16/--bf16 cast the whole model (and its inputs): the fbank is computed exactly as in float32.
    for dtype in (torch.float16, torch.bfloat16):
        cast = tiny_model(2).to(dtype)
        cast.set_fbank_stats(torch.zeros(40), torch.ones(40))
        frames, _ = cast.waveform_to_frames(wave.to(dtype), None)
        assert frames.dtype == dtype
        torch.testing.assert_close(cast.waveform_frontend.fbank(wave.to(dtype)), fbank(wave.to(dtype).float()), atol=0, rtol=0)
        expected = torch.from_numpy(stack_frames(compute_fbank(wave.to(dtype)[0].float().numpy()), 2))
        # equal up to the cast's own rounding (one ulp of dtype)
        torch.testing.assert_close(frames[0].float(), expected, atol=1e-3, rtol=torch.finfo(dtype).eps)


def test_bad_waveform_input_is_a_one_line_error():
    model = tiny_model(2).eval()
    with pytest.raises(ValueError, match="does not record the corpus mean/std"):
        model.extract_features(torch.zeros(1, 16000))
    model.set_fbank_stats(torch.zeros(40), torch.ones(40))
    cases = [
        (torch.zeros(16000), r"expected \(batch, samples\) 16 kHz audio"),
        (torch.zeros(1, 16000, dtype=torch.int16), r"expected a float \(batch, samples\) waveform.*int16"),
        (torch.zeros(2, 300), r"rows \[0, 1\] are shorter than one 400-sample fbank window"),
    ]
    for source, message in cases:
        with pytest.raises(ValueError, match=message):
            model.extract_features(source)
    left_padded = torch.arange(1000)[None, :] < 100
    with pytest.raises(ValueError, match="trailing padding"):
        model.extract_features(torch.zeros(1, 1000), left_padded)
    with pytest.raises(ValueError, match="waveform 1: expected a float"):
        collate_waveforms([torch.zeros(800), torch.zeros(2, 800)])
    wide = tiny_model(2, feat_dim=80)
    wide.set_fbank_stats(torch.zeros(80), torch.ones(80))
    with pytest.raises(ValueError, match="takes 80-dim features, the waveform front end computes .* 40-bin"):
        wide.extract_features(torch.zeros(1, 16000))
    # fbank options the torch front end does not implement are refused, not silently ignored
    dithered = fbank_options()
    dithered.frame_opts.dither = 1.0
    with pytest.raises(NotImplementedError, match="dither"):
        KaldiFbank(dithered)
