"""What a file is, judged from its first bytes: refusing a file torch.save cannot have written before torch reads it.

A ``.npy`` array, a k-means model, a joblib pickle, a text or JSON file, an empty file or a damaged zip
given where a checkpoint belongs is named for what it is (:func:`check_torch_file`), instead of torch's
unpickling error.
"""
from __future__ import annotations

import os
import zipfile
from typing import Optional

import numpy as np

from melhubert_fairseq.errors import InputError
from melhubert_fairseq.file_formats import KMEANS_FORMAT, LEGACY_TORCH_HEADER, NPY_MAGIC, ZIP_MAGIC


class CheckpointFormatError(InputError):
    """A file is not the kind of checkpoint it was given as."""


def describe_file(path: str) -> Optional[str]:
    """None for a file ``torch.save`` can have written, else what the file is instead (for the error)."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("/data.pkl") for name in names):
            return None  # torch >= 1.6 writes a zip archive holding <name>/data.pkl
        if names and all(name.endswith(".npy") for name in names):
            return "a NumPy .npz archive"
        return "a zip archive without torch's data.pkl"
    if head.startswith(LEGACY_TORCH_HEADER):
        return None
    if head.startswith(ZIP_MAGIC):
        return "a truncated or damaged zip archive (no central directory)"
    if head.startswith(NPY_MAGIC):
        return describe_npy(path)
    if head.startswith(b"\x80"):
        return "a Python pickle (pickle.dump / joblib output, e.g. a scikit-learn k-means model), not torch.save's format"
    if not head:
        return "an empty file"
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd")  # the 64 bytes may cut a character
    if all(char.isprintable() or char in "\t\n\r" for char in text) and text.strip():
        first_line = text.strip().splitlines()[0]
        if is_kmeans_sidecar(path):
            return "the JSON sidecar of a k-means model (written by melhubert-learn-kmeans)"
        kind = "a JSON file" if first_line.startswith(("{", "[")) else "a text file"
        return f"{kind} (it starts with {first_line[:40]!r})"
    return f"not a format torch writes (it starts with {head[:8]!r})"


def describe_npy(path: str) -> str:
    """``a NumPy .npy array of shape ...``, naming a k-means model when its learn_kmeans sidecar is beside it."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only; no data is read
    except ValueError:
        return "a NumPy .npy file"
    shape = tuple(array.shape)
    what = f"a NumPy .npy array of shape {shape}, {array.dtype}"
    if is_kmeans_sidecar(os.path.splitext(path)[0] + ".json"):
        what = f"a k-means model (centroids {shape}, written by melhubert-learn-kmeans)"
    return what


def is_kmeans_sidecar(path: str) -> bool:
    """Whether ``path`` is the JSON sidecar melhubert-learn-kmeans writes next to its centroids."""
    try:
        with open(path, encoding="utf-8") as handle:
            return f'"{KMEANS_FORMAT}"' in handle.read(4096)
    except (OSError, UnicodeDecodeError):
        return False


def check_torch_file(path: str) -> None:
    """Refuse a file that ``torch.save`` cannot have written (a ``.npy``, a k-means model, a text file, a
    plain pickle, an empty file) with one line saying what it is, before torch reads any of it."""
    kind = describe_file(path)
    if kind is not None:
        raise CheckpointFormatError(f"{path}: not a torch checkpoint: it is {kind}")

