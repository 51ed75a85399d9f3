"""Average the weights of several fairseq ``mel_hubert`` checkpoints (fairseq's wheel ships no such script).

Pick the inputs explicitly (``--inputs a.pt b.pt``) or give a run directory and
take its newest N update checkpoints (``checkpoint_{epoch}_{update}.pt``,
``--num-update-checkpoints N``) or epoch checkpoints (``checkpoint{epoch}.pt``,
``--num-epoch-checkpoints N``); ``checkpoint_last.pt`` and ``checkpoint_best.pt``
are only averaged when named with ``--inputs``.

Every input must hold the same parameter names, shapes and dtypes, and the
same fbank statistics. Floating-point tensors are averaged in float64. As
fairseq's ``scripts/average_checkpoints.py`` does, everything else comes from
the newest input (most updates): config, optimizer state, update count, epoch
and data-iterator position, so ``checkpoint.restore_file=AVERAGED.pt``
continues that run's schedule at its update, while
``checkpoint.finetune_from_model=AVERAGED.pt`` starts a new one from the
averaged weights. Inputs are read with ``torch.load(weights_only=True)``; the
output is written atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence


from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.cli import console_main, with_progress
from melhubert_fairseq.errors import InputError

if TYPE_CHECKING:
    import torch

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
    """The ``count`` newest update (or epoch) checkpoints of a run directory, newest first; too few is an
    error listing the folder's checkpoint files and the names averaged."""
    from fairseq.checkpoint_utils import checkpoint_paths

    if not os.path.isdir(directory):
        raise NotADirectoryError(f"--num-*-checkpoints needs one run directory as --inputs, got {directory}")
    if count < 1:
        raise InputError(f"--num-*-checkpoints must be at least 1, got {count}")
    pattern = UPDATE_CHECKPOINT_PATTERN if update_based else EPOCH_CHECKPOINT_PATTERN
    paths = checkpoint_paths(directory, pattern=pattern)
    if len(paths) >= count:
        return paths[:count]
    if update_based:
        kind, names = "update", "checkpoint_<epoch>_<update>.pt (saved every checkpoint.save_interval_updates)"
    else:
        kind, names = "epoch", "checkpoint<epoch>.pt (saved at the end of every checkpoint.save_interval epochs)"
    found = sorted(name for name in os.listdir(directory) if name.endswith(".pt"))
    raise InputError(
        f"{directory}: asked for the newest {count} {kind} checkpoints, it has {len(paths)}; its .pt files: "
        f"{name_list(found)}. --num-{kind}-checkpoints averages {names}; checkpoint_last.pt and "
        "checkpoint_best.pt are only averaged when named: --inputs A.pt B.pt"
    )


def name_list(names: Sequence[str], limit: int = 10) -> str:
    """``a, b, c`` (the first ``limit`` names, then how many more), or ``none``."""
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def num_updates(state: Dict[str, Any]) -> int:
    """The update count a fairseq checkpoint was saved at."""
    history = state.get("optimizer_history") or [{}]
    return int(history[-1].get("num_updates", 0))


def check_compatible(reference: Dict[str, torch.Tensor], other: Dict[str, torch.Tensor], where: str, first: str) -> None:
    """Same keys, shapes, dtypes; equal data-describing tensors; errors name both files."""
    import torch

    missing, extra = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
    if missing or extra:
        raise InputError(f"{where} and {first} hold different parameters: missing {missing}, extra {extra}")
    for name, tensor in reference.items():
        theirs = other[name]
        if theirs.shape != tensor.shape or theirs.dtype != tensor.dtype:
            raise InputError(
                f"{where}: {name} is {tuple(theirs.shape)} {theirs.dtype}, {first} has {tuple(tensor.shape)} {tensor.dtype}"
            )
        exact = name in MUST_BE_EQUAL or not tensor.is_floating_point()
        if exact and not torch.equal(theirs.nan_to_num(), tensor.nan_to_num()):
            raise InputError(f"{where}: {name} differs from {first}; it cannot be averaged")


def epoch_of(state: Dict[str, Any]) -> Optional[int]:
    """The epoch a fairseq checkpoint's data iterator was in, if it records one."""
    iterator = (state.get("extra_state") or {}).get("train_iterator") or {}
    return iterator.get("epoch")


def average_checkpoints(paths: Sequence[str]) -> Dict[str, Any]:
    """Load ``paths`` safely and return the newest one's state (optimizer, update count, epoch and
    iterator position included) with the mean of all models' weights."""
    from melhubert_fairseq.checkpoint_loading import load_fairseq_state

    if len(paths) < 2:
        raise InputError(f"averaging needs at least 2 checkpoints, got {list(paths)}")
    sums: Dict[str, torch.Tensor] = {}
    template: Optional[Dict[str, Any]] = None
    reference: Dict[str, torch.Tensor] = {}
    for path in with_progress(paths, desc="average", unit="ckpt"):
        state = load_fairseq_state(path)
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
    result["extra_state"] = {**template.get("extra_state", {}), "averaged_checkpoints": [os.path.basename(p) for p in paths]}
    return result


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run average_checkpoints; return the exit status."""
    args = build_parser().parse_args(argv)
    from melhubert_fairseq.checkpoint_saving import atomic_torch_save  # after parsing: --help needs no torch

    started = time.perf_counter()
    update_based = args.num_update_checkpoints is not None
    count = args.num_update_checkpoints if update_based else args.num_epoch_checkpoints
    if count is not None:
        if len(args.inputs) != 1:
            raise InputError("--num-*-checkpoints takes exactly one run directory as --inputs")
        paths = newest_checkpoints(args.inputs[0], count, update_based=update_based)
    else:
        paths = list(args.inputs)
        folder = next((path for path in paths if os.path.isdir(path)), None)
        if folder is not None:
            found = sorted(name for name in os.listdir(folder) if name.endswith(".pt"))
            raise InputError(
                f"{folder} is a folder: add --num-update-checkpoints N or --num-epoch-checkpoints N to average its "
                f"newest checkpoints, or name the files; its .pt files: {name_list(found)}"
            )
    refuse_replacing_inputs([args.output], paths)
    check_writable(args.output, args.overwrite)
    state = average_checkpoints(paths)
    atomic_torch_save(state, args.output, overwrite=args.overwrite)
    num_params = sum(t.numel() for t in state["model"].values())
    optimizer = "optimizer state, " if state.get("last_optimizer_state") is not None else ""
    print(
        f"averaged {len(paths)} checkpoints ({', '.join(os.path.basename(p) for p in paths)}), "
        f"{len(state['model'])} tensors / {num_params} values; kept the newest one's config, {optimizer}"
        f"update {num_updates(state)} and epoch {epoch_of(state)}, in {time.perf_counter() - started:.1f} s "
        f"-> {os.path.abspath(args.output)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
