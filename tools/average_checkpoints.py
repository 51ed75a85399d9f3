"""Average the weights of several fairseq ``mel_hubert`` checkpoints (fairseq's wheel ships no such script).

Pick the inputs explicitly (``--inputs a.pt b.pt``) or give a run directory and
take its newest N update checkpoints (``checkpoint_{epoch}_{update}.pt``,
``--num-update-checkpoints N``) or epoch checkpoints (``checkpoint{epoch}.pt``,
``--num-epoch-checkpoints N``).

Every input must hold the same parameter names, shapes and dtypes, and the
same fbank statistics. Floating-point tensors are averaged in float64; the
result keeps the config, update count and data-iterator state of the newest
input but no optimizer state (the averaged weights are a new point: start
training from them with ``checkpoint.finetune_from_model=AVERAGED.pt``).
Inputs are read with ``torch.load(weights_only=True)``; the output is written
atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from fairseq import checkpoint_utils
from tqdm import tqdm

# Importing the package (as any melhubert_fairseq.tools module does) allow-lists
# fairseq's checkpoint types for the weights-only loader used below.
from melhubert_fairseq.atomic_output import check_writable
from melhubert_fairseq.checkpoint_io import atomic_torch_save, safe_torch_load
from melhubert_fairseq.cli import console_main

UPDATE_CHECKPOINT_PATTERN = r"checkpoint_\d+_(\d+)\.pt"
EPOCH_CHECKPOINT_PATTERN = r"checkpoint(\d+)\.pt"
#: Tensors that describe the data, not learned weights: they must agree, never be averaged.
MUST_BE_EQUAL = ("fbank_mean_std",)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of average_checkpoints."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", required=True, help="checkpoint files, or one run directory with --num-*-checkpoints")
    parser.add_argument("--output", required=True, help="averaged checkpoint to write")
    newest = parser.add_mutually_exclusive_group()
    newest.add_argument("--num-update-checkpoints", type=int, help="average the newest N checkpoint_*_<update>.pt of the directory")
    newest.add_argument("--num-epoch-checkpoints", type=int, help="average the newest N checkpoint<epoch>.pt of the directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def newest_checkpoints(directory: str, count: int, update_based: bool) -> List[str]:
    """The ``count`` newest update (or epoch) checkpoints of a run directory, newest first."""
    if not os.path.isdir(directory):
        raise NotADirectoryError(f"--num-*-checkpoints needs one run directory as --inputs, got {directory}")
    pattern = UPDATE_CHECKPOINT_PATTERN if update_based else EPOCH_CHECKPOINT_PATTERN
    paths = checkpoint_utils.checkpoint_paths(directory, pattern=pattern)
    if count < 1 or len(paths) < count:
        kind = "update (checkpoint_E_U.pt)" if update_based else "epoch (checkpointE.pt)"
        raise ValueError(
            f"asked for {count} {kind} checkpoints, {directory} has {len(paths)}: "
            f"{[os.path.basename(p) for p in paths]}"
        )
    return paths[:count]


def num_updates(state: Dict[str, Any]) -> int:
    """The update count a fairseq checkpoint was saved at."""
    history = state.get("optimizer_history") or [{}]
    return int(history[-1].get("num_updates", 0))


def check_compatible(reference: Dict[str, torch.Tensor], other: Dict[str, torch.Tensor], where: str, first: str) -> None:
    """Same keys, shapes, dtypes; equal data-describing tensors; errors name both files."""
    missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
    if missing or extra:
        raise ValueError(f"{where} and {first} hold different parameters: missing {missing}, extra {extra}")
    for name, tensor in reference.items():
        theirs = other[name]
        if theirs.shape != tensor.shape or theirs.dtype != tensor.dtype:
            raise ValueError(
                f"{where}: {name} is {tuple(theirs.shape)} {theirs.dtype}, {first} has {tuple(tensor.shape)} {tensor.dtype}"
            )
        exact = name in MUST_BE_EQUAL or not tensor.is_floating_point()
        if exact and not torch.equal(theirs.nan_to_num(), tensor.nan_to_num()):
            raise ValueError(f"{where}: {name} differs from {first}; it cannot be averaged")


def average_checkpoints(paths: Sequence[str]) -> Dict[str, Any]:
    """Load ``paths`` safely and return the newest one's state with the mean of all models' weights."""
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least 2 checkpoints, got {list(paths)}")
    sums: Dict[str, torch.Tensor] = {}
    template: Optional[Dict[str, Any]] = None
    reference: Dict[str, torch.Tensor] = {}
    for path in tqdm(paths, desc="average", unit="ckpt"):
        state = safe_torch_load(path)
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
        model = state["model"]
        if not sums:
            reference = {name: tensor.clone() for name, tensor in model.items()}
            sums = {name: tensor.double() if tensor.is_floating_point() else tensor for name, tensor in model.items()}
        else:
            check_compatible(reference, model, path, paths[0])
            for name, tensor in model.items():
                if tensor.is_floating_point():
                    sums[name] += tensor.double()
        if template is None or num_updates(state) >= num_updates(template):
            template = state
        state = None  # free the previous file before loading the next
    averaged = {
        name: (total / len(paths)).to(reference[name].dtype) if reference[name].is_floating_point() else total
        for name, total in sums.items()
    }
    result = dict(template)
    result["model"] = averaged
    result.pop("last_optimizer_state", None)
    result["extra_state"] = {**template.get("extra_state", {}), "averaged_checkpoints": [os.path.basename(p) for p in paths]}
    return result


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run average_checkpoints; return the exit status."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    check_writable(args.output, args.overwrite)
    if args.num_update_checkpoints or args.num_epoch_checkpoints:
        if len(args.inputs) != 1:
            raise ValueError("--num-*-checkpoints takes exactly one run directory as --inputs")
        count = args.num_update_checkpoints or args.num_epoch_checkpoints
        paths = newest_checkpoints(args.inputs[0], count, update_based=bool(args.num_update_checkpoints))
    else:
        paths = list(args.inputs)
    state = average_checkpoints(paths)
    atomic_torch_save(state, args.output, overwrite=args.overwrite)
    num_params = sum(t.numel() for t in state["model"].values())
    print(
        f"averaged {len(paths)} checkpoints ({', '.join(os.path.basename(p) for p in paths)}), "
        f"{len(state['model'])} tensors / {num_params} values, kept config and update count "
        f"{num_updates(state)} of the newest, in {time.perf_counter() - started:.1f} s -> {os.path.abspath(args.output)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
