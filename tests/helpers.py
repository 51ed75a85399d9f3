"""What the tests share besides fixtures (those are in conftest.py): this checkout's paths,
synthetic fbank corpora, fairseq-hydra-train as the README runs it, and an independent
reference of the original Mel-HuBERT model and checkpoint format.

The reference model (second half) is written from the published architecture
(nervjack2/MelHuBERT model.py/module.py, and the 2022 release's causal attention
mask: nervjack2/Speech-SSL-Compression melhubert/model.py; fairseq wav2vec2's
TransformerSentenceEncoderLayer, fairseq MultiheadAttention, HuBERT's
convolutional positional embedding) without using this package's model code,
and saved exactly as the original ``pretrain_expert.save_model`` does.
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from fairseq import checkpoint_utils
from torch import nn

import melhubert_fairseq
from melhubert_fairseq.checkpoint_loading import safe_torch_load
from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS

melhubert_fairseq.register_with_fairseq()  # the tests load checkpoints with fairseq's own functions

# --- this checkout, synthetic corpora, training runs --------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The bundled real-speech corpus (120 espeak-ng utterances, FLAC, transcripts.tsv).
DEMO_CORPUS = REPO_ROOT / "demo" / "corpus"

#: Overrides that shrink the Base model to something a 2-core CPU trains in seconds.
TINY_MODEL_OVERRIDES = [
    "model.encoder_layers=2",
    "model.encoder_embed_dim=64",
    "model.encoder_ffn_embed_dim=128",
    "model.encoder_attention_heads=4",
    "model.conv_pos=16",
    "model.conv_pos_groups=4",
]


def make_fbank_corpus(
    directory: Path,
    num_utts: int = 12,
    min_frames: int = 180,
    max_frames: int = 400,
    num_classes: int = 32,
    feat_dim: int = FBANK_NUM_MEL_BINS,
    split: str = "train",
    seed: int = 0,
    dtype=np.float32,
) -> Path:
    """Write ``{split}.tsv``, ``{split}.km``, ``dict.km.txt`` and random normalised fbank .npy files."""
    rng = np.random.default_rng(seed)
    feat_dir = directory / "feats"
    feat_dir.mkdir(parents=True, exist_ok=True)
    rows: List[str] = []
    label_lines: List[str] = []
    for index in range(num_utts):
        frames = int(rng.integers(min_frames, max_frames + 1))
        np.save(feat_dir / f"utt{index:03d}.npy", rng.standard_normal((frames, feat_dim)).astype(dtype))
        rows.append(f"utt{index:03d}.npy\t{frames}")
        label_lines.append(" ".join(map(str, rng.integers(0, num_classes, frames))))
    (directory / f"{split}.tsv").write_text(f"{feat_dir}\n" + "\n".join(rows) + "\n")
    (directory / f"{split}.km").write_text("\n".join(label_lines) + "\n")
    (directory / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(num_classes)))
    return directory


def hydra_train_command(
    data_dir: Path,
    save_dir: Path,
    overrides: Sequence[str] = (),
    config_name: str = "stage1",
    num_classes: int = 32,
    max_update: int = 2,
    tiny: bool = True,
    num_workers: int = 0,
    update_freq: int = 1,
    max_tokens: int = 1200,
    labels: bool = True,
) -> List[str]:
    """``fairseq-hydra-train`` exactly as the README runs it (relative user_dir, from the repo root);
    ``labels`` False leaves out the label folder and K (a config that reads no labels)."""
    label_args = [f"task.label_dir={data_dir}", f"task.num_classes={num_classes}"] if labels else []
    return [
        sys.executable,
        "-m",
        "fairseq_cli.hydra_train",
        "--config-dir",
        "config",
        "--config-name",
        config_name,
        "common.user_dir=melhubert_fairseq",
        f"task.data={data_dir}",
        *label_args,
        f"optimization.max_update={max_update}",
        f"optimization.update_freq=[{update_freq}]",
        f"dataset.num_workers={num_workers}",
        f"dataset.max_tokens={max_tokens}",
        "common.log_interval=1",
        "common.tensorboard_logdir=null",
        "dataset.disable_validation=true",  # the synthetic corpora have no valid split
        f"checkpoint.save_dir={save_dir}",
        f"hydra.run.dir={save_dir}/hydra",
        *(TINY_MODEL_OVERRIDES if tiny else []),
        *overrides,
    ]


def run_hydra_train(
    data_dir: Path, save_dir: Path, check: bool = True, env: Optional[dict] = None, **command_args
) -> subprocess.CompletedProcess:
    """Run :func:`hydra_train_command` (``command_args`` are its keywords) from the repo root, one thread;
    raise with its output if it fails and ``check``."""
    command = hydra_train_command(data_dir, save_dir, **command_args)
    result = subprocess.run(
        command,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"fairseq-hydra-train failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def parameters(save_dir: Path):
    """The model parameters in ``save_dir``'s checkpoint_last.pt."""
    return safe_torch_load(str(save_dir / "checkpoint_last.pt"))["model"]


