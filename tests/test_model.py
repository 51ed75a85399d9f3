"""Model shapes, padding invariance, config wiring, masking statistics and the criterion value."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from fairseq.data.data_utils import compute_mask_indices
from fairseq.dataclass.configs import FairseqConfig
from fairseq.dataclass.initialize import add_defaults
from omegaconf import OmegaConf, open_dict

from helpers import REPO_ROOT
from melhubert_fairseq.criterions.hard_label_masked_ce import HardLabelMaskedCe
from melhubert_fairseq.models import mel_hubert
from melhubert_fairseq.models.masking import SpanMaskConfig, SpanMaskError, span_mask
from melhubert_fairseq.models.mel_hubert import MelHubertConfig, MelHubertModel
from melhubert_fairseq.errors import InputError


def tiny_config(**overrides) -> MelHubertConfig:
    base = dict(
        feat_dim=40,
        stack_frames=2,
        num_classes=16,
        mask_seed=7,
        encoder_layers=3,
        encoder_embed_dim=32,
        encoder_ffn_embed_dim=64,
        encoder_attention_heads=4,
        conv_pos=16,
        conv_pos_groups=4,
    )
    base.update(overrides)
    return MelHubertConfig(**base)


def padded_batch(lengths, dim=80, seed=0):
    torch.manual_seed(seed)
    source = torch.randn(len(lengths), max(lengths), dim)
    padding_mask = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return source, padding_mask


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_output_shapes_with_padding(layer_norm_first):
    model = MelHubertModel(tiny_config(layer_norm_first=layer_norm_first))
    source, padding_mask = padded_batch([50, 37, 12])
    out = model(source, padding_mask, sample_ids=torch.arange(3))
    assert out["x"].shape == (3, 50, 32)
    assert len(out["layer_results"]) == 3 and all(h.shape == (3, 50, 32) for h in out["layer_results"])
    assert out["mask_indices"].shape == (3, 50)
    assert not (out["mask_indices"] & padding_mask).any(), "padded frames must never be masked"
    assert model.cluster_logits(out["x"]).shape == (3, 50, 16)


@pytest.mark.parametrize("layer_norm_first", [False, True])
@pytest.mark.parametrize("stack", [1, 2])
def test_padded_frames_never_influence_real_frames(layer_norm_first, stack):
    model = MelHubertModel(tiny_config(layer_norm_first=layer_norm_first, stack_frames=stack)).eval()
    source, padding_mask = padded_batch([60, 23, 41], dim=40 * stack)
    source[padding_mask] = 1e3  # garbage in the padding must not matter
    batch_out = model.extract_features(source, padding_mask)
    for row, length in enumerate([60, 23, 41]):
        alone = model.extract_features(source[row : row + 1, :length])
        torch.testing.assert_close(batch_out["x"][row, :length], alone["x"][0], atol=1e-5, rtol=1e-5)
        for batch_layer, alone_layer in zip(batch_out["layer_results"], alone["layer_results"]):
            torch.testing.assert_close(batch_layer[row, :length], alone_layer[0], atol=1e-5, rtol=1e-5)


def test_output_layer_stops_early_and_matches_full_run():
    model = MelHubertModel(tiny_config()).eval()
    source, padding_mask = padded_batch([30, 20])
    full = model.extract_features(source, padding_mask)
    early = model.extract_features(source, padding_mask, output_layer=2)
    assert len(early["layer_results"]) == 2
    torch.testing.assert_close(early["x"], full["layer_results"][1])


def test_wrong_input_dimension_is_a_clear_error():
    model = MelHubertModel(tiny_config(stack_frames=2))
    with pytest.raises(InputError, match=r"feat_dim x stack_frames = 40 x 2 = 80"):
        model.extract_features(torch.randn(1, 10, 40))


def test_mask_before_projection_replaces_input_frames_with_mask_embedding():
    model = MelHubertModel(tiny_config(mask_prob=0.5, mask_length=3))
    seen = {}
    model.pre_extract_proj.register_forward_pre_hook(lambda mod, inp: seen.update(input=inp[0]))
    source, padding_mask = padded_batch([40, 40])
    out = model(source, padding_mask, sample_ids=torch.tensor([0, 1]))
    masked = out["mask_indices"]
    assert masked.any()
    assert (seen["input"][masked] == 0).all()  # zero mask embedding, as the original
    torch.testing.assert_close(seen["input"][~masked], source[~masked])


def test_learned_mask_embedding_is_a_parameter():
    model = MelHubertModel(tiny_config(learnable_mask_emb=True))
    assert any(name == "mask_emb" for name, _ in model.named_parameters())
    assert model.mask_emb.shape == (80,)
    after = MelHubertModel(tiny_config(learnable_mask_emb=True, mask_before_proj=False))
    assert after.mask_emb.shape == (32,)


# --- masking statistics ----------------------------------------------------------------------


def mask_stats(require_same_masks: bool, lengths, seed=1, epoch=0):
    cfg = SpanMaskConfig(mask_prob=0.7, mask_length=5, require_same_masks=require_same_masks)
    padding = torch.arange(max(lengths))[None, :] >= torch.tensor(lengths)[:, None]
    return span_mask(cfg, padding.shape, padding, seed, epoch, torch.arange(len(lengths))), padding


def test_per_utterance_masking_covers_expected_fraction():
    mask, padding = mask_stats(False, [500] * 64)
    # starts ~ 0.7/5 of frames, spans of 5 may overlap: P(uncovered) ~ (1 - 0.14)^5
    expected = 1 - (1 - 0.7 / 5) ** 5
    assert abs(mask.float().mean().item() - expected) < 0.03
    counts = mask.sum(1)
    assert counts.min() != counts.max(), "new masking draws each utterance independently"


def test_old_batch_dependent_masking_gives_equal_counts():
    lengths = [500, 420, 300, 260]
    mask, padding = mask_stats(True, lengths)
    counts = mask.sum(1)
    assert (counts == counts[0]).all(), "require_same_masks: every utterance masks the same number of frames"
    assert not (mask & padding).any()
    new_mask, _ = mask_stats(False, lengths)
    assert new_mask.sum(1)[0] > counts[0], "old masking trims the long utterances to the shortest's count"


def test_masks_are_reproducible_from_seed_update_and_sample_id():
    first, _ = mask_stats(False, [200, 200], seed=1, epoch=5)
    again, _ = mask_stats(False, [200, 200], seed=1, epoch=5)
    other_update, _ = mask_stats(False, [200, 200], seed=1, epoch=6)
    other_seed, _ = mask_stats(False, [200, 200], seed=2, epoch=5)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_update)
    assert not torch.equal(first, other_seed)


def test_masks_without_sample_ids_follow_torchs_generator():
    """Fine-tuning encoders pass no sample ids: the frame and channel masks come from torch's generator, which
    fairseq reseeds every update (common.seed + update), so a rerun or a resumed run masks the same frames."""
    model = MelHubertModel(tiny_config(mask_prob=0.5, mask_length=4, mask_channel_prob=0.5, mask_channel_length=4))
    source, padding_mask = padded_batch([50, 40])

    def masks(torch_seed, forwards=1):
        torch.manual_seed(torch_seed)
        inputs = []
        hook = model.encoder.pos_conv.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
        frame_masks = [model.extract_features(source, padding_mask, mask=True)["mask_indices"] for _ in range(forwards)]
        hook.remove()
        channel_masks = [(x == 0).all(dim=-1) for x in inputs]  # (B, C) channels zeroed at every frame
        return frame_masks, channel_masks

    (frames, second_frames), (channels, second_channels) = masks(3, forwards=2)
    (again,), (channels_again,) = masks(3)
    (other,), (other_channels,) = masks(4)
    assert frames.any() and channels.any()
    assert torch.equal(frames, again) and torch.equal(channels, channels_again)
    assert not torch.equal(frames, other) and not torch.equal(channels, other_channels)
    assert not torch.equal(frames, second_frames), "the micro-batches of one update get their own masks"
    assert not torch.equal(frames[0], frames[1]), "each utterance of a batch gets its own mask"


def test_channel_masks_with_sample_ids_do_not_depend_on_torchs_generator():
    model = MelHubertModel(tiny_config(mask_prob=0.5, mask_length=4, mask_channel_prob=0.5, mask_channel_length=4))
    x = torch.ones(2, 30, 32)
    torch.manual_seed(0)
    first = model.apply_channel_mask(x, torch.tensor([5, 9]))
    torch.manual_seed(1)
    assert torch.equal(first, model.apply_channel_mask(x, torch.tensor([5, 9])))


def test_an_utterance_mask_does_not_depend_on_its_batch():
    config = SpanMaskConfig(mask_prob=0.7, mask_length=5)
    padding = torch.zeros(3, 120, dtype=torch.bool)
    batch_a = span_mask(config, (3, 120), padding, 5, 11, torch.tensor([4, 7, 9]))
    batch_b = span_mask(config, (2, 120), padding[:2], 5, 11, torch.tensor([7, 2]))
    assert torch.equal(batch_a[1], batch_b[0]), "utterance 7's mask is the same in either batch"


def test_masks_are_fairseqs_seeded_compute_mask_indices():
    config = SpanMaskConfig(mask_prob=0.7, mask_length=5)
    padding = torch.arange(90)[None, :] >= torch.tensor([90, 70])[:, None]
    ours = span_mask(config, (2, 90), padding, 1, 4, torch.tensor([3, 8]))
    direct = compute_mask_indices(
        (2, 90), padding, 0.7, 5, "static", 0.0, min_masks=2, require_same_masks=False,
        seed=1, epoch=4, indices=torch.tensor([3, 8]),
    )
    assert torch.equal(ours, torch.from_numpy(direct))


def test_fully_masked_utterance_is_a_span_mask_error():
    config = SpanMaskConfig(mask_prob=0.7, mask_length=10)
    with pytest.raises(SpanMaskError, match="entire sequence is masked"):
        span_mask(config, (20, 6), None, 3, 7, torch.arange(20))  # two 10-frame spans in 6 frames


def test_normal_span_lengths_train():
    model = MelHubertModel(tiny_config(mask_selection="normal", mask_other=1.0))
    out = model(torch.randn(2, 50, 80), torch.zeros(2, 50, dtype=torch.bool), torch.tensor([0, 1]))
    assert out["mask_indices"].any()


def test_min_masks_applies_to_short_utterances():
    cfg = SpanMaskConfig(mask_prob=0.01, mask_length=2, mask_min_masks=2)
    mask = span_mask(cfg, (8, 40), None, 1, 0, torch.arange(8))
    assert (mask.sum(1) >= 2).all()


def test_unsupported_mask_options_fail_at_build():
    with pytest.raises(InputError, match="no_mask_overlap"):
        MelHubertModel(tiny_config(no_mask_overlap=True))


#: Masking fields the model itself applies, not a span masker: the seed and what a masked frame becomes.
MODEL_SIDE_MASK_FIELDS = {"mask_seed", "learnable_mask_emb", "mask_before_proj"}
#: A value other than the default for every other masking field of MelHubertConfig.
CHANGED_MASK_FIELDS = {
    "mask_prob": 0.55, "mask_length": 7, "mask_selection": "normal", "mask_other": 1.5, "no_mask_overlap": True,
    "mask_min_space": 3, "mask_min_masks": 4, "require_same_masks": True,
    "mask_channel_prob": 0.25, "mask_channel_length": 6, "mask_channel_selection": "poisson",
    "mask_channel_other": 2.5, "no_mask_channel_overlap": True, "mask_channel_min_space": 2,
}


def test_every_masking_field_of_the_model_config_reaches_its_masker(monkeypatch):
    """Each masking field arrives in the frame masker's config, each mask_channel_* one in the channel masker's
    (under the frame field's name); a masking field the model config gains must be added here and reach one."""
    defaults = {item.name: item.default for item in dataclasses.fields(MelHubertConfig)}
    assert {name for name in defaults if "mask" in name} - MODEL_SIDE_MASK_FIELDS == set(CHANGED_MASK_FIELDS)
    assert all(defaults[name] != value for name, value in CHANGED_MASK_FIELDS.items())
    # no_mask_overlap is refused at build (the test above): let it through to look at it.
    monkeypatch.setattr(mel_hubert, "check_span_mask_config", lambda cfg, what=None: None)
    # As fairseq passes it: a DictConfig, whose choice fields hold enums.
    model = MelHubertModel(OmegaConf.structured(tiny_config(**CHANGED_MASK_FIELDS)))
    for name, value in CHANGED_MASK_FIELDS.items():
        if "mask_channel" in name:
            masker, masker_field = model.channel_mask_config, name.replace("mask_channel", "mask")
        else:
            masker, masker_field = model.mask_config, name
        assert getattr(masker, masker_field) == value, name
    # Channel spans as HuBERT draws them: the same count in every utterance, none required.
    assert (model.channel_mask_config.require_same_masks, model.channel_mask_config.mask_min_masks) == (True, 0)


def test_model_input_dimensions_follow_the_task_in_the_recipe():
    """model.feat_dim and model.stack_frames come from the task, as fairseq-hydra-train fills and resolves
    config/pretrain/stage1.yaml: task.feat_dim=20 alone makes a model for 20-bin frames."""
    recipe = OmegaConf.load(REPO_ROOT / "config" / "pretrain" / "stage1.yaml")
    cfg = OmegaConf.structured(FairseqConfig)
    with open_dict(cfg):
        cfg.task = OmegaConf.merge(recipe.task, {"data": "/data", "label_dir": "/data", "feat_dim": 20, "stack_frames": 4})
        cfg.model = recipe.model
    add_defaults(cfg)  # what fairseq-hydra-train does first: the registered dataclasses' defaults under the yaml
    model = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)["model"]
    assert (model["feat_dim"], model["stack_frames"]) == (20, 4)


