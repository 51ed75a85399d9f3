"""The model, its masks and its checkpoints on an accelerator agree with the CPU.

Every test here is marked ``gpu`` and runs on the device named by the environment
variable ``MELHUBERT_TEST_DEVICE`` (default ``cuda``); the CPU reference is always
computed on the CPU in fp32. Where CUDA is absent and no device is named, the tests
skip. ``benchmarks/gpu_check.sh`` runs them on the GPU (``--device cuda``) and, in CI,
with ``MELHUBERT_TEST_DEVICE=cpu`` (``--device cpu --quick``), so every check also runs
on machines without a GPU.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Dict, Optional

import numpy as np
import pytest
import torch

import melhubert_fairseq
from helpers import make_fbank_corpus, run_hydra_train
from melhubert_fairseq.criterions.hard_label_masked_ce import HardLabelMaskedCe
from melhubert_fairseq.feature_reader import MelHubertFeatureReader
from melhubert_fairseq.models.components import dropout
from melhubert_fairseq.models.masking import SpanMaskConfig, span_mask
from melhubert_fairseq.models.mel_hubert import MelHubertConfig, MelHubertModel

melhubert_fairseq.register_with_fairseq()  # registers the plugin and the checkpoint allow-list

#: Environment variable naming the device under test (cuda, cuda:1, cpu).
DEVICE_VARIABLE = "MELHUBERT_TEST_DEVICE"
DEVICE = torch.device(os.environ.get(DEVICE_VARIABLE, "cuda"))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE.type == "cuda" and not torch.cuda.is_available(),
        reason=f"CUDA is absent (set {DEVICE_VARIABLE}=cpu to run these checks on the CPU)",
    ),
]

# autocast dtype and weight dtype of each precision: bf16 / fp16 = torch.autocast over fp32
# weights; bf16w / fp16w = the whole model in that dtype, as fairseq's common.bf16 / common.fp16 run it.
PRECISIONS = {
    "fp32": (None, torch.float32),
    "bf16": (torch.bfloat16, torch.float32),
    "fp16": (torch.float16, torch.float32),
    "bf16w": (None, torch.bfloat16),
    "fp16w": (None, torch.float16),
}
# Relative (norm) error allowed against the CPU fp32 result: loss, real-frame outputs, all
# gradients together, and the worst single gradient tensor. About 5x what bf16 / fp16 give
# on the CPU (bf16: 6e-3 on outputs, 2e-2 on the worst gradient; fp16: 8e-4, 3e-3).
TOLERANCES = {
    "fp32": dict(loss=1e-5, x=1e-4, grads=1e-4, grad_tensor=1e-3),
    "bf16": dict(loss=2e-3, x=3e-2, grads=4e-2, grad_tensor=1e-1),
    "fp16": dict(loss=2e-4, x=5e-3, grads=1e-2, grad_tensor=2.5e-2),
}
TOLERANCES["bf16w"], TOLERANCES["fp16w"] = TOLERANCES["bf16"], TOLERANCES["fp16"]


@contextmanager
def exact_fp32():
    """TF32 off in cuBLAS and cuDNN (cuDNN convolutions use TF32 by default): fp32 means fp32 here."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(dtype: Optional[torch.dtype], device: torch.device):
    """torch.autocast to ``dtype`` on ``device`` (None: none)."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference|| / ||reference||, in fp32 on the CPU."""
    value, reference = value.detach().float().cpu(), reference.detach().float().cpu()
    return float((value - reference).norm() / reference.norm().clamp_min(1e-12))


def small_config(**overrides) -> MelHubertConfig:
    """A 2-layer model with Base's 64-dim heads, deterministic unless dropout is asked for."""
    settings = dict(
        feat_dim=40, stack_frames=2, num_classes=32, mask_seed=7, encoder_layers=2, encoder_embed_dim=128,
        encoder_ffn_embed_dim=256, encoder_attention_heads=2, conv_pos=16, conv_pos_groups=4,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, mask_prob=0.5, mask_length=3,
    )
    settings.update(overrides)
    return MelHubertConfig(**settings)


def twin_models(cfg: MelHubertConfig, weight_dtype: torch.dtype = torch.float32):
    """(CPU fp32 model, same weights on DEVICE in ``weight_dtype``)."""
    torch.manual_seed(0)
    reference = MelHubertModel(cfg)
    on_device = MelHubertModel(cfg)
    on_device.load_state_dict(reference.state_dict())
    return reference, on_device.to(DEVICE, weight_dtype)


def padded_batch(lengths, dim: int = 80, num_classes: int = 32, seed: int = 0) -> Dict:
    """A criterion sample of random frames with garbage in the padding, random targets and sample ids."""
    generator = torch.Generator().manual_seed(seed)
    frames = max(lengths)
    source = torch.randn(len(lengths), frames, dim, generator=generator)
    padding_mask = torch.arange(frames)[None, :] >= torch.tensor(lengths)[:, None]
    source[padding_mask] = 1e3
    return {
        "net_input": {"source": source, "padding_mask": padding_mask, "sample_ids": torch.tensor([11, 4, 250])[: len(lengths)]},
        "target": torch.randint(0, num_classes, (len(lengths), frames), generator=generator),
        "ntokens": sum(lengths),
        "nsentences": len(lengths),
    }