def assert_bit_identical(expected: Path, actual: Path, what: str) -> None:
    """The checkpoint_last.pt parameters of two save dirs are equal bit for bit (NaN equal to NaN)."""
    a, b = parameters(expected), parameters(actual)
    assert a.keys() == b.keys()
    # Bit for bit; NaN == NaN (fbank_mean_std is NaN when the corpus statistics are unknown).
    different = [
        name
        for name in a
        if not (torch.equal(a[name].isnan(), b[name].isnan()) and torch.equal(a[name].nan_to_num(), b[name].nan_to_num()))
    ]
    assert not different, f"{what}: {len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


def run_and_kill_during_save(command, nth_save: int, delay: float) -> bool:
    """Start ``command``, SIGKILL it ``delay`` s after fairseq logs the start of its ``nth_save``-th
    checkpoint save; True if that save had not finished (fairseq's "Saved checkpoint" line) when killed."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    lines: "queue.Queue[str]" = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    saves, finished = 0, False
    while proc.poll() is None or not lines.empty():
        try:
            line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if "Saving checkpoint to" in line:
            saves += 1
            if saves == nth_save:
                time.sleep(delay)
                proc.kill()
                break
    proc.wait()
    reader.join()
    while not lines.empty():
        finished |= "Saved checkpoint" in lines.get()
    return saves == nth_save and not finished


def small_corpus(directory: Path, train: int = 4, valid: int = 2) -> Path:
    """The first ``train``/``valid`` utterances of the bundled corpus in fairseq's audio_finetuning layout."""
    from melhubert_fairseq.finetuning import write_finetuning_data

    manifests = {}
    for split, count in (("train", train), ("valid", valid)):
        lines = (DEMO_CORPUS / f"{split}.tsv").read_text().splitlines()
        path = directory / "manifests" / f"{split}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{DEMO_CORPUS}\n" + "\n".join(lines[1 : 1 + count]) + "\n")
        manifests[split] = str(path)
    write_finetuning_data(manifests, str(DEMO_CORPUS / "transcripts.tsv"), str(directory / "data"))
    return directory / "data"