# --- criterion -------------------------------------------------------------------------------


class FakeTask:
    pass


def test_criterion_matches_hand_computed_cross_entropy():
    torch.manual_seed(0)
    model = MelHubertModel(tiny_config(num_classes=16, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))
    source, padding_mask = padded_batch([30, 22])
    target = torch.randint(0, 16, (2, 30))
    ids = torch.tensor([4, 9])
    sample = {
        "net_input": {"source": source, "padding_mask": padding_mask, "sample_ids": ids},
        "target": target,
        "ntokens": 52,
        "nsentences": 2,
    }
    criterion = HardLabelMaskedCe(FakeTask(), pred_masked_weight=1.0, pred_nomask_weight=0.5)
    loss, sample_size, log = criterion(model, sample)

    # Same masks again (seeded by update/sample id), then the loss by hand.
    out = model(source, padding_mask, sample_ids=ids)
    masked = out["mask_indices"] & ~padding_mask
    unmasked = ~out["mask_indices"] & ~padding_mask
    logits = model.final_proj(out["x"])
    log_probs = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
    expected = -(log_probs[masked].sum() + 0.5 * log_probs[unmasked].sum())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert sample_size == 52 == log["count_m"] + log["count_u"]
    assert log["count_m"] == int(masked.sum())
    predictions = logits.argmax(-1)
    assert log["correct_m"] == int((predictions == target)[masked].sum())
    assert HardLabelMaskedCe.logging_outputs_can_be_summed()


def test_criterion_default_predicts_masked_frames_only():
    model = MelHubertModel(tiny_config())
    source, padding_mask = padded_batch([30, 30])
    sample = {
        "net_input": {"source": source, "padding_mask": padding_mask, "sample_ids": torch.arange(2)},
        "target": torch.randint(0, 16, (2, 30)),
        "ntokens": 60,
        "nsentences": 2,
    }
    loss, sample_size, log = HardLabelMaskedCe(FakeTask(), 1.0, 0.0)(model, sample)
    assert sample_size == log["count_m"] > 0
    assert log["loss_u"] == 0.0 and log["correct_u"] == 0
    loss.backward()
    assert model.final_proj.weight.grad is not None
    assert math.isfinite(loss.item())
