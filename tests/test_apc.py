"""APC pretraining (criterion apc_l1, config/causal_apc.yaml): the loss, training on real speech frames
without labels, the trained model downstream, and the refusals."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils
from omegaconf import OmegaConf

import melhubert_fairseq
from helpers import DEMO_CORPUS, TINY_ORIGINAL_CONFIG, make_fbank_corpus, run_hydra_train
from melhubert_fairseq.criterions.apc_l1 import ApcL1, default_time_shift
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.original.convert import build_fairseq_cfg, build_model, convert_config
from melhubert_fairseq.tasks.mel_hubert_pretraining import MelHubertPretrainingTask
from melhubert_fairseq.tasks.pretraining_config import MelHubertPretrainingConfig

melhubert_fairseq.register_with_fairseq()  # fairseq knows the task, model and criteria by name

STRICTLY_CAUSAL = {"attention_type": "causal", "pos_conv_causal": True, "prediction_head": "frames"}


def tiny_model(**model_overrides):
    """A 2 x 32 model of 20 ms frames (conv_pos 8) with random weights."""
    cfg = build_fairseq_cfg(convert_config(TINY_ORIGINAL_CONFIG))
    cfg["model"].update({**STRICTLY_CAUSAL, **model_overrides})
    torch.manual_seed(0)
    return build_model(cfg).eval()


def fake_task(stack_frames: int = 2, max_sample_size=None):
    return SimpleNamespace(cfg=SimpleNamespace(stack_frames=stack_frames, max_sample_size=max_sample_size))


def test_loss_is_the_l1_distance_to_the_frame_n_ahead_over_real_frames():
    model = tiny_model()
    criterion = ApcL1(fake_task(), time_shift=2)
    source = torch.randn(2, 10, 80)
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, 7:] = True
    sample = {"net_input": {"source": source, "padding_mask": padding, "sample_ids": torch.arange(2)},
              "ntokens": 17, "nsentences": 2}
    loss, sample_size, log = criterion(model, sample)
    with torch.no_grad():
        x = model.extract_features(source, padding_mask=padding, mask=False)["x"]
        expected = sum(
            (model.apc_proj(x[b, t]) - source[b, t + 2]).abs().sum()
            for b, length in enumerate((10, 7)) for t in range(length - 2)
        )
    assert sample_size == (10 - 2) + (7 - 2) == log["sample_size"]
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-5)
    # Padding is never read, as input or as target.
    garbage = source.clone()
    garbage[1, 7:] = 1e3
    torch.testing.assert_close(criterion(model, {**sample, "net_input": {**sample["net_input"], "source": garbage}})[0],
                               loss, rtol=0, atol=0)
    loss.backward()
    assert model.apc_proj.weight.grad.abs().sum() > 0 and model.pre_extract_proj.weight.grad.abs().sum() > 0


def test_default_time_shift_is_30_ms_at_the_model_frame_rate():
    assert [default_time_shift(stack) for stack in (1, 2, 4)] == [3, 2, 1]
    assert ApcL1(fake_task(stack_frames=1), time_shift=None).time_shift == 3
    assert ApcL1(fake_task(stack_frames=1), time_shift=5).time_shift == 5


def test_a_time_shift_not_shorter_than_the_crop_is_refused():
    with pytest.raises(InputError, match=r"^criterion\.time_shift=3 is not shorter than the crop task\.max_sample_size=3 "):
        ApcL1(fake_task(max_sample_size=3), time_shift=3)
    ApcL1(fake_task(max_sample_size=4), time_shift=3)


REFUSED_MODELS = {
    "bidirectional": ({"attention_type": "original", "pos_conv_causal": None},
                      r"^model\.attention_type=original: bidirectional attention sees frame t\+2 from frame t"),
    "centred-conv-reaches-target": ({"pos_conv_causal": False},
                                    r"^model\.pos_conv_causal=false: the centred positional conv \(model\.conv_pos=8\) "
                                    r"reads 3 frames ahead, which reaches the APC target t\+2"),
    "cluster-head": ({"prediction_head": "cluster_ids"}, r"^model\.prediction_head=cluster_ids: criterion apc_l1"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_MODELS))
def test_a_model_that_can_see_its_target_is_refused(case):
    overrides, message = REFUSED_MODELS[case]
    criterion = ApcL1(fake_task(), time_shift=2)
    sample = {"net_input": {"source": torch.randn(1, 6, 80), "padding_mask": torch.zeros(1, 6, dtype=torch.bool)},
              "ntokens": 6, "nsentences": 1}
    with pytest.raises(InputError, match=message):
        criterion(tiny_model(**overrides), sample)


def test_the_release_causal_model_is_allowed_when_its_conv_stops_short_of_the_target():
    model = tiny_model(pos_conv_causal=False, conv_pos=4)  # a centred kernel of 4 reads 1 frame ahead
    assert model.lookahead_frames() == 1
    sample = {"net_input": {"source": torch.randn(1, 6, 80), "padding_mask": torch.zeros(1, 6, dtype=torch.bool)},
              "ntokens": 6, "nsentences": 1}
    loss, sample_size, _ = ApcL1(fake_task(), time_shift=2)(model, sample)
    assert sample_size == 4 and torch.isfinite(loss)


def pretraining_task(data: Path, **overrides) -> MelHubertPretrainingTask:
    return MelHubertPretrainingTask(MelHubertPretrainingConfig(data=str(data), seed=1, **overrides))


def test_labels_are_read_exactly_when_the_criterion_needs_them(tmp_path):
    data = make_fbank_corpus(tmp_path, num_utts=3)
    apc = OmegaConf.create({"_name": "apc_l1", "time_shift": None})
    hard_label = OmegaConf.create({"_name": "hard_label_masked_ce", "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0})

    without = pretraining_task(data, labels=None, num_classes=32)
    without.load_dataset("train")
    batch = without.datasets["train"].collater([without.datasets["train"][i] for i in range(3)])
    assert "target" not in batch and batch["net_input"]["source"].shape[-1] == 80
    assert isinstance(without.build_criterion(apc), ApcL1)
    with pytest.raises(InputError, match=r"^task\.labels=null: criterion hard_label_masked_ce predicts k-means labels"):
        without.build_criterion(hard_label)
    with pytest.raises(InputError, match=r"^task\.labels=null gives no k-means labels, but model\.prediction_head=cluster_ids"):
        without.build_model(OmegaConf.create(dict(build_fairseq_cfg(convert_config(TINY_ORIGINAL_CONFIG))["model"])))

    with_labels = pretraining_task(data, label_dir=str(data), num_classes=32)
    with pytest.raises(InputError, match=r"^task\.labels=km: criterion apc_l1 reads no labels"):
        with_labels.build_criterion(apc)
    with pytest.raises(InputError, match=r"^task\.label_dir=.* is set but task\.labels=null reads no labels"):
        pretraining_task(data, labels=None, label_dir=str(data))


def demo_features(directory: Path, utterances: int = 16) -> Path:
    """Normalised fbank of the first bundled utterances (real espeak-ng speech), written by melhubert-wav-to-fbank."""
    from melhubert_fairseq.tools import wav_to_fbank

    rows = (DEMO_CORPUS / "train.tsv").read_text().splitlines()[1 : 1 + utterances]
    manifest = directory / "audio" / "train.tsv"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(f"{DEMO_CORPUS}\n" + "\n".join(rows) + "\n")
    wav_to_fbank.main(["--manifest", str(manifest), "--out-dir", str(directory / "features")])
    return directory / "features"


def train_losses(stdout: str):
    return [float(json.loads(m)["loss"]) for m in re.findall(r"\[train_inner\]\[INFO\] - (\{.*\})", stdout)]


@pytest.fixture(scope="module")
def apc_run(tmp_path_factory):
    """config/causal_apc.yaml, shrunk to 2 x 64, trained 12 updates on 16 real utterances at 10 ms."""
    root = tmp_path_factory.mktemp("apc")
    data = demo_features(root)
    result = run_hydra_train(
        data, root / "ckpt", config_name="causal_apc", labels=False, max_update=12, max_tokens=1600,
        overrides=["task.min_sample_size=50", "task.max_sample_size=400", "optimization.lr=[0.002]"],
    )
    return root, data, result


@pytest.mark.slow  # apc_run trains with fairseq-hydra-train
def test_causal_apc_trains_on_real_frames_without_labels(apc_run):
    root, data, result = apc_run
    assert not list(data.glob("*.km"))
    losses = train_losses(result.stdout)
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses  # measured: 31.8 -> 25.3
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(root / "ckpt" / "checkpoint_last.pt")])
    model = models[0].eval()
    assert cfg.task.labels is None and cfg.task.stack_frames == 1 and cfg.criterion._name == "apc_l1"
    assert cfg.model.attention_type == "causal" and cfg.model.pos_conv_causal is True
    assert model.final_proj is None and model.apc_proj.out_features == 40 and model.lookahead_frames() == 0
    # Strictly causal after training too: frames after t change nothing at t, in any hidden state.
    feat = torch.randn(1, 40, 40)
    changed = feat.clone()
    changed[:, 21:] = torch.randn(1, 19, 40)
    with torch.no_grad():
        before = model.extract_features(feat, mask=False)["hidden_states"]
        after = model.extract_features(changed, mask=False)["hidden_states"]
    for a, b in zip(before, after):
        torch.testing.assert_close(b[:, :21], a[:, :21], atol=1e-6, rtol=0)


@pytest.mark.slow  # apc_run trains with fairseq-hydra-train
def test_the_apc_checkpoint_goes_downstream_like_any_mel_hubert_checkpoint(apc_run, tmp_path):
    from melhubert_fairseq.data.manifest import read_manifest
    from melhubert_fairseq.feature_reader import MelHubertFeatureReader
    from melhubert_fairseq.s3prl_upstream.hubconf import melhubert_fairseq_local
    from melhubert_fairseq.tools.extract_features import main as extract_main
    from test_finetuning import ctc_encoder, demo_waveforms, small_corpus

    root, data, _ = apc_run
    checkpoint = root / "ckpt" / "checkpoint_last.pt"
    # melhubert-extract-features
    out = tmp_path / "feats"
    assert extract_main(["--checkpoint", str(checkpoint), "--manifest", str(data / "train.tsv"), "--out-dir", str(out),
                         "--layers", "2", "--no-progress"]) == 0
    manifest = read_manifest(str(data / "train.tsv"))
    reader = MelHubertFeatureReader(str(checkpoint))
    for row, expected in reader.iter_manifest(str(data / "train.tsv"), layer=2):
        written = np.load(out / "layer2" / manifest.relative_path(row))
        assert written.shape == (manifest.num_frames[row], 64)
        np.testing.assert_array_equal(written, expected)
    # the s3prl upstream, from audio with the checkpoint's fbank statistics
    batch, padding_mask = demo_waveforms()
    upstream = melhubert_fairseq_local(ckpt=str(checkpoint), model_config=None, refresh=False).eval()
    with torch.no_grad():
        states = upstream([batch[1]])["hidden_states"]
    assert len(states) == 3 and states[-1].shape[-1] == 64 and upstream.get_downsample_rates("hidden_states") == 160
    assert upstream.model.apc_proj is None  # the pretraining head is dropped downstream
    # fairseq's CTC fine-tuning encoder (wav2vec_ctc): strict load, then training through it
    encoder = ctc_encoder(checkpoint, small_corpus(tmp_path, train=1, valid=1))
    pretrained = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    for name, value in encoder.w2v_model.state_dict().items():
        torch.testing.assert_close(value, pretrained[name], rtol=0, atol=0, equal_nan=True)
    encoder.train()
    encoder.set_num_updates(1)
    result = encoder(source=batch, padding_mask=padding_mask)
    result["encoder_out"][~result["padding_mask"].T].logsumexp(-1).sum().backward()
    assert encoder.w2v_model.encoder.layers[0].fc1.weight.grad.abs().sum() > 0