def run_ctc_finetuning(w2v_path: Path, data_dir: Path, save_dir: Path, max_update: int = 3) -> Path:
    """fairseq-hydra-train with config/finetune_demo.yaml (wav2vec_ctc) for ``max_update`` updates, validating
    at the end, from the repo root, one thread; returns its hydra_train.log."""
    command = [
        sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", "config", "--config-name", "finetune_demo",
        "common.user_dir=melhubert_fairseq", f"task.data={data_dir}", f"model.w2v_path={w2v_path}",
        f"checkpoint.save_dir={save_dir}", f"hydra.run.dir={save_dir}/hydra", f"optimization.max_update={max_update}",
        "model.freeze_finetune_updates=1", "common.log_interval=1", "dataset.max_tokens=120000",
    ]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if result.returncode != 0:
        raise AssertionError(f"fine-tuning failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return save_dir / "hydra" / "hydra_train.log"


def write_indexed_corpus(directory: Path, lengths, dim: int = FBANK_NUM_MEL_BINS, label_stride: int = 1) -> Path:
    """Features whose value is the frame index (plus dim/100), labels = frame index (mod 1000)."""
    feat_dir = directory / "feats"
    feat_dir.mkdir(parents=True)
    rows, lines = [], []
    for u, frames in enumerate(lengths):
        feats = np.arange(frames, dtype=np.float32)[:, None] + np.arange(dim, dtype=np.float32)[None] / 100
        np.save(feat_dir / f"u{u}.npy", feats)
        rows.append(f"u{u}.npy\t{frames}")
        labels = np.arange(0, frames, label_stride)
        lines.append(" ".join(map(str, labels)))
    (directory / "train.tsv").write_text(f"{feat_dir}\n" + "\n".join(rows) + "\n")
    (directory / "train.km").write_text("\n".join(lines) + "\n")
    return directory


def checkpoint_without_stats(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A copy of the tiny checkpoint whose fbank stats are unknown (NaN)."""
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    state["model"]["fbank_mean_std"].fill_(float("nan"))
    torch.save(state, tmp_path / "no_stats.pt")
    return tmp_path / "no_stats.pt"



# --- the original Mel-HuBERT format ------------------------------------------------------------

TINY_ORIGINAL_CONFIG = {
    "feat_emb_dim": 80,
    "pos_emb_type": "conv",
    "pos_conv_depth": 1,
    "conv_pos": 8,
    "conv_pos_groups": 4,
    "encoder_layers": 2,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 4,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "attention_type": "original",
    "num_cluster": 16,
    "pred_masked_weight": 1.0,
    "pred_nomask_weight": 0.0,
    "skip_masked": False,
    "skip_nomask": True,
    "mask_prob": 0.7,
    "mask_length": 5,
    "mask_selection": "static",
    "mask_other": 0.0,
    "no_mask_overlap": False,
    "mask_min_space": 1,
    "learnable_mask_emb": False,
    "mask_before_proj": True,
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.1,
    "encoder_layerdrop": 0.0,
}


class ReferenceAttention(nn.Module):
    """fairseq MultiheadAttention as the original registers it (k, v, q, out), in explicit math."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, padding, causal: bool = False):
        batch, frames, dim = x.shape
        head_dim = dim // self.heads

        def heads(t):
            return t.view(batch, frames, self.heads, head_dim).transpose(1, 2)

        q = heads(self.q_proj(x) * head_dim**-0.5)
        scores = q @ heads(self.k_proj(x)).transpose(-1, -2)
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
        if causal:
            # The release's model.py: query i may attend to keys 0..i (a lower-triangular mask, every layer).
            key_after_query = torch.arange(frames)[None, :] > torch.arange(frames)[:, None]
            scores = scores.masked_fill(key_after_query, float("-inf"))
        context = scores.softmax(-1) @ heads(self.v_proj(x))
        return self.out_proj(context.transpose(1, 2).reshape(batch, frames, dim))


class ReferenceLayer(nn.Module):
    """TransformerSentenceEncoderLayer: post-LN, or pre-LN with ``layer_norm_first``."""

    def __init__(self, dim: int, ffn: int, heads: int, layer_norm_first: bool, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.self_attn = ReferenceAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn)
        self.fc2 = nn.Linear(ffn, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = layer_norm_first

    def forward(self, x, padding):
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), padding, self.causal)
            return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        x = self.self_attn_layer_norm(x + self.self_attn(x, padding, self.causal))
        return self.final_layer_norm(x + self.fc2(F.gelu(self.fc1(x))))


class ReferenceSamePad(nn.Module):
    """Drop the extra frame an even kernel with padding k//2 produces."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.remove = 1 if kernel % 2 == 0 else 0

    def forward(self, x):
        return x[:, :, : -self.remove] if self.remove else x


class ReferenceEncoder(nn.Module):
    """Conv positional embedding, layers, and the LayerNorm placed as HuBERT does.

    ``attention_type: causal`` is the 2022 release's (nervjack2/Speech-SSL-Compression
    melhubert/model.py, July 2022): every layer's attention is masked to the past, while the
    positional conv stays centred (kernel conv_pos, padding conv_pos // 2, SamePad)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim, kernel = cfg["encoder_embed_dim"], cfg["conv_pos"]
        conv = nn.Conv1d(dim, dim, kernel_size=kernel, padding=kernel // 2, groups=cfg["conv_pos_groups"])
        conv = nn.utils.weight_norm(conv, name="weight", dim=2)
        self.pos_conv = nn.Sequential(conv, ReferenceSamePad(kernel), nn.GELU())
        self.layers = nn.ModuleList(
            ReferenceLayer(
                dim, cfg["encoder_ffn_embed_dim"], cfg["encoder_attention_heads"], cfg["layer_norm_first"],
                causal=cfg.get("attention_type", "original") == "causal",
            )
            for _ in range(cfg["encoder_layers"])
        )
        self.layer_norm = nn.LayerNorm(dim)
        self.layer_norm_first = cfg["layer_norm_first"]

    def forward(self, x, padding):
        x = x.masked_fill(padding[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        hidden = []
        for layer in self.layers:
            x = layer(x, padding)
            hidden.append(x)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x, hidden


class ReferenceMelHuBERT(nn.Module):
    """MelHuBERTModel's parameter layout and eval-mode forward (no masking)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        dim = cfg["encoder_embed_dim"]
        self.pre_extract_proj = nn.Linear(cfg["feat_emb_dim"], dim) if cfg["feat_emb_dim"] != dim else None
        self.encoder = ReferenceEncoder(cfg)
        if cfg["learnable_mask_emb"]:
            self.mask_emb = nn.Parameter(torch.rand(cfg["feat_emb_dim"] if cfg["mask_before_proj"] else dim))
        self.final_proj = nn.Linear(dim, cfg["num_cluster"])

    def forward(self, feat, valid):
        """``valid`` is the original's pad_mask: True on real frames."""
        x = self.pre_extract_proj(feat) if self.pre_extract_proj is not None else feat
        return self.encoder(x, ~valid)


def make_reference(cfg: dict, seed: int = 0) -> ReferenceMelHuBERT:
    """A reference model with every parameter (LayerNorms included) random, so no mapping error hides."""
    torch.manual_seed(seed)
    model = ReferenceMelHuBERT(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) / math.sqrt(max(param.shape[-1], 1)))
    return model.eval()


def save_original(path: Path, model: nn.Module, cfg: dict, section: str = "melhubert", args=None, step: int = 1234):
    """Save as pretrain_expert.save_model does (with an Adam state after one step)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0)
    feat = torch.randn(2, 12, cfg["feat_emb_dim"])
    model.train()
    out, _ = model(feat, torch.ones(2, 12, dtype=torch.bool))
    model.final_proj(out).square().mean().backward()
    optimizer.step()
    model.eval()
    torch.save(
        {
            "Optimizer": optimizer.state_dict(),
            "Step": step,
            "Args": args if args is not None else argparse.Namespace(
                runner_config="config_runner.yaml", upstream_config="config_model.yaml", expdir="exp",
                frame_period=20, initial_weight=None, init_optimizer_from_initial_weight=False, seed=1337, device="cuda",
            ),
            "Runner": {"runner": {"n_epochs": 200, "total_steps": 1000}, "optimizer": {"lr": 1e-4, "betas": [0.9, 0.999]}},
            "model": model.state_dict(),
            "Upstream_Config": {section: cfg},
        },
        path,
    )
    return optimizer


def padded_input(dim: int, lengths=(23, 15), seed: int = 1):
    """A random padded batch and the original's valid-frame mask."""
    generator = torch.Generator().manual_seed(seed)
    feat = torch.randn(len(lengths), max(lengths), dim, generator=generator)
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return feat.masked_fill(~valid[..., None], 0.0), valid


def assert_same_hidden_states(ours, reference: ReferenceMelHuBERT, input_dim: int) -> None:
    """Every layer and the final output of our model and the reference agree on real frames (1e-5)."""
    feat, valid = padded_input(input_dim)
    with torch.no_grad():
        expected_x, expected_layers = reference(feat, valid)
        out = ours.extract_features(feat, padding_mask=~valid, mask=False)
    assert len(out["layer_results"]) == len(expected_layers)
    for index, (mine, theirs) in enumerate(zip(out["layer_results"], expected_layers), start=1):
        torch.testing.assert_close(mine[valid], theirs[valid], atol=1e-5, rtol=0, msg=f"layer {index} differs")
    torch.testing.assert_close(out["x"][valid], expected_x[valid], atol=1e-5, rtol=0)


def load_converted(path: Path):
    """Load through fairseq exactly as users do."""
    models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(path)])
    return models[0].eval(), cfg


class FillingDisk:
    """A file system with ``room`` bytes left for outputs: every file opened through
    ``disk_full.open_for_writing`` shares that room, and the write that passes it stores what fits and
    then fails with ENOSPC, as a full disk does. torch and numpy see a real OSError from ``write`` and report
    it their own way (torch as ``RuntimeError: [enforce fail ...]``), as on a real full disk.

    Use ``monkeypatch.setattr(disk_full, "open_for_writing", FillingDisk(room))``.
    """

    def __init__(self, room: int) -> None:
        from melhubert_fairseq import disk_full

        self.room = room
        self._open = disk_full.open_for_writing

    def __call__(self, file, mode="wb"):
        disk = self
        real = self._open(file, mode)

        class Handle:
            def write(self, data):
                size = len(data)
                if size > disk.room:
                    real.write(data[: disk.room])
                    disk.room = 0
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.room -= size
                return real.write(data)

            def __getattr__(self, name):
                return getattr(real, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc_info):
                real.close()

        return Handle()
