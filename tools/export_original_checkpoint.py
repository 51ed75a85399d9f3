"""Export a fairseq ``mel_hubert`` checkpoint to the original Mel-HuBERT release's ``.ckpt`` format.

The inverse of ``melhubert-convert-original``: the output is the dict the
original ``pretrain_expert.save_model`` writes, ``{"model": state_dict,
"Upstream_Config": {"melhubert": {...}}, "Step": num_updates}``, which the
original code (``MelHuBERTModel(MelHuBERTConfig(...)).load_state_dict``, its
extract_feature.py, ``train.py -i``, the authors' s3prl upstream) loads
strictly. It holds only plain types: ``Args`` and ``Runner`` describe an
original training run and are left out (no original loader reads them).

``--mean-std-out`` writes the fbank mean/std stored in the checkpoint as the
separate ``mean-std.npy`` (2 x 40) the original reads. ``--with-optimizer``
adds the Adam state as the original's ``Optimizer`` (for ``train.py -i ...
--init_optimizer_from_initial_weight``). A model the original code cannot run
(causal attention, pos_conv_depth > 1, an activation it lacks, masking after
the projection, non-40-bin fbank, ...) is refused with the reason.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional


from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.cli import console_main, progress_bar
from melhubert_fairseq.data.features import FBANK_FRAME_RATE_HZ, FBANK_NUM_MEL_BINS, save_mean_std
from melhubert_fairseq.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of export_original_checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="fairseq mel_hubert checkpoint (e.g. checkpoints/stage1/checkpoint_last.pt)")
    parser.add_argument("output", help="original-format .ckpt to write (name it *oldmask* for old-mask models)")
    parser.add_argument(
        "--mean-std-out", metavar="NPY",
        help="also write the checkpoint's fbank mean/std as the original's mean-std.npy (2 x 40)",
    )
    parser.add_argument(
        "--with-optimizer", action="store_true",
        help="also export the Adam state as 'Optimizer' (for the original's -i ... --init_optimizer_from_initial_weight)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run the export; return the exit status."""
    args = build_parser().parse_args(argv)
    # torch and the plugin's checkpoint code after parsing: --help needs neither.
    from melhubert_fairseq.checkpoint_saving import atomic_torch_save
    from melhubert_fairseq.original.export import export_original_checkpoint
    from melhubert_fairseq.original.format import is_old_mask_checkpoint

    started = time.perf_counter()
    if args.mean_std_out and os.path.abspath(args.mean_std_out) == os.path.abspath(args.output):
        raise InputError(f"{args.output}: given as the output and as --mean-std-out; name two files")
    refuse_replacing_inputs([args.output, args.mean_std_out], [args.checkpoint])
    check_writable(args.output, args.overwrite)
    if args.mean_std_out:
        check_writable(args.mean_std_out, args.overwrite)
    with progress_bar(total=2, desc="export", unit="step") as progress:
        result = export_original_checkpoint(args.checkpoint, with_optimizer=args.with_optimizer)
        if args.mean_std_out and result.mean_std is None:
            raise InputError(
                f"{args.checkpoint}: records no fbank mean/std, so --mean-std-out has nothing to write "
                "(use the mean-std.npy of the corpus it was trained on)"
            )
        progress.update(1)
        if args.mean_std_out:
            save_mean_std(args.mean_std_out, result.mean_std, overwrite=args.overwrite)
        atomic_torch_save(result.state, args.output, overwrite=args.overwrite)
        progress.update(1)
    notes = list(result.notes)
    if result.mean_std is not None and not args.mean_std_out:
        notes.append("the checkpoint's fbank mean/std were not written: pass --mean-std-out FILE (the original reads them from a .npy)")
    if result.old_mask != is_old_mask_checkpoint(args.output):
        notes.append(
            f"require_same_masks={str(result.old_mask).lower()} is recorded by the original format only in the file name "
            f"('oldmask' {'missing from' if result.old_mask else 'in'} {os.path.basename(args.output)}): "
            f"melhubert-convert-original needs {'--old-mask' if result.old_mask else '--new-mask'} to read it back the same"
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    config = result.config
    num_params = sum(t.numel() for t in result.state["model"].values())
    stats = f"-> {args.mean_std_out}" if args.mean_std_out else ("not written" if result.mean_std is not None else "unknown")
    print(
        f"exported {args.checkpoint} (update {result.state['Step']}): "
        f"{config['encoder_layers']} x {config['encoder_embed_dim']} {'pre' if config['layer_norm_first'] else 'post'}-LN, "
        f"{config['feat_emb_dim'] // FBANK_NUM_MEL_BINS * 1000 // FBANK_FRAME_RATE_HZ} ms frames, K={config['num_cluster']}, {num_params} parameters, "
        f"optimizer {'exported' if args.with_optimizer else 'left out'}, fbank stats {stats}, "
        f"in {time.perf_counter() - started:.1f} s -> {os.path.abspath(args.output)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
