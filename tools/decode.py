"""Decode an audio manifest with a CTC fine-tuned checkpoint (fairseq ``wav2vec_ctc`` over ``mel_hubert``).

Input: the fine-tuned checkpoint and a fairseq audio manifest (``{split}.tsv``: root line, then
``path<TAB>num_samples``), e.g. the ``valid.tsv`` fine-tuning used. References are read from ``--ref``, or
found beside the manifest as ``{split}.ltr`` (letters, ``|`` after each word) or else ``{split}.wrd`` (words);
one line per manifest row.

Decoders: ``greedy`` (default; best path, blank = ``dictionary.bos()``: the CER equals what fairseq's ``ctc``
criterion logs as ``uer`` for the same checkpoint and data) and ``beam`` (flashlight-text, ``pip install
flashlight-text``), with ``--lm`` a KenLM n-gram over words (ARPA, or a KenLM binary with ``--lexicon``).
Batches of ``--max-samples`` padded samples run on ``--device`` (CUDA when present); the beam search itself runs
on the CPU.

Output (``--out-dir``): ``{split}.hyp.wrd`` and ``{split}.hyp.ltr`` (one line per manifest row) and
``{split}.decode.json`` (decoder, checkpoint, and with references the error counts, CER and WER), published
together by renames once every utterance is decoded; existing outputs are replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Tuple

from melhubert_fairseq.output_guards import check_writable
from melhubert_fairseq.staged_outputs import StagedOutputs
from melhubert_fairseq.cli import console_main, progress_bar
from melhubert_fairseq.data.manifest import AUDIO, iter_tsv_manifest
from melhubert_fairseq.errors import InputError

#: Reference file extensions looked for beside the manifest, in order.
REFERENCE_EXTENSIONS = (".ltr", ".wrd")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of decode."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="fine-tuned fairseq checkpoint (wav2vec_ctc over mel_hubert)")
    parser.add_argument("--manifest", required=True, help="fairseq audio manifest {split}.tsv to decode")
    parser.add_argument("--out-dir", required=True, help="folder for {split}.hyp.wrd, {split}.hyp.ltr, {split}.decode.json")
    refs = parser.add_mutually_exclusive_group()
    refs.add_argument("--ref", help="references (.ltr letters or .wrd words; default: {split}.ltr or .wrd beside the manifest)")
    refs.add_argument("--no-ref", action="store_true", help="do not look for references (no CER/WER)")
    parser.add_argument("--decoder", choices=["greedy", "beam"], default="greedy", help="greedy best path, or flashlight-text beam search")
    parser.add_argument("--beam", type=int, default=50, help="beam size (beam decoder)")
    parser.add_argument("--beam-threshold", type=float, default=25.0, help="drop hypotheses this far below the best (beam decoder)")
    parser.add_argument("--beam-size-token", type=int, help="tokens tried per frame (default: all; beam decoder)")
    parser.add_argument("--lm", help="KenLM word n-gram (ARPA text, or KenLM binary with --lexicon) for the beam decoder")
    parser.add_argument("--lexicon", help="words the LM decoder may emit with their spellings ('WORD W O R D |' lines; default: the ARPA's 1-grams)")
    parser.add_argument("--lm-weight", type=float, default=2.0, help="LM score weight (beam decoder with --lm)")
    parser.add_argument("--word-score", type=float, default=0.0, help="score added per word (beam decoder with --lm)")
    parser.add_argument("--sil-score", type=float, default=0.0, help="score added per word boundary '|' (beam decoder)")
    parser.add_argument("--device", default="auto", help="torch device for the model: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    parser.add_argument("--max-samples", type=int, default=1_600_000, help="padded audio samples per batch (1.6M = 100 s at 16 kHz)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def find_references(manifest: str) -> Optional[str]:
    """``{split}.ltr`` or else ``{split}.wrd`` beside the manifest, or None."""
    stem = os.path.splitext(manifest)[0]
    for extension in REFERENCE_EXTENSIONS:
        if os.path.isfile(stem + extension):
            return stem + extension
    return None


def read_rows(manifest: str) -> List[Tuple[str, str, int]]:
    """(audio path, ``file:line (utterance)`` for errors, num_samples) of every row of an audio manifest."""
    rows = []
    for root, line_no, rel_path, num_samples in iter_tsv_manifest(manifest, AUDIO):
        utt = os.path.splitext(os.path.basename(rel_path))[0]
        rows.append((os.path.join(root, rel_path), f"{manifest}:{line_no} ({utt})", num_samples))
    if not rows:
        raise InputError(f"{manifest}: no utterances after the root line")
    return rows


def pick_device(name: str) -> str:
    """``auto`` -> cuda when torch sees a GPU, else cpu; anything else as given."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: torch sees no CUDA device here")
    return name


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run decode; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.decoder == "greedy" and (args.lm or args.lexicon):
        parser.error("--lm and --lexicon need --decoder beam")
    if args.max_samples < 1 or args.beam < 1:
        parser.error("--max-samples and --beam must be >= 1")
    from melhubert_fairseq.cli import set_torch_threads

    set_torch_threads(parser, args.threads)
    started = time.perf_counter()
    manifest = args.manifest
    split = os.path.splitext(os.path.basename(manifest))[0]
    out_dir = os.path.abspath(args.out_dir)
    finals = [os.path.join(out_dir, f"{split}.{name}") for name in ("hyp.wrd", "hyp.ltr", "decode.json")]
    for final in finals:
        check_writable(final, args.overwrite)
    rows = read_rows(manifest)
    ref_path = None if args.no_ref else (args.ref or find_references(manifest))

    import torch  # after the cheap checks: --help and flag errors need no torch

    from melhubert_fairseq.ctc_decoding import (
        BeamOptions, BeamSearchDecoder, ErrorCounts, GreedyDecoder, batches_by_size, emissions, load_ctc_model,
    )
    from melhubert_fairseq.data.fbank import load_audio

    device = pick_device(args.device)
    ctc = load_ctc_model(args.checkpoint, device)
    references = None
    if ref_path is not None:
        from melhubert_fairseq.ctc_decoding import read_references

        references = read_references(ref_path, ctc.dictionary, len(rows), manifest)
    if args.decoder == "greedy":
        decoder = GreedyDecoder(ctc.dictionary, ctc.blank)
    else:
        options = BeamOptions(
            beam_size=args.beam, beam_size_token=args.beam_size_token, beam_threshold=args.beam_threshold,
            lm_weight=args.lm_weight, word_score=args.word_score, sil_score=args.sil_score,
        )
        decoder = BeamSearchDecoder(ctc.dictionary, ctc.blank, options, args.lm, args.lexicon)
        if decoder.words_left_out:
            print(f"note: {decoder.words_left_out} words of {args.lm} use letters the model lacks; left out of the lexicon",
                  file=sys.stderr)

    hypotheses = [None] * len(rows)
    frames = 0
    with progress_bar(total=len(rows), desc=f"decode ({decoder.name})", unit="utt", disable=args.no_progress) as bar:
        for batch in batches_by_size([samples for _path, _where, samples in rows], args.max_samples):
            waves = []
            for index in batch:
                path, where, samples = rows[index]
                try:
                    waves.append(torch.from_numpy(load_audio(path, expected_samples=samples)))
                except (InputError, FileNotFoundError) as err:
                    raise InputError(f"{where}: {err}") from None
            lprobs, lengths = emissions(ctc, waves)
            for row, index in enumerate(batch):
                hypotheses[index] = decoder.decode(lprobs[row], int(lengths[row]))
                frames += int(lengths[row])
            bar.update(len(batch))

    counts = None
    if references is not None:
        counts = ErrorCounts()
        for hypothesis, reference in zip(hypotheses, references):
            counts.add(hypothesis, reference)
    seconds = time.perf_counter() - started
    audio_hours = sum(samples for _path, _where, samples in rows) / 16000 / 3600
    report = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "manifest": os.path.abspath(manifest),
        "references": os.path.abspath(ref_path) if ref_path else None,
        "decoder": decoder.name,
        "device": device,
        "utterances": len(rows),
        "audio_hours": round(audio_hours, 6),
        "model_frames": frames,
        "seconds": round(seconds, 3),
    }
    if counts is not None:
        report.update(
            cer=counts.cer, wer=counts.wer, unit_errors=counts.unit_errors, units=counts.units,
            word_errors=counts.word_errors, words=counts.words,
        )
    with StagedOutputs(f"{split}.decode", [out_dir], args.overwrite) as staged:
        for final in finals:
            check_writable(final, args.overwrite)
        with open(staged.path(finals[0]), "w", encoding="utf-8") as handle:
            handle.writelines(" ".join(h.words) + "\n" for h in hypotheses)
        with open(staged.path(finals[1]), "w", encoding="utf-8") as handle:
            handle.writelines(ctc.dictionary.string(h.units) + "\n" for h in hypotheses)
        with open(staged.path(finals[2]), "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=1)
            handle.write("\n")
        staged.publish(finals)

    scores = (
        f": CER {counts.cer:.2f}% ({counts.unit_errors}/{counts.units} letters), "
        f"WER {counts.wer:.2f}% ({counts.word_errors}/{counts.words} words)"
        if counts is not None else " (no references)"
    )
    print(
        f"decoded {len(rows)} utterances ({audio_hours:.3f} h) with {decoder.name} on {device} in {seconds:.1f} s"
        f"{scores} -> {finals[0]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
