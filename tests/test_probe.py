"""melhubert-probe: SUPERB-style frozen probes (PR, few-shot SID), its upstreams, bad input, and the probe
during pretraining (metrics logged, training untouched, resume bit-exact)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import make_fbank_corpus, run_hydra_train
from melhubert_fairseq.checkpoint_loading import safe_torch_load
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.probe.features import (
    FBANK,
    PRETRAINED,
    RANDOM_INIT,
    extract_probe_features,
    load_upstream,
    read_probe_manifest,
)
from melhubert_fairseq.probe.heads import WeightedLayerSum, error_rate, greedy_ctc_decode, mean_pool
from melhubert_fairseq.probe.run import check_probe_data, load_probe_data, run_pr, run_sid
from melhubert_fairseq.tools import probe as probe_tool


# --- metrics against hand-computed cases ---------------------------------------------------------


def one_hot_logits(best, vocab=4):
    logits = torch.full((len(best), vocab), -5.0)
    logits[torch.arange(len(best)), torch.as_tensor(best)] = 5.0
    return logits


def test_greedy_ctc_merges_repeats_drops_blanks_and_ignores_padding():
    # blank=0; "1 1 0 1" is two 1s (a blank separates them); frames past the length are padding.
    logits = one_hot_logits([0, 1, 1, 0, 1, 2, 2, 0, 3, 3])
    assert greedy_ctc_decode(logits, length=8) == [1, 1, 2]
    assert greedy_ctc_decode(logits, length=10) == [1, 1, 2, 3]


def test_phone_error_rate_is_total_edits_over_total_reference_phones():
    # utt 1: "a b c" -> "a c": 1 deletion; utt 2: "d" -> "e f": 1 substitution + 1 insertion.
    assert error_rate([[1, 3], [5, 6]], [[1, 2, 3], [4]]) == pytest.approx(100 * 3 / 4)
    assert error_rate([[1, 2]], [[1, 2]]) == 0.0


def test_mean_pooling_averages_only_the_real_frames_of_a_padded_batch():
    states = torch.tensor([[[1.0], [3.0], [100.0]], [[2.0], [-50.0], [-50.0]]])  # (B=2, T=3, C=1)
    padding = torch.tensor([[False, False, True], [False, True, True]])
    assert mean_pool(states, padding).flatten().tolist() == [2.0, 2.0]
    # With a leading states axis, every state is pooled alike.
    stacked = torch.stack([states, 2 * states])
    assert mean_pool(stacked, padding).flatten().tolist() == [2.0, 2.0, 4.0, 4.0]


def test_layer_weights_are_positive_sum_to_one_and_weigh_the_states():
    featurizer = WeightedLayerSum(3)
    with torch.no_grad():
        featurizer.logits.copy_(torch.tensor([0.0, 1.0, -2.0]))
    weights = featurizer.weights()
    assert float(weights.sum()) == pytest.approx(1.0) and bool((weights > 0).all())
    states = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(0))
    expected = sum(weights[k] * states[k] for k in range(3))
    # float32 sums in another order: absolute tolerance, since relative alone fails on values near zero
    assert torch.allclose(featurizer(states), expected, rtol=1e-5, atol=1e-6)


# --- a tiny probe set on synthetic fbank ---------------------------------------------------------


def write_probe_set(directory: Path, num_speakers: int = 3, per_speaker: int = 4, seed: int = 0) -> Path:
    """Feature manifest ``probe.tsv`` with ``.spk`` and ``.phn``: each speaker's frames carry its own offset,
    and each phone its own frame pattern, so both probes can learn from fbank alone."""
    rng = np.random.default_rng(seed)
    feats = directory / "feats"
    feats.mkdir(parents=True)
    patterns = rng.standard_normal((3, 40)) * 3
    silence = np.zeros((4, 40))
    rows, phones, speakers = [], [], []
    for s in range(num_speakers):
        offset = rng.standard_normal(40)
        for u in range(per_speaker):
            ids = rng.integers(0, 3, size=6)
            # Each phone is one stacked frame followed by two of silence: CTC's spike has one place to go.
            frames = np.concatenate([np.concatenate([np.repeat(patterns[i][None], 2, axis=0), silence]) for i in ids])
            frames += offset
            frames += 0.1 * rng.standard_normal(frames.shape)
            name = f"s{s}u{u}"
            np.save(feats / f"{name}.npy", frames.astype(np.float32))
            rows.append(f"{name}.npy\t{len(frames)}")
            phones.append(" ".join("abc"[i] for i in ids))
            speakers.append(f"spk{s}")
    (directory / "probe.tsv").write_text(f"{feats}\n" + "\n".join(rows) + "\n")
    (directory / "probe.phn").write_text("\n".join(phones) + "\n")
    (directory / "probe.spk").write_text("\n".join(speakers) + "\n")
    return directory / "probe.tsv"


def test_fbank_floor_is_the_stacked_normalised_fbank_and_both_probes_learn_from_it(tmp_path):
    manifest = write_probe_set(tmp_path)
    data = load_probe_data([str(manifest)], [str(manifest)], ("pr", "sid"))
    check_probe_data(data, ("pr", "sid"), shots=2)
    features = extract_probe_features(load_upstream(FBANK, None, stack=2), data.rows, True, True, progress=False)
    assert features.num_states == 1
    first = np.load(tmp_path / "feats" / "s0u0.npy")
    stacked = first.reshape(-1, 80)  # 36 frames -> 18 stacked pairs
    expected = (stacked - stacked.mean(1, keepdims=True)) / np.sqrt(stacked.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(features.utterance(0)[0], expected, atol=1e-4)
    np.testing.assert_allclose(features.pooled[0, 0], expected.mean(0), atol=1e-4)
    sid = run_sid(features, data, seeds=[1, 2], shots=2)
    assert sid.values == [100.0, 100.0] and sid.num_train == 6 and sid.num_test == 18
    pr = run_pr(features, data, seeds=[1])
    assert pr.values[0] < 5.0  # three well-separated phones, each one stacked frame between silences
    assert pr.layer_weights[0].tolist() == [1.0]


def test_random_init_keeps_no_weight_of_the_file_but_its_fbank_statistics(tiny_checkpoint):
    state = safe_torch_load(str(tiny_checkpoint))["model"]
    torch.manual_seed(1)
    fresh = load_upstream(RANDOM_INIT, str(tiny_checkpoint), seed=0).reader.model.state_dict()
    for name, tensor in state.items():
        if name == "fbank_mean_std":
            assert torch.equal(fresh[name], tensor)
        elif tensor.numel() > 1 and tensor.is_floating_point() and tensor.std() > 0:
            assert not torch.equal(fresh[name], tensor), f"{name} came from the checkpoint"
    torch.manual_seed(2)
    again = load_upstream(RANDOM_INIT, str(tiny_checkpoint), seed=0).reader.model.state_dict()
    # Seeded by its own seed, whatever the global stream: the same twin every time.
    assert all(torch.equal(again[name], fresh[name]) for name in fresh)
    pretrained = load_upstream(PRETRAINED, str(tiny_checkpoint)).reader.model.state_dict()
    assert all(torch.equal(pretrained[name], state[name]) for name in state)


def test_the_cli_probes_a_checkpoint_with_seeds_weights_and_per_layer_results(tmp_path, tiny_checkpoint, capsys):
    manifest = write_probe_set(tmp_path)
    probe_tool.main([
        "sid", "--train", str(manifest), "--shots", "2", "--seeds", "2", "--per-layer", "--checkpoint",
        str(tiny_checkpoint), "--no-progress", "--threads", "1",
    ])
    out = capsys.readouterr().out
    assert re.search(r"sid pretrained: accuracy [\d.]+ ± [\d.]+ % \(2 seeds: [\d.]+ [\d.]+; 6 train / 6 test", out)
    weights = [float(w) for w in re.search(r"state weights 0\.\.2: ([\d. ]+)", out).group(1).split()]
    assert len(weights) == 3 and sum(weights) == pytest.approx(1.0, abs=0.02)
    assert all(f"state {k} alone: accuracy" in out for k in range(3))
    assert "probed pretrained" in out.splitlines()[-1]


# --- bad input: one error line, exit 2 -------------------------------------------------------------


def run_cli(monkeypatch, capsys, args):
    monkeypatch.setattr(sys, "argv", ["melhubert-probe", *args])
    code = probe_tool.main()
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, errors


def break_line_count(tmp):
    lines = (tmp / "probe.spk").read_text().splitlines()
    (tmp / "probe.spk").write_text("\n".join(lines[:-1]) + "\n")
    return ["sid", "--shots", "2"], "probe.spk:12 (s2u3): missing: the file has 11 lines but"


def add_a_line(tmp):
    (tmp / "probe.phn").write_text((tmp / "probe.phn").read_text() + "a b\n")
    return ["pr", "--test", str(tmp / "probe.tsv")], "probe.phn:13: one line too many"


def unseen_phone(tmp):
    (tmp / "test.tsv").write_text((tmp / "probe.tsv").read_text())
    lines = (tmp / "probe.phn").read_text().splitlines()
    lines[4] = lines[4] + " zz"
    (tmp / "test.phn").write_text("\n".join(lines) + "\n")
    return ["pr", "--test", str(tmp / "test.tsv")], "test.phn:5 (s1u0): phone 'zz' never occurs in the training labels"


def unseen_speaker(tmp):
    (tmp / "test.tsv").write_text((tmp / "probe.tsv").read_text())
    lines = (tmp / "probe.spk").read_text().splitlines()
    lines[2] = "spk9"
    (tmp / "test.spk").write_text("\n".join(lines) + "\n")
    return ["sid", "--test", str(tmp / "test.tsv")], "test.spk:3 (s0u2): speaker 'spk9' never occurs in the training speakers"


def too_few_for_the_shots(tmp):
    return ["sid", "--shots", "4"], "probe.spk:1 (s0u0): speaker 'spk0' has 4 utterance(s)"


def not_a_mel_hubert_checkpoint(tmp):
    state = {"model": {}, "cfg": {"model": {"_name": "hubert"}, "task": {}}}
    torch.save(state, tmp / "hubert.pt")
    return ["sid", "--shots", "2", "--checkpoint", str(tmp / "hubert.pt")], "hubert.pt: a fairseq 'hubert' checkpoint, not 'mel_hubert'"


@pytest.mark.parametrize(
    "make", [break_line_count, add_a_line, unseen_phone, unseen_speaker, too_few_for_the_shots, not_a_mel_hubert_checkpoint]
)
def test_bad_input_is_one_error_line_naming_file_and_line(tmp_path, monkeypatch, capsys, make):
    manifest = write_probe_set(tmp_path)
    args, message = make(tmp_path)
    if "--checkpoint" not in args:
        args += ["--fbank"]
    code, errors = run_cli(monkeypatch, capsys, [*args, "--train", str(manifest), "--no-progress"])
    assert code == 2 and len(errors) == 1 and message in errors[0], errors


def test_an_audio_manifest_without_a_checkpoint_is_refused_for_the_fbank_floor(tmp_path, monkeypatch, capsys):
    corpus = Path(__file__).resolve().parents[1] / "demo" / "corpus"
    code, errors = run_cli(monkeypatch, capsys, ["sid", "--fbank", "--train", str(corpus / "train.tsv"), "--shots", "2"])
    assert code == 2 and len(errors) == 1 and "needs a checkpoint for its fbank statistics" in errors[0], errors


def test_demo_corpus_labels_line_up_with_its_manifests():
    corpus = Path(__file__).resolve().parents[1] / "demo" / "corpus"
    data = load_probe_data(
        [str(corpus / "train.tsv")], [str(corpus / "valid.tsv")], ("pr", "sid"), str(corpus / "phones.map")
    )
    check_probe_data(data, ("pr", "sid"), shots=2)
    assert len(data.rows) == 120 and len({s.tokens[0] for s in data.speakers}) == 12
    # Speaker labels are the utterance ids' prefixes; espeak-ng's phones of the first train utterance.
    assert all(s.tokens[0] == row.utt_id.split("-")[0] for s, row in zip(data.speakers, data.rows))
    assert data.phones[0].tokens[:6] == ("D", "@2", "m", "O@", "n", "I")
    with pytest.raises(InputError, match="valid.phn:8 .spk08-051.: phone 't\\[' never occurs"):
        check_probe_data(load_probe_data([str(corpus / "train.tsv")], [str(corpus / "valid.tsv")], ("pr",)), ("pr",), None)


# --- the probe during pretraining ------------------------------------------------------------------


def train_with_validation(data: Path, save_dir: Path, max_update: int, probe: Path = None):
    """A tiny run validating after every update (valid = train), saving every update, with the probe every
    second validation when ``probe`` (a probe manifest) is given."""
    overrides = [
        "dataset.disable_validation=false", "dataset.validate_interval_updates=1", "dataset.valid_subset=valid",
        "checkpoint.save_interval_updates=1", "checkpoint.keep_interval_updates=-1",
        "task.max_sample_size=60", "task.min_sample_size=null",
    ]
    if probe is not None:
        overrides += [
            f"task.probe_train={probe}", f"task.probe_test={probe}", "task.probe_interval=2", "task.probe_pr_steps=20",
            "task.probe_sid_steps=20",
        ]
    result = run_hydra_train(data, save_dir, max_update=max_update, max_tokens=240, overrides=overrides)
    return result.stdout + result.stderr


def valid_lines(log: str):
    return [json.loads(line) for line in re.findall(r"\]\[valid\]\[INFO\] - (\{.*\})", log)]


def test_the_probe_during_training_logs_its_metrics_and_leaves_a_resumed_run_bit_exact(tmp_path):
    from test_resume import assert_bit_identical

    data = make_fbank_corpus(tmp_path / "data", num_utts=10)
    for suffix in ("tsv", "km"):
        (data / f"valid.{suffix}").write_text((data / f"train.{suffix}").read_text())
    probe = write_probe_set(tmp_path / "probe")
    plain, probed = tmp_path / "plain", tmp_path / "probed"
    train_with_validation(data, plain, 4)
    first = train_with_validation(data, probed, 1, probe)
    resumed = train_with_validation(data, probed, 4, probe)
    # Training is untouched: the probed run, stopped after update 1 and resumed, ends bit for bit where the
    # run without the probe ends.
    assert_bit_identical(plain, probed, "probed every second validation, resumed after update 1")
    # Probed at validations 1 and 3 (updates 1 and 3): the resumed run kept counting validations.
    lines = valid_lines(first) + valid_lines(resumed)
    assert [int(line["valid_num_updates"]) for line in lines] == [1, 2, 3, 4]
    probed_updates = [int(line["valid_num_updates"]) for line in lines if "valid_probe_sid_acc" in line]
    assert probed_updates == [1, 3], lines
    for line in lines:
        if "valid_probe_sid_acc" in line:
            assert 0 <= float(line["valid_probe_pr_per"]) and 0 <= float(line["valid_probe_sid_acc"]) <= 100
            assert "valid_acc_m" in line  # next to the masked accuracy
