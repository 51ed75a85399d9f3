"""The ``mel_hubert_pretraining`` task: fbank manifests (+ k-means labels) -> FbankLabelDataset."""

import contextlib
import inspect
import logging
import os
import sys
from typing import Optional, Tuple

import numpy as np
import torch
from fairseq.logging import metrics
from fairseq.tasks import FairseqTask, register_task
from omegaconf import open_dict

from melhubert_fairseq.data.features import (
    MEAN_STD_NAME,
    FeatureNormalization,
    MeanStd,
    load_mean_std,
    normalization_record_path,
)
from melhubert_fairseq.data.fbank_label_dataset import EpochTaggedBatches, FbankLabelDataset
from melhubert_fairseq.data.frame_rates import FrameRates
from melhubert_fairseq.data.labels import dictionary_name, index_label_file, read_dictionary_size
from melhubert_fairseq.data.manifest import read_manifest
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.models.masking import SpanMaskError
from melhubert_fairseq.probe.during_training import TrainingProbe
from melhubert_fairseq.tasks.pretraining_config import MelHubertPretrainingConfig, is_training_split, training_split_name

logger = logging.getLogger(__name__)

#: The fairseq metrics aggregator counting validations for the in-training probe (saved in checkpoints).
PROBE_SCHEDULE_AGGREGATOR = "mel_hubert_probe_schedule"
#: The name fairseq registers the task under (``task._name``).
TASK_NAME = "mel_hubert_pretraining"


def _same_stats(path_a: str, path_b: str) -> bool:
    """Whether two mean-std files hold the same statistics (one file, or equal values)."""
    if os.path.realpath(path_a) == os.path.realpath(path_b):
        return True
    a, b = load_mean_std(path_a), load_mean_std(path_b)
    return a.dim == b.dim and np.allclose(a.to_array(), b.to_array(), rtol=1e-6, atol=0)


