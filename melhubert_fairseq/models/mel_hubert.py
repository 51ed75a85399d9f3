"""The ``mel_hubert`` model: HuBERT's encoder fed by projected log-Mel frames."""

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from omegaconf import II, open_dict
from torch import nn

from melhubert_fairseq.models.components import Dropout, TransformerEncoder, TransformerLayer
from melhubert_fairseq.models.masking import SpanMaskConfig, check_span_mask_config, span_mask
from melhubert_fairseq.models.waveform_frontend import WaveformFrontEnd
from melhubert_fairseq.errors import InputError

logger = logging.getLogger(__name__)

MASK_SELECTION_CHOICES = ChoiceEnum(["static", "normal", "poisson"])
ATTENTION_TYPE_CHOICES = ChoiceEnum(["original", "causal"])
PREDICTION_HEAD_CHOICES = ChoiceEnum(["cluster_ids", "frames"])
#: Added to the masking seed for channel masks, so that they do not repeat the frame masks' random draws.
CHANNEL_MASK_SEED_OFFSET = 7919
#: The name fairseq registers the model under (``model._name`` in configs and checkpoints).
MODEL_NAME = "mel_hubert"


@dataclass
class MelHubertConfig(FairseqDataclass):
    """Architecture, masking and regularisation of Mel-HuBERT (defaults: Base, 20 ms)."""

    feat_dim: int = field(default=II("task.feat_dim"), metadata={"help": "dimension of one 10 ms fbank frame"})
    stack_frames: int = field(
        default=II("task.stack_frames"),
        metadata={"help": "10 ms frames concatenated per model frame; input dim = feat_dim * stack_frames"},
    )
    num_classes: int = field(
        default=II("task.num_classes"), metadata={"help": "number of k-means clusters predicted"}
    )
    encoder_layers: int = field(default=12, metadata={"help": "number of transformer layers"})
    encoder_embed_dim: int = field(default=768, metadata={"help": "transformer width"})
    encoder_ffn_embed_dim: int = field(default=3072, metadata={"help": "feed-forward hidden size"})
    encoder_attention_heads: int = field(default=12, metadata={"help": "attention heads per layer"})
    activation_fn: str = field(default="gelu", metadata={"help": "feed-forward activation (fairseq name)"})
    layer_norm_first: bool = field(
        default=False, metadata={"help": "pre-LN transformer if true; false = post-LN as the original"}
    )
    attention_type: ATTENTION_TYPE_CHOICES = field(  # type: ignore[valid-type]
        default="original",
        metadata={"help": "original = bidirectional; causal = each frame attends to itself and the past"},
    )
    pos_conv_causal: Optional[bool] = field(
        default=None,
        metadata={
            "help": "positional conv padded on the left only (frame t sees frames <= t); null = follow attention_type "
            "(causal -> true); false with attention_type=causal = the original release's causal model (masked "
            "attention, centred conv seeing (conv_pos - 1) // 2 frames ahead)"
        },
    )
    conv_pos: int = field(default=128, metadata={"help": "kernel size of the convolutional positional embedding"})
    conv_pos_groups: int = field(default=16, metadata={"help": "groups of the positional convolution"})
    pos_conv_depth: int = field(default=1, metadata={"help": "number of positional conv layers (1 = HuBERT)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout after positional embedding and in each layer"})
    attention_dropout: float = field(default=0.1, metadata={"help": "dropout on attention probabilities"})
    activation_dropout: float = field(default=0.1, metadata={"help": "dropout after the FFN activation"})
    encoder_layerdrop: float = field(default=0.0, metadata={"help": "probability of skipping a layer in training"})
    mask_prob: float = field(default=0.8, metadata={"help": "fraction of frames chosen as span starts (x span)"})
    mask_length: int = field(default=10, metadata={"help": "span length in model frames"})
    mask_selection: MASK_SELECTION_CHOICES = field(  # type: ignore[valid-type]
        default="static", metadata={"help": "how span lengths are drawn (fairseq compute_mask_indices)"}
    )
    mask_other: float = field(default=0.0, metadata={"help": "secondary span-length parameter (normal: stdev)"})
    no_mask_overlap: bool = field(default=False, metadata={"help": "forbid overlapping spans (unsupported, see masking.py)"})
    mask_min_space: int = field(default=1, metadata={"help": "min frames between spans when no_mask_overlap"})
    mask_min_masks: int = field(default=2, metadata={"help": "minimum number of spans per utterance"})
    require_same_masks: bool = field(
        default=False,
        metadata={"help": "old batch-dependent masking of the original (*-oldmask checkpoints): same masked count per batch"},
    )
    prediction_head: PREDICTION_HEAD_CHOICES = field(  # type: ignore[valid-type]
        default="cluster_ids",
        metadata={
            "help": "pretraining head: cluster_ids = final_proj, logits over the num_classes k-means clusters "
            "(hard_label_masked_ce); frames = apc_proj, a linear map to one model input frame (apc_l1)"
        },
    )
    learnable_mask_emb: bool = field(
        default=False, metadata={"help": "learn the mask embedding; false = masked frames are zeros"}
    )
    mask_before_proj: bool = field(
        default=True, metadata={"help": "mask input fbank frames before the projection (original); else after"}
    )
    mask_seed: int = field(
        default=II("common.seed"), metadata={
            "help": "seed for reproducible masks (with update number and sample id); a forward without sample ids "
            "(fine-tuning) seeds its masks from torch's generator instead, which fairseq reseeds every update"
        },
    )
    # Fine-tuning regularisers that fairseq's wav2vec_ctc/hubert_ctc set on the pretrained
    # model (Wav2VecEncoder's arg_overrides); all off in pretraining, as in the original.
    dropout_input: float = field(
        default=0.0, metadata={"help": "dropout on the projected frames (HuBERT's dropout_input); 0 = none, as the original"}
    )
    mask_channel_prob: float = field(
        default=0.0,
        metadata={
            "help": "fraction of the projected frames' channels chosen as channel-span starts (x span) and zeroed at "
            "every frame, only when masking (HuBERT's channel masking in fine-tuning); 0 = none"
        },
    )
    mask_channel_length: int = field(default=10, metadata={"help": "channel span length (with mask_channel_prob)"})
    mask_channel_selection: MASK_SELECTION_CHOICES = field(  # type: ignore[valid-type]
        default="static", metadata={"help": "how channel span lengths are drawn (fairseq compute_mask_indices)"}
    )
    mask_channel_other: float = field(
        default=0.0, metadata={"help": "secondary channel span-length parameter (normal: stdev)"}
    )
    no_mask_channel_overlap: bool = field(
        default=False, metadata={"help": "forbid overlapping channel spans (unsupported, see masking.py)"}
    )
    mask_channel_min_space: int = field(
        default=1, metadata={"help": "min channels between channel spans when no_mask_channel_overlap"}
    )
    # What a checkpoint file knows beyond its weights, copied into its config when it is read
    # (record_checkpoint_in_config), so that a model rebuilt from the config alone -- fairseq
    # fine-tuning with model.no_pretrained_weights=true -- still turns audio into the same inputs.
    fbank_mean_std: Optional[List[List[float]]] = field(
        default=None,
        metadata={
            "help": "[mean, std] (each feat_dim floats) of the training fbank, set when a checkpoint is read; "
            "null = the fbank_mean_std buffer of the weights decides (NaN: unknown)"
        },
    )
    loaded_from: Optional[str] = field(
        default=None, metadata={"help": "checkpoint file this config was read from (set on load; errors name it)"}
    )


