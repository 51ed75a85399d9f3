"""fairseq's own CTC fine-tuning (wav2vec_ctc, audio_finetuning) of mel_hubert checkpoints."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import DEMO_CORPUS, REPO_ROOT, assert_bit_identical, run_and_kill_during_save, small_corpus
from melhubert_fairseq.checkpoint_loading import safe_torch_load
from melhubert_fairseq.file_sniffing import CheckpointFormatError
from melhubert_fairseq.finetuning import (
    check_finetuning_checkpoint,
    letter_targets,
    normalise_transcript,
    write_finetuning_data,
)
from melhubert_fairseq.models.waveform_frontend import collate_waveforms



def ctc_encoder(w2v_path: Path, data_dir: Path, **overrides):
    """fairseq's Wav2VecEncoder (the encoder of wav2vec_ctc) as fine-tuning builds it, with 10 output classes."""
    from fairseq.models.wav2vec.wav2vec2_asr import Wav2Vec2CtcConfig, Wav2VecEncoder

    cfg = OmegaConf.structured(
        Wav2Vec2CtcConfig(w2v_path=str(w2v_path), normalize=False, data=str(data_dir), ddp_backend="no_c10d", **overrides)
    )
    return Wav2VecEncoder(cfg, output_size=10)


def demo_waveforms():
    """Two bundled utterances of different lengths as a right-padded batch."""
    from melhubert_fairseq.data.fbank import load_audio

    waves = [torch.from_numpy(load_audio(str(DEMO_CORPUS / path))) for path in (
        "spk01_en-us-nyc_m2/spk01-000.flac", "spk02_en-gb_m4/spk02-009.flac"
    )]
    return collate_waveforms(waves)


def test_letter_targets_follow_fairseq_libri_labels():
    words = normalise_transcript("Fresh bread sells out before nine o'clock.")
    assert words == "FRESH BREAD SELLS OUT BEFORE NINE O'CLOCK"
    assert letter_targets("HI THERE") == "H I | T H E R E |"


def test_finetuning_data_layout(tmp_path):
    data = small_corpus(tmp_path, train=3, valid=1)
    assert sorted(os.listdir(data)) == [
        "dict.ltr.txt", "train.ltr", "train.tsv", "train.wrd", "valid.ltr", "valid.tsv", "valid.wrd"
    ]
    rows = (data / "train.tsv").read_text().splitlines()
    assert rows[0] == str(DEMO_CORPUS) and len(rows) == 4  # absolute root: fairseq reads it against the cwd
    first_utt = Path(rows[1].split("\t")[0]).stem
    text = next(line.split("\t")[-1] for line in (DEMO_CORPUS / "transcripts.tsv").read_text().splitlines() if line.startswith(first_utt))
    assert (data / "train.wrd").read_text().splitlines()[0] == normalise_transcript(text)
    assert (data / "train.ltr").read_text().splitlines()[0] == letter_targets(normalise_transcript(text))
    symbols = [line.split()[0] for line in (data / "dict.ltr.txt").read_text().splitlines()]
    used = set(" ".join(open(data / f"{s}.ltr").read() for s in ("train", "valid")).split())
    assert set(symbols) == used and symbols[0] == "|"


