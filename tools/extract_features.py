"""Write hidden states of a ``mel_hubert`` checkpoint for every utterance of a manifest or an audio folder.

Inputs (one of):

* ``--manifest {split}.tsv``: fbank features exactly as training read them
  (normalised on disk, or normalised here when the model was trained with
  ``task.mean_std_path``);
* ``--audio-dir DIR`` (every .wav/.flac below it) or ``--audio-manifest``
  (fairseq audio manifest): 16 kHz audio, turned into 40-dim Kaldi fbank by
  the model's torch front end (on ``--device``) and normalised with the corpus
  mean/std stored in the checkpoint (an error if the checkpoint does not record them).

Output: one float32 ``.npy`` per utterance per layer,
``{out-dir}/layer{L}/{relative path}.npy`` of shape (model frames, C), where
the relative path mirrors the input (manifest path, or audio path with
``.npy``). Layer L >= 1 is transformer layer L's output, layer 0 the input of
the first layer (``--layers 0,1,8,12``; ``all`` = 1..L, ``0,all`` = every
state). Frame stacking (10/20/40 ms) comes from the checkpoint.
Everything is written to a staging folder and moved into place only after
every utterance succeeded (melhubert_fairseq.atomic_output.StagedOutputs);
with ``--overwrite`` the old files are moved aside first, and a killed run is
cleaned up (or rolled back) by the next one. Manifest rows that are absolute
or leave their root (``..``), inputs inside the layer folders being written,
and outputs that would land on an input are refused before any work.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Tuple

import numpy as np

from melhubert_fairseq.disk_full import save_npy
from melhubert_fairseq.output_guards import check_writable, refuse_replacing_inputs, safe_relative_path
from melhubert_fairseq.staged_outputs import StagedOutputs
from melhubert_fairseq.data.fbank import load_audio, num_fbank_frames
from melhubert_fairseq.data.features import FBANK_FRAME_RATE_HZ, read_feature_file
from melhubert_fairseq.data.manifest import read_manifest
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.data.audio_manifest import list_audio_dir, read_audio_manifest
from melhubert_fairseq.cli import console_main, with_progress

if TYPE_CHECKING:
    from melhubert_fairseq.feature_reader import MelHubertFeatureReader


#: What to do with an audio manifest given as --manifest.
AUDIO_MANIFEST_ADVICE = "pass it as --audio-manifest (the model computes the fbank itself) or run melhubert-wav-to-fbank first"


@dataclass(frozen=True)
class Utterance:
    """One input: where its output goes, how to name it in errors, and how to compute its model input."""

    output_path: str  # relative, ends in .npy
    where: str
    input_path: str
    make_input: Callable[[], Tuple[np.ndarray, int]]  # -> (model input, 10 ms fbank frames)


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of extract_features."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="fairseq mel_hubert checkpoint (trained, averaged or converted)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="{split}.tsv of fbank .npy features, as used for training")
    source.add_argument("--audio-dir", help="folder of 16 kHz .wav/.flac files (searched recursively)")
    source.add_argument("--audio-manifest", help="fairseq audio manifest (root line, then path<TAB>num_samples)")
    parser.add_argument("--out-dir", required=True, help="output folder: layer{L}/<relative path>.npy")
    parser.add_argument("--layers", default="all", help="layers to write: 'all' (1..L), e.g. '1,8,12', 0 = input of layer 1, '0,all'")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="dtype of the written arrays")
    parser.add_argument("--device", default="cpu", help="torch device for the model forward")
    parser.add_argument("--max-batch-frames", type=int, default=20000, help="padded model frames per forward batch")
    parser.add_argument("--resample", action="store_true", help="resample audio that is not 16 kHz (default: error)")
    parser.add_argument("--downmix", action="store_true", help="average the channels of multi-channel audio (default: error)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace existing feature files")
    return parser


def manifest_utterances(reader: MelHubertFeatureReader, manifest_path: str) -> List[Utterance]:
    """One Utterance per manifest row; its features are checked (dtype, shape, frames, finite) when read."""
    manifest = read_manifest(manifest_path, audio_manifest_advice=AUDIO_MANIFEST_ADVICE)

    def loader(row: int) -> Callable[[], Tuple[np.ndarray, int]]:
        def load() -> Tuple[np.ndarray, int]:
            fbank = read_feature_file(
                manifest.full_path(row), manifest.describe(row), reader.feat_dim, int(manifest.num_frames[row])
            )
            return reader.prepare(fbank), len(fbank)

        return load

    utterances = []
    for row in range(len(manifest)):
        where = manifest.describe(row)
        # The output mirrors the row's path below --out-dir/layer{L}: it must stay there.
        rel = safe_relative_path(manifest.relative_path(row), where)
        utterances.append(Utterance(os.path.splitext(rel)[0] + ".npy", where, manifest.full_path(row), loader(row)))
    return utterances


def audio_utterances(reader: MelHubertFeatureReader, args: argparse.Namespace) -> List[Utterance]:
    """One Utterance per audio file; fails at once if the checkpoint cannot normalise raw audio."""
    reader.require_corpus_stats()
    if args.audio_manifest:
        items = read_audio_manifest(args.audio_manifest, feature_manifest_advice="pass it as --manifest")
    else:
        items = list_audio_dir(args.audio_dir)

    def loader(item) -> Callable[[], Tuple[np.ndarray, int]]:
        def load() -> Tuple[np.ndarray, int]:
            try:
                waveform = load_audio(
                    item.full_path, resample=args.resample, downmix=args.downmix, expected_samples=item.expected_samples
                )
                waveform = reader.prepare_waveform(waveform)
            except (OSError, ValueError) as err:
                raise InputError(f"{item.where}: {err}") from None
            return waveform, num_fbank_frames(len(waveform))  # the model computes the fbank

        return load

    return [Utterance(item.feature_path, item.where, item.full_path, loader(item)) for item in items]


def check_outputs(
    utterances: List[Utterance], out_dir: str, layers: List[int], overwrite: bool, input_files: List[str]
) -> None:
    """Fail before any work if two inputs share an output, an input lies in a layer folder being
    written, an output would be an input (an utterance's or one of ``input_files``: also with
    --overwrite), or outputs exist (without --overwrite)."""
    seen = {}
    for utt in utterances:
        other = seen.setdefault(utt.output_path, utt)
        if other is not utt:
            raise InputError(f"{other.where} and {utt.where} would both be written to {utt.output_path}")
    layer_dirs = [os.path.realpath(os.path.join(out_dir, f"layer{layer}")) for layer in layers]
    for utt in utterances:
        real_input = os.path.realpath(utt.input_path)
        for layer_dir in layer_dirs:
            if os.path.commonpath([layer_dir, real_input]) == layer_dir:
                raise InputError(
                    f"{utt.where}: the input {utt.input_path} lies in {layer_dir}, a folder this run writes to; "
                    "choose another --out-dir"
                )
    finals = [os.path.join(out_dir, f"layer{layer}", utt.output_path) for layer in layers for utt in utterances]
    refuse_replacing_inputs(finals, itertools.chain(input_files, (utt.input_path for utt in utterances)))
    for final in finals:
        check_writable(final, overwrite)


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run extract_features; return the exit status."""
    args = build_parser().parse_args(argv)
    from melhubert_fairseq.feature_reader import MelHubertFeatureReader, parse_layers  # torch, fairseq: after parsing

    started = time.perf_counter()
    reader = MelHubertFeatureReader(args.checkpoint, device=args.device, max_batch_frames=args.max_batch_frames)
    layers = parse_layers(args.layers, reader.num_layers)
    utterances = manifest_utterances(reader, args.manifest) if args.manifest else audio_utterances(reader, args)
    out_dir = os.path.abspath(args.out_dir)
    skipped: List[str] = []
    written: List[Tuple[str, int]] = []
    fbank_frames = 0

    def model_inputs() -> Iterator[Tuple[int, np.ndarray]]:
        nonlocal fbank_frames
        for index, utt in enumerate(utterances):
            model_input, num_fbank = utt.make_input()  # input errors name the utterance
            fbank_frames += num_fbank
            if num_fbank == 0:
                skipped.append(utt.where)
                print(f"skipped {utt.where}: shorter than one 25 ms fbank window", file=sys.stderr)
                continue
            yield index, model_input

    with StagedOutputs("extract_features", [out_dir], args.overwrite) as staged:
        # After the recovery on entry: files a killed run published are gone again.
        manifest = args.manifest or args.audio_manifest
        check_outputs(utterances, out_dir, layers, args.overwrite, [args.checkpoint] + ([manifest] if manifest else []))
        for index, states in with_progress(
            reader.iter_batched(model_inputs(), layers), total=len(utterances),
            desc="extract", unit="utt", disable=args.no_progress,
        ):
            for layer, state in zip(layers, states):
                path = staged.path(os.path.join(out_dir, f"layer{layer}", utterances[index].output_path))
                save_npy(path, state.astype(args.dtype, copy=False))
            written.append((utterances[index].output_path, len(states[0])))
        if written:
            staged.publish([os.path.join(out_dir, f"layer{layer}", rel) for layer in layers for rel, _ in written])

    model_frames = sum(frames for _, frames in written)
    seconds = time.perf_counter() - started
    print(
        f"extracted {len(written)} utterances ({len(skipped)} skipped), "
        f"{fbank_frames / FBANK_FRAME_RATE_HZ / 3600:.3f} hours, {fbank_frames} fbank frames "
        f"({model_frames} model frames at {reader.frame_rate_hz:g} Hz), layers {','.join(map(str, layers))}, "
        f"{seconds:.1f} s -> {out_dir}/layer{{L}}/"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
