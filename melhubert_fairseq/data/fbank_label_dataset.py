"""FbankLabelDataset: cropped, stacked log-Mel frames with their k-means labels."""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from fairseq.data import FairseqDataset

from melhubert_fairseq.data.features import (
    FBANK_FRAME_RATE_HZ,
    MeanStd,
    check_finite_frames,
    num_stacked_frames,
    open_feature_file,
    stack_frames,
)
from melhubert_fairseq.data.frame_rates import FrameRates, subsample_labels
from melhubert_fairseq.data.labels import LabelIndex, parse_label_line
from melhubert_fairseq.data.manifest import FeatureManifest
from melhubert_fairseq.errors import InputError

logger = logging.getLogger(__name__)

#: Label value used for padded positions in ``target`` (never read: padding_mask rules).
LABEL_PAD = -100

#: What fairseq's batch sampler hands to ``FbankLabelDataset.__getitem__``: an index, or
#: ``(index, epoch)`` when the batches come from :class:`EpochTaggedBatches`.
ItemKey = Union[int, Tuple[int, int]]


class EpochTaggedBatches:
    """Wraps fairseq's per-epoch batch builder so every index travels with its epoch.

    fairseq keeps its DataLoader workers (and the dataset copies inside them) alive
    across epochs, so ``set_epoch`` in the main process never reaches the code that
    draws crops. The epoch is therefore carried with each index, and a batch's crops
    are a function of (seed, epoch, utterance) alone, whatever ``num_workers`` is.

    A ``fixed_epoch`` tags every epoch's indices with that one epoch instead: a validation
    set then scores the same crops at every validation, in every process (fairseq moves
    its valid iterator's epoch on at each validation, from 1 again in a resumed run).
    """

    def __init__(
        self, make_batches: Callable[[object, int], Sequence[Sequence[int]]], fixed_epoch: Optional[int] = None
    ) -> None:
        self.make_batches = make_batches
        self.fixed_epoch = fixed_epoch

    def __call__(self, dataset, epoch: int) -> List[List[Tuple[int, int]]]:
        """The batches fairseq built for ``epoch``, as lists of ``(index, epoch)`` (or ``fixed_epoch``)."""
        tag = int(epoch if self.fixed_epoch is None else self.fixed_epoch)
        return [[(int(index), tag) for index in batch] for batch in self.make_batches(dataset, epoch)]