def test_finetuning_data_bad_input_is_named_and_nothing_is_written(tmp_path):
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{DEMO_CORPUS}\nspk01_en-us-nyc_m2/spk01-000.flac\t47216\nnobody/unknown-utt.flac\t16000\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(manifest))}:3 \(unknown-utt\): no transcript"):
        write_finetuning_data({"train": str(manifest)}, str(DEMO_CORPUS / "transcripts.tsv"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_wav2vec_encoder_loads_our_checkpoint_and_trains_as_fairseq_does(tiny_checkpoint, tmp_path):
    """Strict load, remove_pretraining_modules, mask=apply_mask and training, freeze_finetune_updates, CTC logits."""
    data = small_corpus(tmp_path, train=1, valid=1)
    pretrained = safe_torch_load(str(tiny_checkpoint))["model"]
    encoder = ctc_encoder(
        tiny_checkpoint, data, apply_mask=True, mask_prob=0.5, mask_length=2, mask_channel_prob=0.5,
        mask_channel_length=8, layerdrop=0.1, dropout_input=0.1, freeze_finetune_updates=2,
    )
    model = encoder.w2v_model
    assert model.final_proj is None
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, pretrained[name], rtol=0, atol=0, equal_nan=True)
    # Wav2VecEncoder's overrides reached the model
    assert model.encoder.layerdrop == 0.1 and model.mask_config.mask_prob == 0.5 and model.mask_config.require_same_masks
    assert model.channel_mask_config.mask_prob == 0.5 and model.dropout_input.p == 0.1

    batch, padding_mask = demo_waveforms()
    encoder.train()
    out = encoder(source=batch, padding_mask=padding_mask)
    logits, frame_padding = out["encoder_out"], out["padding_mask"]
    assert logits.shape[1:] == (2, 10) and frame_padding.shape == (2, logits.shape[0])
    assert frame_padding[0].sum() > 0 and not frame_padding[1].any()  # the first utterance is the shorter one
    logits[~frame_padding.T].logsumexp(-1).sum().backward()
    assert encoder.proj.weight.grad is not None
    assert all(p.grad is None for p in model.parameters()), "frozen for freeze_finetune_updates"

    encoder.set_num_updates(2)  # unfrozen from here on
    out = encoder(source=batch, padding_mask=padding_mask)
    out["encoder_out"][~out["padding_mask"].T].logsumexp(-1).sum().backward()
    assert model.pre_extract_proj.weight.grad.abs().sum() > 0 and model.encoder.layers[0].fc1.weight.grad is not None

    encoder.eval()
    with torch.no_grad():
        first = encoder(source=batch, padding_mask=padding_mask)["encoder_out"]
        second = encoder(source=batch, padding_mask=padding_mask)["encoder_out"]
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no masking, dropout or layerdrop in eval


def test_channel_masking_zeroes_whole_channel_spans():
    from melhubert_fairseq.models.mel_hubert import MelHubertConfig, MelHubertModel

    cfg = OmegaConf.merge(
        OmegaConf.structured(MelHubertConfig),
        {"feat_dim": 40, "stack_frames": 2, "num_classes": 8, "mask_seed": 0, "encoder_layers": 1, "encoder_embed_dim": 32,
         "encoder_ffn_embed_dim": 64, "encoder_attention_heads": 4, "conv_pos": 8, "conv_pos_groups": 4,
         "mask_channel_prob": 0.5, "mask_channel_length": 4},
    )
    model = MelHubertModel(cfg)
    x = torch.ones(3, 20, 32)
    masked = model.apply_channel_mask(x)
    zeroed = masked == 0
    assert zeroed.any() and (zeroed.all(dim=1) | ~zeroed.any(dim=1)).all(), "a channel is masked at every frame or none"
    assert (zeroed[:, 0].sum(-1) == zeroed[0, 0].sum()).all(), "same number of masked channels per utterance"
    # in the model: only when masking (fine-tuning passes mask=apply_mask and training), after the projection
    conv_inputs = []
    model.encoder.pos_conv.register_forward_pre_hook(lambda _m, args: conv_inputs.append(args[0]))
    frames = torch.randn(3, 20, 80)
    for mask in (True, False):
        model.extract_features(frames, mask=mask)
    whole_channels_zero = [(x == 0).all(dim=-1).any().item() for x in conv_inputs]  # (B, C, T) -> any (b, c)
    assert whole_channels_zero == [True, False]
    with pytest.raises(ValueError, match=r"channel masking \(mask_channel_\*\): no_mask_overlap=true is not supported"):
        MelHubertModel(OmegaConf.merge(cfg, {"no_mask_channel_overlap": True}))


def test_random_init_ignores_the_checkpoint_weights_but_keeps_its_fbank_statistics(tiny_checkpoint, tmp_path):
    """model.no_pretrained_weights=true: the network of w2v_path, initialised from the seed, not from the file."""
    data = small_corpus(tmp_path, train=1, valid=1)
    state = safe_torch_load(str(tiny_checkpoint))
    for name, value in state["model"].items():
        if name != "fbank_mean_std":
            value.add_(1.0)  # weights no initialisation can produce
    shifted = tmp_path / "shifted.pt"
    torch.save(state, shifted)

    def encoder_weights(path, **overrides):
        torch.manual_seed(0)
        return ctc_encoder(path, data, **overrides).w2v_model.state_dict()

    loaded = encoder_weights(shifted)
    random_init = encoder_weights(shifted, no_pretrained_weights=True)
    assert set(random_init) == set(loaded) and len(random_init) > 10
    for name, value in random_init.items():
        assert value.shape == loaded[name].shape, name  # the same network
        if name == "fbank_mean_std":
            torch.testing.assert_close(value, state["model"][name], rtol=0, atol=0)  # data, not weights: kept
        else:
            torch.testing.assert_close(loaded[name], state["model"][name], rtol=0, atol=0)
            assert (value - loaded[name]).abs().max() > 0.5, f"{name} came from the file"
    # independent of the file: the same random init from the unshifted checkpoint
    for name, value in encoder_weights(tiny_checkpoint, no_pretrained_weights=True).items():
        torch.testing.assert_close(value, random_init[name], rtol=0, atol=0)
    batch, padding_mask = demo_waveforms()
    encoder = ctc_encoder(shifted, data, no_pretrained_weights=True).eval()
    assert torch.isfinite(encoder(source=batch, padding_mask=padding_mask)["encoder_out"]).all()


def test_checkpoint_without_fbank_statistics_is_named(tiny_checkpoint, tmp_path):
    state = safe_torch_load(str(tiny_checkpoint))
    state["model"]["fbank_mean_std"].fill_(float("nan"))
    no_stats = tmp_path / "no_stats.pt"
    torch.save(state, no_stats)
    with pytest.raises(CheckpointFormatError, match=rf"^{re.escape(str(no_stats))}: .*does not record the fbank mean/std"):
        check_finetuning_checkpoint(str(no_stats))
    data = small_corpus(tmp_path, train=1, valid=1)
    encoder = ctc_encoder(no_stats, data)
    batch, padding_mask = demo_waveforms()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(no_stats))} does not record the corpus mean/std"):
        encoder(source=batch, padding_mask=padding_mask)


