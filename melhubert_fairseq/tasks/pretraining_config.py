"""The ``mel_hubert_pretraining`` task's config: where the fbank manifests and labels are, how utterances
become batches, and the in-training probe."""
from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import FairseqDataclass
from omegaconf import II, MISSING

from melhubert_fairseq.data.features import FBANK_NUM_MEL_BINS, FBANK_FRAME_RATE_HZ
from melhubert_fairseq.data.frame_rates import LABEL_RATE_HELP
from melhubert_fairseq.probe.settings import DEFAULT_STEPS, PR, SID


@dataclass
class MelHubertPretrainingConfig(FairseqDataclass):
    """Where the fbank manifests and labels are, and how utterances become batches."""

    data: str = field(default=MISSING, metadata={"help": "directory holding {split}.tsv fbank manifests"})
    label_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "directory holding {split}.{labels} and dict.{labels}.txt; required to train or validate (stage 1 "
            "and stage 2 labels of one corpus live in different folders, so it never defaults to task.data)"
        },
    )
    labels: Optional[str] = field(
        default="km",
        metadata={
            "help": "label file extension: {label_dir}/{split}.{labels}; null = no labels, for a criterion that reads "
            "none (apc_l1): the manifest alone"
        },
    )
    label_rate: float = field(
        default=float(FBANK_FRAME_RATE_HZ),
        metadata={"help": LABEL_RATE_HELP},
    )
    num_classes: int = field(
        default=512,
        metadata={"help": "number of k-means clusters; labels are class ids 0..K-1; -1 = read dict.{labels}.txt"},
    )
    feat_dim: int = field(
        default=FBANK_NUM_MEL_BINS, metadata={"help": "dimension of one 10 ms fbank frame in the .npy files"}
    )
    stack_frames: int = field(
        default=2, metadata={"help": "10 ms frames concatenated per model frame: 1 (10 ms), 2 (20 ms) or 4 (40 ms)"}
    )
    mean_std_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "mean-std.npy (2 x feat_dim) to normalise raw features with at load; null = features are normalised "
            "on disk. Checked against the {split}.features.json the feature tools write"
        },
    )
    max_sample_size: Optional[int] = field(
        default=None, metadata={"help": "crop utterances to at most this many model frames (750 at 20 ms)"}
    )
    min_sample_size: Optional[int] = field(
        default=None, metadata={"help": "skip utterances shorter than this many model frames"}
    )
    max_keep_size: Optional[int] = field(
        default=None, metadata={"help": "skip utterances longer than this many model frames"}
    )
    pad_audio: bool = field(
        default=False, metadata={"help": "pad to the longest utterance in the batch instead of cropping to the shortest"}
    )
    random_crop: bool = field(default=True, metadata={"help": "random crop window; false = crop from the start"})
    rebuild_batches: bool = field(
        default=True,
        metadata={
            "help": "rebuild the length-bucketed batches every epoch from (seed, epoch) (fairseq's rebuild_batches); "
            "must stay true: batch order then does not depend on the epoch a run was resumed in"
        },
    )
    normalize: bool = field(
        default=False,
        metadata={
            "help": "whether waveforms fed to the model are normalised per utterance (fairseq fine-tuning checks its "
            "task.normalize against this); always false: the fbank is computed from the raw audio"
        },
    )
    probe_train: Optional[str] = field(
        default=None,
        metadata={
            "help": "probe the model during training: manifest (audio or fbank) of a small held-out probe set the "
            "heads train on, with .phn (PR) and/or .spk (SID) beside it (see melhubert-probe); null = no probe"
        },
    )
    probe_test: Optional[str] = field(
        default=None, metadata={"help": "manifest PR is scored on (.phn beside it); SID's few-shot split uses both"}
    )
    probe_tasks: str = field(default="pr,sid", metadata={"help": "probes to run: pr (logs probe_pr_per), sid (probe_sid_acc)"})
    probe_interval: int = field(
        default=10, metadata={"help": "probe at the first validation and then every N-th one"}
    )
    probe_shots: int = field(default=2, metadata={"help": "SID: training utterances per speaker (few-shot); the rest test"})
    probe_seeds: int = field(default=1, metadata={"help": "heads per probe (seeds 1..N); the logged value is their mean"})
    probe_pr_steps: int = field(default=DEFAULT_STEPS[PR], metadata={"help": "PR: Adam steps of the CTC head"})
    probe_sid_steps: int = field(default=DEFAULT_STEPS[SID], metadata={"help": "SID: full-batch steps of the speaker classifier"})
    probe_phone_map: Optional[str] = field(
        default=None, metadata={"help": "PR: 'phone replacement' lines folding phones before training the head"}
    )
    seed: int = II("common.seed")
    train_subset: str = field(
        default=II("dataset.train_subset"),
        metadata={
            "help": "the split trained on (fairseq's dataset.train_subset, whatever its name): shuffled, its crops and "
            "batches redrawn every epoch; every other split keeps fixed crops, so validations compare"
        },
    )


def training_split_name(cfg) -> Optional[str]:
    """``cfg.train_subset`` (fairseq's dataset.train_subset) when it resolves: a task built from a fairseq config
    or a checkpoint; None for a task config built on its own."""
    try:
        train_subset = cfg.train_subset
    except Exception:  # omegaconf: an interpolation with no dataset group to resolve against
        train_subset = None
    if isinstance(train_subset, str) and train_subset and not train_subset.startswith("${"):
        return train_subset
    return None


def is_training_split(split: str, cfg) -> bool:
    """Whether ``split`` is the one trained on: ``cfg.train_subset`` when it resolves, else fairseq's
    default name (a task config built on its own)."""
    train_subset = training_split_name(cfg)
    return split == train_subset if train_subset is not None else split.startswith("train")