class FbankLabelDataset(FairseqDataset):
    """Reads only each utterance's crop window (memory-mapped ``.npy``) and its ``.km`` line (if labels are given).

    ``sizes`` are in model frames. Items are cheap handles; the disk reads happen
    in :meth:`collater`, which runs in the DataLoader workers and knows the
    batch's crop length.
    """

    def __init__(
        self,
        manifest: FeatureManifest,
        labels: Optional[LabelIndex],
        feat_dim: int,
        rates: FrameRates,
        num_classes: int,
        mean_std: Optional[MeanStd] = None,
        max_sample_size: Optional[int] = None,
        min_sample_size: Optional[int] = None,
        max_keep_size: Optional[int] = None,
        pad_audio: bool = False,
        random_crop: bool = True,
        shuffle: bool = True,
        seed: int = 1,
    ) -> None:
        super().__init__()
        if labels is not None and len(labels) != len(manifest):
            raise InputError(
                f"{labels.path} has {len(labels)} lines but manifest {manifest.path} has "
                f"{len(manifest)} utterances: they must match line for line"
            )
        if mean_std is not None and mean_std.dim != feat_dim:
            raise InputError(f"mean/std has dim {mean_std.dim} but task.feat_dim is {feat_dim}")
        self.rates = rates
        self.feat_dim = feat_dim
        self.num_classes = num_classes
        self.mean_std = mean_std
        self.max_sample_size = max_sample_size or np.iinfo(np.int64).max
        self.pad_audio = pad_audio
        self.random_crop = random_crop
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 1

        model_frames = num_stacked_frames(manifest.num_frames, rates.stack)
        if labels is not None:
            self._check_label_counts(manifest, labels)
            model_frames = np.minimum(model_frames, -(-labels.counts // rates.labels_per_model_frame_step))
        keep = np.ones(len(manifest), dtype=bool)
        if min_sample_size:
            too_short = model_frames < min_sample_size
            keep &= ~too_short
            if too_short.any():
                logger.info(f"skipping {int(too_short.sum())} utterances shorter than {min_sample_size} model frames")
        if max_keep_size:
            too_long = model_frames > max_keep_size
            keep &= ~too_long
            if too_long.any():
                logger.info(f"skipping {int(too_long.sum())} utterances longer than {max_keep_size} model frames")
        if not keep.any():
            raise InputError(f"{manifest.path}: no utterance left after min/max size filtering")
        rows = np.flatnonzero(keep)
        self.manifest = manifest.select(rows) if len(rows) < len(manifest) else manifest
        #: None: no labels (a criterion that reads none); batches then have no ``target``.
        self.label_path = labels.path if labels is not None else None
        self.label_offsets = labels.offsets[rows] if labels is not None else None
        self.sizes = model_frames[rows].astype(np.int64)
        logger.info(
            f"{manifest.path}: {len(self.sizes)} utterances kept of {len(manifest)}, "
            f"{self.sizes.sum() * rates.stack / FBANK_FRAME_RATE_HZ / 3600:.2f} h"
        )

    def _check_label_counts(self, manifest: FeatureManifest, labels: LabelIndex) -> None:
        expected = self.rates.expected_labels(manifest.num_frames)
        bad = np.flatnonzero(np.abs(labels.counts - expected) > self.rates.label_tolerance)
        if bad.size:
            examples = "; ".join(
                f"{manifest.describe(i)}: {manifest.num_frames[i]} frames -> expected "
                f"{expected[i]} labels, {labels.path}:{i + 1} has {labels.counts[i]}"
                for i in bad[:5]
            )
            raise InputError(
                f"{bad.size} utterances have a label count that does not match their frames "
                f"(label stride {self.rates.label_stride} fbank frames): {examples}"
            )

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, key: ItemKey) -> Dict[str, int]:
        """A cheap handle ``{"id", "epoch"}``; the epoch comes with the key (see EpochTaggedBatches)."""
        if isinstance(key, tuple):
            index, epoch = key
            return {"id": int(index), "epoch": int(epoch)}
        return {"id": int(key), "epoch": self.epoch}

    def set_epoch(self, epoch: int) -> None:
        """Epoch for keys that come without one (direct indexing in the main process)."""
        self.epoch = epoch

    def size(self, index: int) -> int:
        return min(int(self.sizes[index]), self.max_sample_size)

    def num_tokens(self, index: int) -> int:
        return self.size(index)

    def num_tokens_vec(self, indices: np.ndarray) -> np.ndarray:
        return np.minimum(self.sizes[indices], self.max_sample_size)

    def ordered_indices(self) -> np.ndarray:
        """Longest first, ties broken randomly (fairseq seeds numpy with seed + epoch around this call,
        and the task rebuilds batches every epoch, so batch composition is a function of (seed, epoch))."""
        order = [np.random.permutation(len(self)) if self.shuffle else np.arange(len(self)), self.sizes]
        return np.lexsort(order)[::-1]

    def read_frames(self, index: int, start: int, length: int) -> np.ndarray:
        """Model frames [start, start+length) of utterance ``index``: read, checked, normalised, stacked."""
        stack = self.rates.stack
        path = self.manifest.full_path(index)
        where = self.manifest.describe(index)
        feats = open_feature_file(
            path, where, self.feat_dim, int(self.manifest.num_frames[index]),
            dim_name=f"task.feat_dim; model input = feat_dim x stack_frames = {self.feat_dim * stack}",
        )
        crop = np.array(feats[start * stack : (start + length) * stack], dtype=np.float32)  # the disk read
        check_finite_frames(crop, where, path, first_frame=start * stack)
        if self.mean_std is not None:
            crop = self.mean_std.normalize(crop)
        return stack_frames(crop, stack)[:length]

    def read_labels(self, index: int, start: int, length: int) -> np.ndarray:
        """Labels of model frames [start, start+length) of utterance ``index``, range-checked."""
        with open(self.label_path, "rb") as handle:
            handle.seek(int(self.label_offsets[index]))
            line = handle.readline()
        where = f"{self.manifest.describe(index)}, {self.label_path}"
        labels = parse_label_line(line, where)
        bad = (labels < 0) | (labels >= self.num_classes)
        if bad.any():
            raise InputError(
                f"{where}: label {int(labels[bad][0])} outside [0, {self.num_classes}) (task.num_classes)"
            )
        labels = subsample_labels(labels, self.rates.labels_per_model_frame_step)
        return labels[start : start + length]

    def crop_start(self, index: int, size: int, target: int, epoch: int) -> int:
        """Random (or leading) crop start, drawn from (seed, epoch, index)."""
        if size <= target or not self.random_crop:
            return 0
        rng = np.random.default_rng((self.seed, int(epoch), int(index)))
        return int(rng.integers(0, size - target + 1))

    def collater(self, samples: List[Dict[str, int]]) -> Dict:
        """Crop every utterance to the batch length, read it from disk and pad."""
        if not samples:
            return {}
        ids = [s["id"] for s in samples]
        epochs = [s.get("epoch", self.epoch) for s in samples]
        sizes = [int(self.sizes[i]) for i in ids]
        longest = max(sizes) if self.pad_audio else min(sizes)
        target = min(longest, self.max_sample_size)
        batch = len(ids)
        source = torch.zeros(batch, target, self.feat_dim * self.rates.stack)
        padding_mask = torch.zeros(batch, target, dtype=torch.bool)
        has_labels = self.label_path is not None
        target_labels = torch.full((batch, target), LABEL_PAD, dtype=torch.long) if has_labels else None
        for row, (index, size, epoch) in enumerate(zip(ids, sizes, epochs)):
            length = min(size, target)
            start = self.crop_start(index, size, target, epoch)
            source[row, :length] = torch.from_numpy(self.read_frames(index, start, length))
            if has_labels:
                target_labels[row, :length] = torch.from_numpy(self.read_labels(index, start, length))
            padding_mask[row, length:] = True
        id_tensor = torch.tensor(ids, dtype=torch.long)
        return {
            "id": id_tensor,
            "net_input": {"source": source, "padding_mask": padding_mask, "sample_ids": id_tensor},
            **({"target": target_labels} if has_labels else {}),
            "ntokens": int((~padding_mask).sum()),
            "nsentences": batch,
            # For errors raised later (model, criterion): which manifest rows this batch holds,
            # and which one set the crop length (None: padded to the longest).
            "utterances": [self.manifest.describe(i) for i in ids],
            "crop_row": None if self.pad_audio else int(np.argmin(sizes)),
        }