@pytest.mark.slow  # two fresh interpreters run the demo's console script
def test_non_mel_hubert_w2v_path_is_a_one_line_error(tmp_path):
    random_file = tmp_path / "random.pt"
    random_file.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointFormatError, match=rf"^{re.escape(str(random_file))}: not a torch checkpoint"):
        ctc_encoder(random_file, tmp_path)
    hubert = tmp_path / "hubert.pt"
    torch.save({"cfg": {"model": {"_name": "hubert"}, "task": {"_name": "hubert_pretraining"}}, "model": {}}, hubert)
    for bad, reason in ((random_file, "not a torch checkpoint"), (hubert, "a fairseq 'hubert' checkpoint, not 'mel_hubert'")):
        result = subprocess.run(
            [sys.executable, "-m", "melhubert_fairseq.tools.run_demo", "--pretrained", str(bad), "--out-dir", str(tmp_path / "out")],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: {reason}"), result.stderr
        assert not (tmp_path / "out").exists()


def finetune_command(data: Path, w2v_path: Path, save_dir: Path, max_update: int, *overrides: str):
    """fairseq-hydra-train of config/finetune_demo.yaml on a small corpus, shrunk to a few seconds."""
    return [
        sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", "config", "--config-name", "finetune_demo",
        "common.user_dir=melhubert_fairseq", f"task.data={data}", f"model.w2v_path={w2v_path}",
        f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}/hydra", f"optimization.max_update={max_update}",
        "model.freeze_finetune_updates=1", "common.log_interval=1", "dataset.max_tokens=120000", *overrides,
    ]


