"""Convert a checkpoint of the original Mel-HuBERT release (``.ckpt``) into a fairseq ``mel_hubert`` checkpoint.

The result loads with ``fairseq.checkpoint_utils.load_model_ensemble_and_task``
(after ``melhubert_fairseq.register_with_fairseq()``), gives the same hidden states as the
original model, and can initialise training
(``checkpoint.finetune_from_model=converted.pt``).

The original file is read with ``torch.load(weights_only=True)`` and an
allow-list of one class (``argparse.Namespace``, the saved ``Args``): a file
holding any other pickled object is refused without running it.

``--mean-std`` stores the corpus statistics the model was trained with (the
release ships ``libri-360-mean-std.npy`` etc.) so the checkpoint can turn
audio into model input by itself. ``attention_type: causal`` converts as the
original release's causal model (attention masked to the past, centred
positional conv); ``--later-repo`` converts a file trained by the later
nervjack2/MelHuBERT repository, whose causal setting masks nothing, as
bidirectional. ``--old-mask`` (automatic for file names
containing ``oldmask``) selects the original's old batch-dependent masking
(``model.require_same_masks=true``) for further training.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional


from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs
from melhubert_fairseq.data.features import load_mean_std
from melhubert_fairseq.cli import console_main, progress_bar


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of convert_original_checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="original Mel-HuBERT .ckpt file")
    parser.add_argument("output", help="fairseq checkpoint to write (e.g. melhubert_20ms_stage1.pt)")
    parser.add_argument("--mean-std", help="mean-std.npy (2 x 40) of the corpus the model was trained on")
    mask = parser.add_mutually_exclusive_group()
    mask.add_argument(
        "--old-mask", dest="old_mask", action="store_true", default=None,
        help="old batch-dependent masking (require_same_masks=true); default: on iff the file name contains 'oldmask'",
    )
    mask.add_argument("--new-mask", dest="old_mask", action="store_false", help="per-utterance masking even for *oldmask* files")
    parser.add_argument(
        "--with-optimizer", action="store_true",
        help="also convert the Adam state, to continue training with it (checkpoint.restore_file=OUTPUT without reset_optimizer)",
    )
    parser.add_argument(
        "--ignore-config-key", action="append", default=[], metavar="KEY",
        help="accept this unknown model-config key (repeatable); unknown keys are an error otherwise",
    )
    parser.add_argument(
        "--later-repo", action="store_true",
        help="the file was trained by nervjack2/MelHuBERT (Upstream_Config['melhubert']), whose attention_type: causal "
        "masks nothing: convert a causal file as bidirectional; default: as the original release's causal model "
        "(masked attention, centred positional conv)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run the conversion; return the exit status."""
    args = build_parser().parse_args(argv)
    # torch and the plugin's checkpoint code after parsing: --help needs neither.
    from melhubert_fairseq.checkpoint_saving import atomic_torch_save
    from melhubert_fairseq.original.convert import convert_original_checkpoint, describe_attention, training_overrides

    started = time.perf_counter()
    refuse_replacing_inputs([args.output], [args.checkpoint, args.mean_std])
    check_writable(args.output, args.overwrite)
    mean_std = load_mean_std(args.mean_std) if args.mean_std else None
    with progress_bar(total=2, desc="convert", unit="step") as progress:
        result = convert_original_checkpoint(
            args.checkpoint,
            mean_std=mean_std,
            old_mask=args.old_mask,
            with_optimizer=args.with_optimizer,
            ignore_config_keys=args.ignore_config_key,
            later_repo=args.later_repo,
        )
        progress.update(1)
        atomic_torch_save(result.state, args.output, overwrite=args.overwrite)
        progress.update(1)
    for note in result.config.notes:
        print(f"note: {note}", file=sys.stderr)
    model, task = result.config.model, result.config.task
    num_params = sum(t.numel() for name, t in result.state["model"].items() if name != "fbank_mean_std")
    print(
        f"converted {args.checkpoint} (Upstream_Config[{result.source.config_section!r}], step {result.source.step}): "
        f"{model['encoder_layers']} x {model['encoder_embed_dim']} "
        f"{'pre' if model['layer_norm_first'] else 'post'}-LN, {10 * task['stack_frames']} ms frames, "
        f"{describe_attention(model)}, "
        f"K={task['num_classes']}, {num_params} parameters, "
        f"require_same_masks={model['require_same_masks']}, "
        f"fbank stats {'from ' + args.mean_std if mean_std else 'unknown'}, "
        f"optimizer {'converted' if args.with_optimizer else 'dropped'}, "
        f"in {time.perf_counter() - started:.1f} s -> {os.path.abspath(args.output)}"
    )
    print(f"train from it with these overrides: {' '.join(training_overrides(result.config))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