def to_device(sample: Dict, device: torch.device, dtype: torch.dtype) -> Dict:
    """``sample`` on ``device`` with its float tensors in ``dtype`` (fairseq converts inputs for common.fp16/bf16)."""
    net_input = {k: v.to(device) for k, v in sample["net_input"].items()}
    net_input["source"] = net_input["source"].to(dtype)
    return {**sample, "net_input": net_input, "target": sample["target"].to(device)}


def training_step(model: MelHubertModel, sample: Dict, autocast_dtype: Optional[torch.dtype]):
    """Forward with masking, our criterion (summed CE, as fairseq sees it), backward: (loss, output, mask, grads)."""
    model.train()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    criterion = HardLabelMaskedCe(task=None, pred_masked_weight=1.0, pred_nomask_weight=0.0)
    with autocast(autocast_dtype, device):
        out = model(**sample["net_input"])
        loss, sample_size, _ = criterion(model, sample)
    assert sample_size > 0
    loss.backward()
    grads = {name: p.grad.float().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach().float().cpu(), out["x"].detach().float().cpu(), out["mask_indices"].cpu(), grads


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_forward_backward_on_device_matches_cpu_fp32(precision):
    """Masked forward, loss and every gradient on the device (at ``precision``) match the CPU in fp32."""
    autocast_dtype, weight_dtype = PRECISIONS[precision]
    tolerance = TOLERANCES[precision]
    reference, on_device = twin_models(small_config(), weight_dtype)
    sample = padded_batch([64, 47, 30])
    with exact_fp32():
        ref_loss, ref_x, ref_mask, ref_grads = training_step(reference, sample, None)
        loss, x, mask, grads = training_step(on_device, to_device(sample, DEVICE, weight_dtype), autocast_dtype)

    assert torch.equal(mask, ref_mask), "span masks differ between the device and the CPU"
    real = ~sample["net_input"]["padding_mask"]
    assert torch.isfinite(x[real]).all() and torch.isfinite(loss)
    errors = {"loss": relative_error(loss, ref_loss), "x": relative_error(x[real], ref_x[real])}
    assert set(grads) == set(ref_grads)
    names = sorted(ref_grads)
    errors["grads"] = relative_error(torch.cat([grads[n].flatten() for n in names]), torch.cat([ref_grads[n].flatten() for n in names]))
    largest = max(float(g.norm()) for g in ref_grads.values())
    # Tensors whose gradient is tiny next to the largest carry no signal of their own.
    worst_name, errors["grad_tensor"] = max(
        ((n, relative_error(grads[n], ref_grads[n])) for n in names if float(ref_grads[n].norm()) > 1e-3 * largest),
        key=lambda item: item[1],
    )
    for key, limit in tolerance.items():
        assert errors[key] <= limit, f"{precision} on {DEVICE}: {key} relative error {errors[key]:.2e} > {limit:.0e} ({worst_name=}, {errors})"


MASK_CASES = {
    "stage1": dict(mask_prob=0.7, mask_length=5),
    "hubert_spans": dict(mask_prob=0.8, mask_length=10),
    "same_masks": dict(mask_prob=0.7, mask_length=5, require_same_masks=True),
    "normal_spans": dict(mask_prob=0.7, mask_length=5, mask_selection="normal", mask_other=1.0),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
@pytest.mark.parametrize("padded", [True, False])
def test_span_masks_on_device_equal_cpu_masks(case, padded):
    """Same seed, update and sample ids: the device draws exactly the CPU's masks, on the device."""
    cfg = SpanMaskConfig(**MASK_CASES[case])
    lengths = torch.tensor([300, 211, 64, 31])
    padding_mask = torch.arange(300)[None, :] >= lengths[:, None] if padded else None
    sample_ids = torch.tensor([0, 17, 123456, 2**40 + 3])
    for epoch in (0, 1, 977):
        on_cpu = span_mask(cfg, (4, 300), padding_mask, 1337, epoch, sample_ids, device=torch.device("cpu"))
        on_device = span_mask(
            cfg, (4, 300), None if padding_mask is None else padding_mask.to(DEVICE), 1337, epoch,
            sample_ids.to(DEVICE), device=DEVICE,
        )
        assert on_device.device.type == DEVICE.type
        assert torch.equal(on_device.cpu(), on_cpu), f"{case}, update {epoch}: device and CPU masks differ"
        assert on_cpu.any(1).all()


@pytest.mark.parametrize("masked", [False, True], ids=["eval", "train_masked"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16w"])
def test_padded_batch_on_device_equals_each_utterance_alone(precision, masked):
    """Real frames of a padded batch on the device equal each utterance run alone (eval, and masked training)."""
    autocast_dtype, weight_dtype = PRECISIONS[precision]
    limit = TOLERANCES[precision]["x"]
    _, model = twin_models(small_config(), weight_dtype)
    model.train(masked)
    lengths = [64, 47, 30]
    sample = to_device(padded_batch(lengths), DEVICE, weight_dtype)
    source, padding_mask, ids = (sample["net_input"][k] for k in ("source", "padding_mask", "sample_ids"))
    with torch.no_grad(), exact_fp32(), autocast(autocast_dtype, DEVICE):
        batch = model.extract_features(source, padding_mask, mask=masked, sample_ids=ids)
        for row, length in enumerate(lengths):
            alone = model.extract_features(source[row : row + 1, :length], None, mask=masked, sample_ids=ids[row : row + 1])
            if masked:
                assert torch.equal(batch["mask_indices"][row, :length], alone["mask_indices"][0])
            for batch_layer, alone_layer in zip(batch["layer_results"], alone["layer_results"]):
                error = relative_error(batch_layer[row, :length], alone_layer[0])
                assert error <= limit, f"utterance {row} ({precision}, {'masked' if masked else 'eval'}): {error:.2e} > {limit:.0e}"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16w", "fp16w"])
def test_dropout_training_on_device_is_finite_and_random(precision):
    """With dropout on, training steps on the device draw fresh dropout (outputs differ) and stay finite."""
    autocast_dtype, weight_dtype = PRECISIONS[precision]
    _, model = twin_models(small_config(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1), weight_dtype)
    sample = to_device(padded_batch([64, 47, 30]), DEVICE, weight_dtype)
    first_loss, first_x, first_mask, grads = training_step(model, sample, autocast_dtype)
    second_loss, second_x, second_mask, _ = training_step(model, sample, autocast_dtype)
    assert torch.equal(first_mask, second_mask), "same update and ids: same span masks"
    assert not torch.equal(first_x, second_x), "dropout did not change the output"
    assert torch.isfinite(first_loss) and torch.isfinite(second_loss)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_dropout_drops_its_fraction_on_device():
    """The device's dropout keeps 1 - p of the entries and rescales them by 1 / (1 - p)."""
    x = torch.ones(1000, 1000, device=DEVICE)
    out = dropout(x, 0.1, training=True)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.9) < 0.003
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / 0.9))


def device_overrides(device: torch.device):
    """fairseq-hydra-train overrides that train on ``device`` (fairseq uses the GPU unless common.cpu)."""
    return ["common.cpu=true"] if device.type == "cpu" else []


@pytest.mark.slow  # trains with fairseq-hydra-train
def test_checkpoints_move_between_device_and_cpu(tmp_path):
    """A run on the device resumes on the CPU and back; its checkpoints load on either with the same outputs."""
    data = make_fbank_corpus(tmp_path / "data", num_utts=8)
    np.save(data / "mean-std.npy", np.stack([np.full(40, 0.5), np.full(40, 2.0)]).astype(np.float32))
    save_dir = tmp_path / "ckpt"
    outputs = []
    for max_update, device in ((1, DEVICE), (2, torch.device("cpu")), (3, DEVICE)):
        result = run_hydra_train(data, save_dir, max_update=max_update, overrides=device_overrides(device))
        outputs.append(result.stdout + result.stderr)
        assert f'"num_updates": "{max_update}"' in result.stdout, f"update {max_update} on {device} was not logged"
    assert all("Loaded checkpoint" in text for text in outputs[1:]), "a resume did not load checkpoint_last.pt"

    checkpoint = str(save_dir / "checkpoint_last.pt")
    # fairseq writes CPU tensors whatever device trained: a CPU-only machine loads it without map_location.
    state = torch.load(checkpoint, weights_only=True)
    assert all(t.device.type == "cpu" for t in state["model"].values())

    on_cpu = MelHubertFeatureReader(checkpoint, device="cpu")
    on_device = MelHubertFeatureReader(checkpoint, device=str(DEVICE))
    assert next(on_device.model.parameters()).device.type == DEVICE.type
    for reader in (on_cpu, on_device):
        np.testing.assert_allclose(reader.corpus_stats.mean, 0.5)
        np.testing.assert_allclose(reader.corpus_stats.std, 2.0)
    rng = np.random.default_rng(0)
    inputs = [on_cpu.prepare_raw_fbank(rng.standard_normal((n, 40)).astype(np.float32)) for n in (90, 61)]
    with exact_fp32():
        cpu_layers, _ = on_cpu.hidden_states(inputs)
        device_layers, _ = on_device.hidden_states(inputs)
    for row, x in enumerate(inputs):
        for cpu_layer, device_layer in zip(cpu_layers, device_layers):
            assert relative_error(device_layer[row, : len(x)], cpu_layer[row, : len(x)]) <= TOLERANCES["fp32"]["x"]