@register_task(TASK_NAME, dataclass=MelHubertPretrainingConfig)
class MelHubertPretrainingTask(FairseqTask):
    """Masked prediction of hard k-means labels from log-Mel frames."""

    cfg: MelHubertPretrainingConfig

    def __init__(self, cfg: MelHubertPretrainingConfig, from_checkpoint: bool = False) -> None:
        super().__init__(cfg)
        if cfg.stack_frames not in (1, 2, 4):
            raise InputError(f"task.stack_frames must be 1, 2 or 4, got {cfg.stack_frames}")
        if cfg.normalize:
            raise InputError(
                "task.normalize=true is not supported: mel_hubert computes its fbank from the raw audio "
                "(scaled by 2**15), so audio is never normalised per utterance; fine-tune with task.normalize=false"
            )
        if not cfg.rebuild_batches:
            raise InputError(
                "task.rebuild_batches=false is not supported: fairseq would then build the batches once, "
                "seeded by the epoch the iterator was created in, so a resumed run would train on other batches"
            )
        self.rates = FrameRates.from_config(cfg.stack_frames, cfg.label_rate)
        # A loaded checkpoint already fixes K (task.num_classes, or with -1 the model's
        # num_classes, see build_model); its training data (and dict.km.txt) need not exist
        # on this machine, and a dict in the cwd must not be read.
        self.num_classes: Optional[int]
        if cfg.labels is None and cfg.label_dir:
            raise InputError(
                f"task.label_dir={cfg.label_dir} is set but task.labels=null reads no labels: drop task.label_dir, or "
                "give task.labels (e.g. km) for a criterion that predicts them"
            )
        if from_checkpoint or cfg.labels is None:
            self.num_classes = cfg.num_classes if cfg.num_classes > 0 else None
        else:
            self.num_classes = self._resolve_num_classes()
        self._mean_std: Optional[MeanStd] = None
        # Read and checked now, so a bad probe set fails before training, not at a validation.
        self.training_probe = None
        if cfg.probe_train and not from_checkpoint:
            self.training_probe = TrainingProbe.from_task_config(cfg)
        self._last_validated_update: Optional[int] = None

    @property
    def mean_std(self) -> Optional[MeanStd]:
        """Stats to normalise features with at load time (``mean_std_path``), read on first use."""
        if self.cfg.mean_std_path and self._mean_std is None:
            self._mean_std = load_mean_std(self.cfg.mean_std_path)
        return self._mean_std

    def training_feature_stats(self) -> Optional[MeanStd]:
        """Corpus stats the model's inputs were normalised with (stored in the checkpoint for audio input):
        ``mean_std_path``; else those the training split's ``{split}.features.json`` names; else, for
        features written before that record existed, ``{data}/mean-std.npy``."""
        if self.cfg.mean_std_path:
            return self.mean_std
        record = FeatureNormalization.read(self._manifest_path(self._train_split()))
        if record is not None:
            return load_mean_std(record.mean_std) if record.normalized and record.mean_std else None
        stats_path = os.path.join(self.cfg.data, MEAN_STD_NAME)
        return load_mean_std(stats_path) if os.path.isfile(stats_path) else None

    def _manifest_path(self, split: str) -> str:
        return os.path.join(self.cfg.data, f"{split}.tsv")

    def _train_split(self) -> str:
        """The name of the split trained on (see :func:`is_training_split`)."""
        return training_split_name(self.cfg) or "train"

    def check_normalization(self, split: str, dataset: FbankLabelDataset) -> None:
        """Refuse features normalised twice, raw features fed as normalised, and splits normalised with other
        statistics than the training split, from the ``{split}.features.json`` the feature tools write.

        Folders written before that record existed (``{data}/mean-std.npy`` alone, which
        ``--no-normalize`` also wrote then) are taken as normalised, as before, unless the first
        utterance is plainly raw log-Mel (its mean is nearer the statistics' mean than 0).
        """
        manifest_path = self._manifest_path(split)
        record_path = normalization_record_path(manifest_path)
        record = FeatureNormalization.read(manifest_path)
        train = record if is_training_split(split, self.cfg) else FeatureNormalization.read(
            self._manifest_path(self._train_split())
        )
        if record is None:
            self._check_unrecorded_features(manifest_path, dataset)
        elif record.normalized and self.cfg.mean_std_path:
            raise InputError(
                f"{record_path}: the features of {split}.tsv are already normalised (by {record.mean_std}); "
                f"task.mean_std_path={self.cfg.mean_std_path} would normalise them twice: leave it unset"
            )
        elif not record.normalized and not self.cfg.mean_std_path:
            stats = train.mean_std if train is not None and not train.normalized and train.mean_std else record.mean_std
            raise InputError(
                f"{record_path}: the features of {split}.tsv are raw log-Mel (written with --no-normalize): "
                f"normalise them at load with task.mean_std_path={stats or '<the training split mean-std.npy>'}"
            )
        elif record.normalized and train is not None and train.normalized and record is not train:
            if record.mean_std and train.mean_std and not _same_stats(record.mean_std, train.mean_std):
                raise InputError(
                    f"{record_path}: {split}.tsv is normalised by {record.mean_std}, the training split by "
                    f"{train.mean_std}: rewrite it with melhubert-wav-to-fbank --mean-std {train.mean_std}"
                )

    def _check_unrecorded_features(self, manifest_path: str, dataset: FbankLabelDataset) -> None:
        """Features without a record: refuse plainly raw log-Mel taken as normalised (see check_normalization)."""
        stats_path = os.path.join(self.cfg.data, MEAN_STD_NAME)
        if self.cfg.mean_std_path or not os.path.isfile(stats_path):
            return
        stats = load_mean_std(stats_path)
        raw_mean, raw_std = float(np.mean(stats.mean)), float(np.mean(stats.std))
        if abs(raw_mean) < raw_std:  # statistics of features near 0 anyway: raw and normalised look alike
            return
        first = dataset.read_frames(0, 0, int(dataset.sizes[0]))
        mean = float(np.mean(first, dtype=np.float64))
        if abs(mean - raw_mean) < abs(mean):
            raise InputError(
                f"{manifest_path}: its features look raw (mean {mean:.1f}, like the mean {raw_mean:.1f} of "
                f"{stats_path}), yet with no task.mean_std_path they are taken as normalised (no "
                f"{os.path.basename(normalization_record_path(manifest_path))}: written before normalisation was "
                f"recorded, e.g. with --no-normalize); pass task.mean_std_path={stats_path}, or rewrite them "
                "with melhubert-wav-to-fbank"
            )

    @classmethod
    def setup_task(cls, cfg: MelHubertPretrainingConfig, **kwargs) -> "MelHubertPretrainingTask":
        """fairseq entry point (``from_checkpoint=True`` when loading a model for inference)."""
        return cls(cfg, from_checkpoint=bool(kwargs.get("from_checkpoint", False)))

    @property
    def label_dir(self) -> str:
        """Directory of the label files (``task.label_dir``, which must be set)."""
        if not self.cfg.label_dir:
            raise InputError(
                f"task.label_dir is not set: name the folder holding {{split}}.{self.cfg.labels} and "
                f"dict.{self.cfg.labels}.txt (task.label_dir=DIR; fairseq-validate: --label-dir DIR); "
                "it does not default to task.data"
            )
        return self.cfg.label_dir

    def _resolve_num_classes(self) -> int:
        dict_path = os.path.join(self.label_dir, dictionary_name(self.cfg.labels))
        dict_size = read_dictionary_size(dict_path)
        if self.cfg.num_classes == -1:
            if dict_size is None:
                raise FileNotFoundError(f"task.num_classes=-1 asks for {dict_path}, which does not exist")
            return dict_size
        if dict_size is not None and dict_size != self.cfg.num_classes:
            raise InputError(
                f"task.num_classes={self.cfg.num_classes} but {dict_path} lists {dict_size} clusters"
            )
        return self.cfg.num_classes

    @property
    def source_dictionary(self):
        return None

    @property
    def target_dictionary(self):
        return None

    def load_dataset(self, split: str, **kwargs) -> None:
        """Index ``{data}/{split}.tsv`` and ``{label_dir}/{split}.{labels}`` (labels stay on disk)."""
        manifest_path = os.path.join(self.cfg.data, f"{split}.tsv")
        if not os.path.isfile(manifest_path) and not is_training_split(split, self.cfg):
            raise FileNotFoundError(
                f"{manifest_path} not found: validation is on (dataset.valid_subset={split}); make that split with "
                f"the same tools as train (e.g. melhubert-wav-to-fbank --split {split} --mean-std <train mean-std.npy>), "
                "or pass dataset.disable_validation=true"
            )
        manifest = read_manifest(manifest_path)
        labels = None
        if self.cfg.labels is not None:
            labels = index_label_file(os.path.join(self.label_dir, f"{split}.{self.cfg.labels}"))
        self.datasets[split] = FbankLabelDataset(
            manifest,
            labels,
            feat_dim=self.cfg.feat_dim,
            rates=self.rates,
            num_classes=self.num_classes,
            mean_std=self.mean_std,
            max_sample_size=self.cfg.max_sample_size,
            min_sample_size=self.cfg.min_sample_size,
            max_keep_size=self.cfg.max_keep_size,
            pad_audio=self.cfg.pad_audio,
            random_crop=self.cfg.random_crop,
            shuffle=is_training_split(split, self.cfg),
            seed=self.cfg.seed,
        )
        # Fail before training, not at the first batch: read one utterance fully.
        dataset = self.datasets[split]
        dataset.read_frames(0, 0, int(dataset.sizes[0]))
        self.check_normalization(split, dataset)

    def build_model(self, cfg, from_checkpoint: bool = False):
        """Build the model and check it reads this task's frames and labels."""
        if self.cfg.labels is None and not from_checkpoint and str(getattr(cfg, "prediction_head", "")) == "cluster_ids":
            raise InputError(
                "task.labels=null gives no k-means labels, but model.prediction_head=cluster_ids predicts them: "
                "give task.labels and task.label_dir, or train a criterion that needs none (config/causal_apc.yaml)"
            )
        if self.num_classes is None:  # a checkpoint trained with task.num_classes=-1: K is the model's
            self.num_classes = int(cfg.num_classes)
        if getattr(cfg, "num_classes", None) == -1:
            # The model's num_classes interpolated task.num_classes=-1: store K itself, so the
            # checkpoint's model config needs no dict.km.txt to be rebuilt.
            with open_dict(cfg):
                cfg.num_classes = self.num_classes
        model = super().build_model(cfg, from_checkpoint)
        expected_input = self.cfg.feat_dim * self.cfg.stack_frames
        if getattr(model, "input_dim", expected_input) != expected_input:
            raise InputError(
                f"model input dim {model.input_dim} != task feat_dim x stack_frames = {expected_input}"
            )
        if not from_checkpoint and hasattr(model, "set_fbank_stats"):
            stats = self.training_feature_stats()
            if stats is not None:
                model.set_fbank_stats(torch.from_numpy(stats.mean), torch.from_numpy(stats.std))
        final_proj = getattr(model, "final_proj", None)
        if final_proj is not None and final_proj.out_features != self.num_classes:
            raise InputError(f"model predicts {final_proj.out_features} classes, task has {self.num_classes}")
        return model

    def build_criterion(self, cfg, from_checkpoint: bool = False):
        """Build the criterion and check that labels are given exactly when it reads them."""
        criterion = super().build_criterion(cfg, from_checkpoint)
        needs_labels = getattr(criterion, "needs_labels", True)
        name = getattr(cfg, "_name", type(criterion).__name__)
        if needs_labels and self.cfg.labels is None:
            raise InputError(
                f"task.labels=null: criterion {name} predicts k-means labels, so it needs them: give task.labels "
                "(e.g. km) and task.label_dir"
            )
        if not needs_labels and self.cfg.labels is not None and not from_checkpoint:
            raise InputError(
                f"task.labels={self.cfg.labels}: criterion {name} reads no labels (it predicts future fbank frames); "
                "set task.labels=null and drop task.label_dir"
            )
        return criterion

    def get_batch_iterator(self, dataset, *args, **kwargs):
        """fairseq's epoch iterator, with each index carried together with its epoch.

        fairseq builds the batches of every epoch with ``make_batches(dataset, epoch)``
        (``rebuild_batches``, seeded by seed + epoch); wrapping that builder tags every
        index with the epoch, so crops drawn in persistent DataLoader workers follow the
        epoch too (see :class:`EpochTaggedBatches`). A dataset that is not shuffled (a
        valid split) keeps the epoch the iterator was created for: the same crops at
        every validation.

        ``required_batch_size_multiple`` is always 1: with N > 1 fairseq's ``batch_by_size``
        drops the utterances that do not fill a multiple of N (``fairseq-validate``'s default
        of 8 scores 8 of 12 utterances), silently, at every epoch.
        """
        call = inspect.signature(FairseqTask.get_batch_iterator).bind(self, dataset, *args, **kwargs)
        call.apply_defaults()
        multiple = call.arguments["required_batch_size_multiple"]
        if isinstance(dataset, FbankLabelDataset) and multiple != 1:
            logger.warning(
                f"required_batch_size_multiple={multiple} would make fairseq drop the utterances that do not "
                "fill a multiple of it; using 1, so every utterance is used"
            )
            call.arguments["required_batch_size_multiple"] = 1
        if isinstance(dataset, FbankLabelDataset) and dataset.shuffle and isinstance(self.cfg.seed, int):
            # fairseq's trainer passes common.seed + epoch with update_ordered_indices_seed; other tools
            # (fairseq-validate) pass their own command line's seed, which is theirs to choose.
            seed, epoch = call.arguments["seed"], int(call.arguments["epoch"])
            if seed != self.cfg.seed and seed == self.cfg.seed + epoch:
                raise InputError(
                    "dataset.update_ordered_indices_seed=true is not supported: the batches are already rebuilt "
                    "every epoch from common.seed + epoch, and fairseq would keep the seed of the epoch a run was "
                    "(re)started in, so a resumed run would train on other batches"
                )
        epoch_iter = super().get_batch_iterator(*call.args[1:], **call.kwargs)
        if isinstance(dataset, FbankLabelDataset) and not isinstance(epoch_iter.batch_sampler, EpochTaggedBatches):
            fixed_epoch = None if dataset.shuffle else int(call.arguments["epoch"])
            epoch_iter.batch_sampler = EpochTaggedBatches(epoch_iter.batch_sampler, fixed_epoch)
        return epoch_iter

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        """fairseq's train_step; an utterance too short to mask is named by its manifest line."""
        with naming_unmaskable_utterances(sample):
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        """fairseq's valid_step; an utterance too short to mask is named by its manifest line. The first batch
        of every ``probe_interval``-th validation also probes the model (``task.probe_train``)."""
        if self.training_probe is not None:
            self._probe_at_validation_start(model)
        with naming_unmaskable_utterances(sample):
            return super().valid_step(sample, model, criterion)

    def _probe_at_validation_start(self, model) -> None:
        """Count validations (one per update number) and probe at the first, then every ``probe_interval``-th.

        The count is a meter of its own fairseq metrics aggregator: the trainer saves every aggregator in
        its checkpoints (``extra_state["metrics"]``) and restores them on resume, so a resumed run probes
        at the validations the uninterrupted one would have.
        """
        module = getattr(model, "module", model)
        num_updates = int(getattr(module, "num_updates", 0))
        if num_updates == self._last_validated_update:
            return  # a later batch (or valid subset) of the same validation
        self._last_validated_update = num_updates
        with metrics.aggregate(PROBE_SCHEDULE_AGGREGATOR, new_root=True) as schedule:
            metrics.log_scalar_sum("validations", 1)
        validations = int(round(schedule["validations"].sum))
        if (validations - 1) % self.cfg.probe_interval != 0:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return  # one rank probes: the others would log the same figures at the same cost
        device = str(next(module.parameters()).device)
        for name, value in self.training_probe.run(module, self.cfg, device).items():
            metrics.log_scalar(name, value, weight=1, round=2)

    def max_positions(self) -> Tuple[int, int]:
        return (sys.maxsize, sys.maxsize)

    def filter_indices_by_size(self, indices: np.ndarray, *args, **kwargs) -> np.ndarray:
        """Sizes are already bounded by cropping; nothing to filter."""
        return indices


@contextlib.contextmanager
def naming_unmaskable_utterances(sample: dict):
    """Turn a :class:`SpanMaskError` into an error naming the manifest row that is too short.

    Batches are cropped to their shortest utterance, so that one is the cause whichever
    row the masking rejected.
    """
    try:
        yield
    except SpanMaskError as err:
        utterances = sample.get("utterances") if isinstance(sample, dict) else None
        row = sample.get("crop_row") if utterances else None
        row = err.row if row is None else row
        if not utterances or row is None:
            raise
        cropped = " (the batch is cropped to this, its shortest utterance)" if sample.get("crop_row") is not None else ""
        raise InputError(
            f"{utterances[row]}: too short to mask{cropped}: {err}; skip utterances this short with "
            "task.min_sample_size (model frames)"
        ) from None