@register_model(MODEL_NAME, dataclass=MelHubertConfig)
class MelHubertModel(BaseFairseqModel):
    """Linear projection of (stacked) fbank frames -> conv positional embedding -> transformer -> pretraining head
    (``final_proj`` over k-means ids, or ``apc_proj`` onto the input frame: ``prediction_head``).

    Takes the (B, T, feat_dim x stack_frames) frames it was trained on, or a
    (B, samples) 16 kHz waveform that :class:`WaveformFrontEnd` turns into those
    frames with the checkpoint's fbank statistics.
    """

    def __init__(self, cfg: MelHubertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_dim = cfg.feat_dim * cfg.stack_frames
        self.mask_config = SpanMaskConfig.from_model_config(cfg)
        check_span_mask_config(self.mask_config)
        # Channel spans: fairseq's compute_mask_indices on (batch, channels), as HuBERT's apply_mask calls it.
        self.channel_mask_config = SpanMaskConfig.from_model_config(
            cfg, prefix="mask_channel", require_same_masks=True, mask_min_masks=0
        )
        check_span_mask_config(self.channel_mask_config, what="channel masking (mask_channel_*)")
        self.pre_extract_proj = nn.Linear(self.input_dim, cfg.encoder_embed_dim)
        self.dropout_input = Dropout(cfg.dropout_input)
        layers = [
            TransformerLayer(
                embed_dim=cfg.encoder_embed_dim,
                ffn_dim=cfg.encoder_ffn_embed_dim,
                num_heads=cfg.encoder_attention_heads,
                dropout=cfg.dropout,
                attention_dropout=cfg.attention_dropout,
                activation_dropout=cfg.activation_dropout,
                activation_fn=cfg.activation_fn,
                layer_norm_first=cfg.layer_norm_first,
            )
            for _ in range(cfg.encoder_layers)
        ]
        self.encoder = TransformerEncoder(
            embed_dim=cfg.encoder_embed_dim,
            layers=layers,
            conv_pos=cfg.conv_pos,
            conv_pos_groups=cfg.conv_pos_groups,
            pos_conv_depth=cfg.pos_conv_depth,
            dropout=cfg.dropout,
            layer_norm_first=cfg.layer_norm_first,
            layerdrop=cfg.encoder_layerdrop,
            causal=str(cfg.attention_type) == "causal",
            pos_conv_causal=cfg.pos_conv_causal,
        )
        # BERT init of every Linear in the encoder, as HuBERT and the original do.
        self.encoder.apply(init_bert_params)
        mask_dim = self.input_dim if cfg.mask_before_proj else cfg.encoder_embed_dim
        if cfg.learnable_mask_emb:
            self.mask_emb = nn.Parameter(torch.empty(mask_dim).uniform_())
        else:
            self.register_buffer("mask_emb", torch.zeros(mask_dim), persistent=False)
        self.final_proj: Optional[nn.Linear] = None
        self.apc_proj: Optional[nn.Linear] = None
        if str(cfg.prediction_head) == "frames":
            self.apc_proj = nn.Linear(cfg.encoder_embed_dim, self.input_dim)
        else:
            self.final_proj = nn.Linear(cfg.encoder_embed_dim, cfg.num_classes)
        # Corpus mean (row 0) and std (row 1) of the fbank the model was trained on,
        # saved with the weights so a checkpoint alone can turn audio into inputs.
        # NaN = unknown (features were normalised by a tool whose stats were not given).
        self.register_buffer("fbank_mean_std", torch.full((2, cfg.feat_dim), float("nan")))
        if cfg.fbank_mean_std is not None:
            stats = torch.tensor([list(row) for row in cfg.fbank_mean_std], dtype=torch.float32)
            if stats.shape != self.fbank_mean_std.shape:
                raise InputError(
                    f"model.fbank_mean_std has shape {tuple(stats.shape)}, expected [mean, std] of feat_dim = "
                    f"{cfg.feat_dim} values each"
                )
            self.fbank_mean_std.copy_(stats)
        # No parameters or persistent buffers: checkpoints are the same with or without it.
        self.waveform_frontend = WaveformFrontEnd(cfg.stack_frames)
        self.num_updates = 0

    @classmethod
    def build_model(cls, cfg: MelHubertConfig, task=None) -> "MelHubertModel":
        """Build a model from its config (fairseq entry point)."""
        return cls(cfg)

    def set_fbank_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Record the corpus mean/std of the training features in the checkpoint."""
        self.fbank_mean_std.copy_(torch.stack([torch.as_tensor(mean), torch.as_tensor(std)]))

    def fbank_stats(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(mean, std) of the training features, or None if the checkpoint does not know them."""
        if torch.isnan(self.fbank_mean_std).any():
            return None
        return self.fbank_mean_std[0], self.fbank_mean_std[1]

    def require_fbank_stats(self, where: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`fbank_stats`, or an InputError naming ``where`` (default: the checkpoint the model was
        read from, if known) when they are unknown."""
        stats = self.fbank_stats()
        if stats is None:
            where = where or self.cfg.loaded_from or "this mel_hubert model"
            raise InputError(
                f"{where} does not record the corpus mean/std its features were normalised with, "
                "so raw fbank or audio cannot be normalised: pass normalised features from a manifest instead, or "
                "store the stats in the checkpoint (melhubert-convert-original --mean-std FILE, or train with "
                "{task.data}/mean-std.npy present)"
            )
        return stats

    def waveform_to_frames(
        self, waveform: torch.Tensor, padding_mask: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, samples) 16 kHz audio [+ (B, samples) padding mask] -> (B, T, input_dim) frames [+ (B, T) mask],
        exactly the normalised, stacked fbank the model was trained on."""
        mean, std = self.require_fbank_stats()
        frames, padding_mask = self.waveform_frontend(waveform, padding_mask, mean, std)
        return frames.to(self.pre_extract_proj.weight.dtype), padding_mask

    def set_num_updates(self, num_updates: int) -> None:
        """Track the update number: it seeds each update's masks."""
        super().set_num_updates(num_updates)
        self.num_updates = num_updates

    def mask_seed_and_ids(
        self, batch_size: int, sample_ids: Optional[torch.Tensor]
    ) -> Tuple[Optional[int], torch.Tensor]:
        """(seed, per-utterance ids) that, with the update number, decide this batch's masks.

        With ``sample_ids`` (the pretraining criterion passes them): ``mask_seed`` and those ids, so a
        mask depends only on (seed, update, utterance) (``mask_seed`` null: unseeded, as fairseq). Without (fairseq's fine-tuning encoders,
        ``Wav2VecEncoder`` / ``HubertEncoder``, pass none): a seed drawn from torch's default generator,
        which fairseq's trainer reseeds at every update from ``common.seed + update`` (as for dropout),
        and the batch rows, offset by the distributed rank. Either way a resumed run masks exactly
        what the uninterrupted one masks.
        """
        if sample_ids is not None:
            return self.cfg.mask_seed, sample_ids
        seed = int(torch.randint(2**31 - 1, (), dtype=torch.int64))
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        return seed, torch.arange(batch_size, dtype=torch.int64) + (rank << 32)

    def apply_mask(
        self, x: torch.Tensor, padding_mask: Optional[torch.Tensor], sample_ids: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Replace masked spans of ``x`` (B, T, C) by the mask embedding; return (x, mask).
        Without ``sample_ids`` the masks are seeded as :meth:`mask_seed_and_ids` says."""
        seed, ids = self.mask_seed_and_ids(x.size(0), sample_ids)
        mask = span_mask(
            self.mask_config, tuple(x.shape[:2]), padding_mask, seed, self.num_updates, ids, device=x.device
        )
        x = torch.where(mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)
        return x, mask

    def apply_channel_mask(self, x: torch.Tensor, sample_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Zero spans of channels of ``x`` (B, T, C), the same channels at every frame of an utterance
        (HuBERT's channel masking), seeded as :meth:`mask_seed_and_ids` says."""
        seed, ids = self.mask_seed_and_ids(x.size(0), sample_ids)
        if seed is not None:  # another seed than the frame masks' (same update and ids): no shared draws
            seed += CHANNEL_MASK_SEED_OFFSET
        channels = span_mask(
            self.channel_mask_config, (x.size(0), x.size(-1)), None, seed, self.num_updates, ids, device=x.device
        )
        return x.masked_fill(channels.unsqueeze(1), 0.0)

    def extract_features(
        self,
        source: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        mask: bool = False,
        output_layer: Optional[int] = None,
        sample_ids: Optional[torch.Tensor] = None,
    ) -> Dict[str, Any]:
        """Encode (B, T, input_dim) frames or a (B, samples) 16 kHz float waveform in [-1, 1].

        ``padding_mask`` (True = padded) is (B, T) for frames and (B, samples) for
        a waveform. Returns ``x`` (final output, or layer ``output_layer``'s output
        when given, 1-based; 0 = the input of the first layer), ``layer_results``
        (every layer's output so far, (B, T, C)), ``hidden_states`` (the input of
        the first layer, then ``layer_results``: index = layer number),
        ``padding_mask`` (frame level, (B, T), as fairseq's ASR encoders read it
        back; None if none was given) and ``mask_indices`` (True = masked).
        """
        if source.dim() == 2:
            source, padding_mask = self.waveform_to_frames(source, padding_mask)
        elif source.dim() != 3:
            raise InputError(
                f"input has shape {tuple(source.shape)}: expected (batch, samples) 16 kHz audio or "
                f"(batch, frames, {self.input_dim}) fbank frames"
            )
        if source.size(-1) != self.input_dim:
            raise InputError(
                f"input frames have dim {source.size(-1)}, model expects feat_dim x stack_frames = "
                f"{self.cfg.feat_dim} x {self.cfg.stack_frames} = {self.input_dim}"
            )
        mask_indices = None
        x = source
        if mask and self.cfg.mask_before_proj:
            x, mask_indices = self.apply_mask(x, padding_mask, sample_ids)
        x = self.dropout_input(self.pre_extract_proj(x))
        if mask and not self.cfg.mask_before_proj:
            x, mask_indices = self.apply_mask(x, padding_mask, sample_ids)
        if mask and self.cfg.mask_channel_prob > 0:
            x = self.apply_channel_mask(x, sample_ids)
        x, hidden_states = self.encoder(x, padding_mask, output_layer=output_layer)
        return {
            "x": x,
            "layer_results": hidden_states[1:],
            "hidden_states": hidden_states,
            "padding_mask": padding_mask,
            "mask_indices": mask_indices,
        }

    def forward(
        self,
        source: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        sample_ids: Optional[torch.Tensor] = None,
        mask: bool = True,
    ) -> Dict[str, Any]:
        """Pretraining forward: masked encoding of frames or a waveform (see ``extract_features``)."""
        return self.extract_features(source, padding_mask, mask=mask, sample_ids=sample_ids)

    def cluster_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the k-means clusters for encoder outputs ``features`` (..., C)."""
        return self.final_proj(features)

    def predicted_frames(self, features: torch.Tensor) -> torch.Tensor:
        """Input frames (..., input_dim) predicted from encoder outputs ``features`` (..., C) by ``apc_proj``."""
        return self.apc_proj(features)

    def lookahead_frames(self) -> Optional[int]:
        """How many frames after t the output at frame t depends on: None = all of them (bidirectional
        attention); with causal attention, what the positional conv reads ahead (0 when it is causal)."""
        if str(self.cfg.attention_type) != "causal":
            return None
        return self.encoder.pos_conv_lookahead

    def remove_pretraining_modules(self) -> None:
        """Drop the pretraining heads (cluster classifier, frame predictor) for downstream use."""
        self.final_proj = None
        self.apc_proj = None


def record_checkpoint_in_config(state: Dict[str, Any], path: str) -> None:
    """Write into a loaded ``mel_hubert`` checkpoint's ``cfg`` what the file knows beyond it.

    fairseq's fine-tuning encoders (``Wav2VecEncoder``, ``HubertEncoder``) rebuild the
    model from ``cfg`` and, with ``model.no_pretrained_weights=true``, never read its
    weights. The fbank statistics are data, not weights, so they go into
    ``cfg.model.fbank_mean_std`` (from the ``fbank_mean_std`` buffer, which stays the
    authority; None when unknown) and the file's own path into ``cfg.model.loaded_from``
    for errors. Configs saved before ``task.normalize`` existed get its only value, false.
    """
    cfg = state.get("cfg")
    if cfg is None or cfg.get("model") is None or cfg.model.get("_name") != MODEL_NAME:
        return
    stats = state.get("model", {}).get("fbank_mean_std")
    known = stats is not None and not bool(torch.isnan(stats).any())
    with open_dict(cfg):
        cfg.model.fbank_mean_std = stats.float().tolist() if known else None
        cfg.model.loaded_from = path
        if cfg.get("task") is not None and "normalize" not in cfg.task:
            cfg.task.normalize = False
