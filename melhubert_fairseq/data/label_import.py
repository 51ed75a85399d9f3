"""Labels made elsewhere (the original release's Kaldi arks, a folder of label files) matched to a
manifest's utterances, checked against its frame counts, and written as ``{split}.km`` beside it.

The label-import tools (``melhubert-import-kaldi-labels``, ``melhubert-create-manifest
--label-dir``) read their inputs and leave matching, checking and writing to this module.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from melhubert_fairseq.disk_full import writing
from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.staged_outputs import StagedOutputs
from melhubert_fairseq.data.labels import (
    KM_DICTIONARY_NAME,
    LabelLineFormatter,
    dictionary_needs_writing,
    validate_labels,
    write_dictionary,
)
from melhubert_fairseq.data.manifest import write_manifest
from melhubert_fairseq.errors import InputError

#: How many utterance ids an error or skip report spells out before "... and N more".
LISTED_IDS = 20

#: What :func:`write_label_outputs` wraps its loop in to show progress: ``progress(iterable, **tqdm_args)``.
Progress = Callable[..., Iterable]


def format_ids(ids: Sequence[str], limit: int = LISTED_IDS) -> str:
    """``a, b, c, ... and N more`` for reports that must name utterances without flooding the terminal."""
    shown = ", ".join(ids[:limit])
    return shown + (f", ... and {len(ids) - limit} more" if len(ids) > limit else "")


def check_unique_ids(ids: Sequence[str], source: str) -> None:
    """Raise if two rows of ``source`` share an utterance id (they could not be matched to labels)."""
    seen: Dict[str, int] = {}
    for row, utt_id in enumerate(ids):
        if utt_id in seen:
            raise InputError(
                f"{source}: utterance id {utt_id} appears in rows {seen[utt_id] + 1} and {row + 1}; "
                "ids (file stems) must be unique to match labels"
            )
        seen[utt_id] = row


@dataclass
class IdMatch:
    """Result of matching feature utterances (in manifest order) with labelled utterances."""

    keep: np.ndarray  # int64 row indices of feature utterances that have labels
    no_labels: List[str]  # feature utterances without labels, in manifest order
    no_features: List[str]  # labelled utterances without features, sorted
    #: What was left out and why, one sentence each (empty when everything matched): the tool reports them.
    problems: List[str] = field(default_factory=list)

    def dropped_rows(self) -> List[Tuple[str, str]]:
        """``(utt_id, reason)`` for everything left out of the outputs."""
        return [(utt, "no labels") for utt in self.no_labels] + [
            (utt, "labels without features") for utt in self.no_features
        ]


def match_ids(
    feature_ids: Sequence[str],
    label_ids: Iterable[str],
    feature_source: str,
    label_source: str,
    skip_missing: bool,
) -> IdMatch:
    """Match utterance ids; any mismatch is an error listing the ids unless ``skip_missing`` (then the
    match's ``problems`` say what was skipped)."""
    label_set = set(label_ids)
    feature_set = set(feature_ids)
    keep = np.asarray([i for i, utt in enumerate(feature_ids) if utt in label_set], dtype=np.int64)
    match = IdMatch(
        keep=keep,
        no_labels=[utt for utt in feature_ids if utt not in label_set],
        no_features=sorted(label_set - feature_set),
    )
    problems = match.problems
    if match.no_labels:
        problems.append(
            f"{len(match.no_labels)} utterance(s) of {feature_source} have no labels in {label_source}: "
            f"{format_ids(match.no_labels)}"
        )
    if match.no_features:
        problems.append(
            f"{len(match.no_features)} utterance(s) of {label_source} have no features in {feature_source}: "
            f"{format_ids(match.no_features)}"
        )
    if problems and not skip_missing:
        raise InputError(
            "; ".join(problems)
            + ". Pass --skip-missing to keep only the matched utterances (the dropped ones are listed)."
        )
    if not len(keep):
        raise InputError(f"no utterance of {feature_source} has labels in {label_source}")
    return match


@dataclass
class ManifestRows:
    """Rows of a manifest to write: root dir, relative paths, 10 ms frame counts, utterance ids."""

    root: str
    rel_paths: List[str]
    num_frames: np.ndarray
    utt_ids: List[str]

    def select(self, keep: np.ndarray) -> "ManifestRows":
        """Only rows ``keep``, in that order."""
        return ManifestRows(
            self.root,
            [self.rel_paths[i] for i in keep],
            self.num_frames[keep],
            [self.utt_ids[i] for i in keep],
        )


def write_label_outputs(
    out_dir: str,
    split: str,
    rows: ManifestRows,
    read_labels: Callable[[int], np.ndarray],
    label_source: str,
    num_classes: int,
    overwrite: bool,
    write_new_manifest: bool,
    dropped: Sequence[Tuple[str, str]] = (),
    stride: int = 1,
    inputs: Iterable[str] = (),
    progress: Optional[Progress] = None,
) -> Dict[str, str]:
    """Write ``{split}.km`` (row-aligned with ``rows``), ``dict.km.txt``, the dropped list and, last, the manifest.

    ``read_labels(i)`` returns the labels of row ``i``; each is validated
    against the row's frame count. Every output is checked for writability
    (and against the ``inputs`` files: none is ever replaced) before any work, staged, and published by renames (StagedOutputs), so a
    bad utterance leaves none of them behind and a kill never leaves new labels
    beside an old manifest. ``progress`` (e.g. :func:`melhubert_fairseq.cli.with_progress`) wraps the
    loop over utterances. Returns the paths written, by kind.
    """
    km_path = os.path.join(out_dir, f"{split}.km")
    dict_path = os.path.join(out_dir, KM_DICTIONARY_NAME)
    manifest_path = os.path.join(out_dir, f"{split}.tsv")
    dropped_path = os.path.join(out_dir, f"{split}.dropped.txt")
    with StagedOutputs(f"{split}.labels", [out_dir], overwrite) as staged:
        # After the recovery on entry, which undoes what a killed run had published.
        refuse_replacing_inputs(
            [km_path, dict_path] + ([manifest_path] if write_new_manifest else []) + ([dropped_path] if dropped else []),
            inputs,
        )
        check_writable(km_path, overwrite)
        if write_new_manifest:
            check_writable(manifest_path, overwrite)
        if dropped:
            check_writable(dropped_path, overwrite)
        need_dict = dictionary_needs_writing(dict_path, num_classes, overwrite, "--num-classes is")

        format_line = LabelLineFormatter(num_classes)
        with writing(staged.path(km_path), "w") as handle:
            indices: Iterable[int] = range(len(rows.utt_ids))
            if progress is not None:
                indices = progress(indices, desc=f"{split}.km", unit="utt", mininterval=1.0)
            for i in indices:
                labels = validate_labels(
                    read_labels(i), int(rows.num_frames[i]), num_classes, rows.utt_ids[i], label_source, stride
                )
                handle.write(format_line(labels))
        written = {"labels": km_path}
        finals = []
        if need_dict:
            write_dictionary(staged.path(dict_path), num_classes)
            finals.append(dict_path)
            written["dictionary"] = dict_path
        if dropped:
            with writing(staged.path(dropped_path), "w") as handle:
                for utt_id, reason in dropped:
                    handle.write(f"{utt_id}\t{reason}\n")
            finals.append(dropped_path)
            written["dropped list"] = dropped_path
        finals.append(km_path)
        if write_new_manifest:
            write_manifest(staged.path(manifest_path), rows.root, zip(rows.rel_paths, rows.num_frames.tolist()))
            finals.append(manifest_path)
            written["manifest"] = manifest_path
        staged.publish(finals)  # the manifest (else the labels) last
    return written