def run_finetuning(command) -> subprocess.CompletedProcess:
    """Run a :func:`finetune_command` from the repo root with one thread."""
    return subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )


def test_wav2vec_ctc_finetunes_through_fairseq_hydra_train(tiny_checkpoint, tmp_path):
    data = small_corpus(tmp_path, train=4, valid=2)
    save_dir = tmp_path / "ft"
    w2v_path = tmp_path / "pretrained.pt"
    shutil.copy(tiny_checkpoint, w2v_path)
    result = run_finetuning(finetune_command(data, w2v_path, save_dir, 3))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (save_dir / "hydra" / "hydra_train.log").read_text()
    train_lines = [json.loads(m) for m in re.findall(r"\]\[train_inner\]\[INFO\] - (\{.*\})", log)]
    assert [int(line["num_updates"]) for line in train_lines] == [1, 2, 3]
    assert all(math.isfinite(float(line["loss"])) for line in train_lines)
    valid = [json.loads(m) for m in re.findall(r"\]\[valid\]\[INFO\] - (\{.*\})", log)][-1]
    assert float(valid["valid_uer"]) >= 0 and int(valid["valid_num_updates"]) == 3

    from fairseq import checkpoint_utils

    pretrained = safe_torch_load(str(w2v_path))["model"]
    w2v_path.unlink()  # the fine-tuned checkpoint is rebuilt from its own config, without the pretrained file
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(save_dir / "checkpoint_last.pt")])
    model = models[0].eval()
    assert cfg.model._name == "wav2vec_ctc" and cfg.model.w2v_args.model._name == "mel_hubert"
    w2v = model.w2v_encoder.w2v_model
    fc1 = w2v.encoder.layers[0].fc1.weight
    # started from the pretrained weights and moved by 2 small Adam steps (the first update was frozen)
    assert 0 < (fc1 - pretrained["encoder.layers.0.fc1.weight"]).abs().max() < 0.01
    batch, padding_mask = demo_waveforms()
    with torch.no_grad():
        out = model(source=batch, padding_mask=padding_mask)
        log_probs = model.get_normalized_probs(out, log_probs=True)
    assert log_probs.shape[1:] == (2, len(task.target_dictionary)) and torch.isfinite(log_probs[:, 1]).all()


def test_killed_finetuning_reruns_bit_exact_and_a_finished_run_stays_finished(tiny_checkpoint, tmp_path):
    """SIGKILL during a checkpoint save, rerun the same command: the run resumes and ends bit for bit where
    an uninterrupted run ends (masks, dropout, data order and the learning rate all resume exactly); a
    rerun of a finished run says so and changes nothing."""
    data = small_corpus(tmp_path, train=4, valid=2)  # 2 batches an epoch: the kill lands in epoch 1 or 2 of 3
    total, saving = 6, ["checkpoint.save_interval_updates=1", "checkpoint.keep_interval_updates=2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    pool = ThreadPoolExecutor(max_workers=1)  # the two runs of each stage side by side, one thread each
    straight_command = finetune_command(data, tiny_checkpoint, straight, total, *saving)
    straight_run = pool.submit(run_finetuning, straight_command)
    command = finetune_command(data, tiny_checkpoint, killed, total, *saving)
    run_and_kill_during_save(command, nth_save=2, delay=0.02)
    resumed_at = safe_torch_load(str(killed / "checkpoint_last.pt"))["optimizer_history"][-1]["num_updates"]
    assert 0 < resumed_at < total
    assert straight_run.result().returncode == 0

    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in straight.glob("*.pt")}
    finished_rerun = pool.submit(run_finetuning, straight_command)
    rerun = run_finetuning(command)
    log = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, log[-3000:]
    assert f"Loaded checkpoint {killed / 'checkpoint_last.pt'}" in log and f"@ {resumed_at} updates" in log
    assert_bit_identical(straight, killed, f"fine-tuning killed after update {resumed_at} and rerun")

    again = finished_rerun.result()
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-3000:]
    assert "training already finished" in log and f"max_update={total}" in log
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in straight.glob("*.pt")} == finished
