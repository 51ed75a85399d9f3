"""melhubert-decode on a tiny wav2vec_ctc fine-tuned checkpoint: greedy equals a hand-written greedy decode and
fairseq's ctc criterion; beam search with and without a KenLM n-gram; bad input is one error line."""
from __future__ import annotations

import itertools
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from melhubert_fairseq.checkpoint_loading import load_fairseq_state
from melhubert_fairseq.tools import decode

try:
    import flashlight.lib.text.decoder  # noqa: F401

    NO_FLASHLIGHT = None
except ImportError as err:
    NO_FLASHLIGHT = f"flashlight-text is not installed ({err}): pip install flashlight-text"


def needs_flashlight(test):
    """Skip ``test`` where flashlight-text is absent; marked ``decode``, which .ci/run reruns with the extra."""
    return pytest.mark.decode(pytest.mark.skipif(NO_FLASHLIGHT is not None, reason=NO_FLASHLIGHT or "")(test))


@pytest.fixture(scope="module")
def lively_checkpoint(tiny_finetuned, tmp_path_factory) -> Path:
    """The tiny fine-tuned checkpoint with a random CTC output layer, so that its hypotheses are non-empty letter
    strings (3 updates of fine-tuning leave a model emitting only blanks), with emissions flat enough for a
    lexicon to find words in."""
    state = load_fairseq_state(str(tiny_finetuned.checkpoint))
    generator = torch.Generator().manual_seed(0)
    weight = state["model"]["w2v_encoder.proj.weight"]
    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.03)
    state["model"]["w2v_encoder.proj.bias"].zero_()
    path = tmp_path_factory.mktemp("lively") / "checkpoint_lively.pt"
    torch.save(state, path)
    return path


def run_decode(checkpoint: Path, manifest: Path, out_dir: Path, *flags: str) -> dict:
    """melhubert-decode in this process; returns its decode.json."""
    assert decode.main([str(checkpoint), "--manifest", str(manifest), "--out-dir", str(out_dir), "--no-progress", *flags]) == 0
    return json.loads((out_dir / f"{manifest.stem}.decode.json").read_text())


def hand_greedy(checkpoint: Path, manifest: Path):
    """Independent greedy CTC decode, one utterance at a time: argmax, merge repeats, drop dictionary.bos()."""
    import soundfile

    import melhubert_fairseq

    model, _cfg, task = melhubert_fairseq.load_checkpoint(checkpoint)
    dictionary = task.target_dictionary
    lines = manifest.read_text().splitlines()
    letters, words = [], []
    for row in lines[1:]:
        wav, _rate = soundfile.read(str(Path(lines[0]) / row.split("\t")[0]), dtype="float32")
        with torch.no_grad():
            logits = model(source=torch.from_numpy(wav)[None], padding_mask=None)["encoder_out"][:, 0]
        ids = [k for k, _group in itertools.groupby(logits.argmax(-1).tolist()) if k != dictionary.bos()]
        letters.append(" ".join(dictionary[i] for i in ids))
        words.append(" ".join("".join(dictionary[i] for i in ids).replace("|", " ").split()))
    return letters, words


def criterion_counts(checkpoint: Path, split: str = "valid") -> dict:
    """fairseq's ctc criterion at validation (eval mode) over the fine-tuning data the checkpoint names."""
    import melhubert_fairseq
    from fairseq.criterions.ctc import CtcCriterion, CtcCriterionConfig

    model, cfg, task = melhubert_fairseq.load_checkpoint(checkpoint)
    task.load_dataset(split, task_cfg=cfg.task)
    criterion = CtcCriterion(CtcCriterionConfig(), task)
    iterator = task.get_batch_iterator(task.dataset(split), max_tokens=120000, required_batch_size_multiple=1)
    totals = {"c_errors": 0, "c_total": 0, "w_errors": 0, "w_total": 0}
    with torch.no_grad():
        for sample in iterator.next_epoch_itr(shuffle=False):
            _loss, _size, logging = criterion(model, sample)
            for key in totals:
                totals[key] += logging[key]
    return totals


def test_greedy_equals_a_hand_written_greedy_decode_and_the_ctc_criterion(lively_checkpoint, tiny_finetuned, tmp_path):
    manifest = tiny_finetuned.data / "valid.tsv"
    # small batches: two utterances a batch, padded, longest first
    report = run_decode(lively_checkpoint, manifest, tmp_path / "out", "--max-samples", "130000")
    hyp_letters = (tmp_path / "out" / "valid.hyp.ltr").read_text().splitlines()
    hyp_words = (tmp_path / "out" / "valid.hyp.wrd").read_text().splitlines()
    letters, words = hand_greedy(lively_checkpoint, manifest)
    assert len(hyp_letters) == 6 and all(hyp_words), "the lively model gives non-empty hypotheses"
    assert hyp_letters == letters and hyp_words == words
    assert len(set(hyp_words)) > 1

    counts = criterion_counts(lively_checkpoint)
    assert (report["unit_errors"], report["units"], report["word_errors"], report["words"]) == (
        counts["c_errors"], counts["c_total"], counts["w_errors"], counts["w_total"]
    )
    assert report["references"] == str(tiny_finetuned.data / "valid.ltr") and report["units"] > 100
    assert 0 < report["cer"] and report["cer"] == pytest.approx(100 * counts["c_errors"] / counts["c_total"])


def test_greedy_cer_equals_the_valid_uer_fine_tuning_logged(tiny_finetuned, tmp_path):
    logged = [json.loads(m) for m in re.findall(r"\]\[valid\]\[INFO\] - (\{.*\})", tiny_finetuned.log.read_text())][-1]
    assert int(logged["valid_num_updates"]) == 3  # checkpoint_last.pt holds these weights
    report = run_decode(tiny_finetuned.checkpoint, tiny_finetuned.data / "valid.tsv", tmp_path / "out")
    assert round(report["cer"], 3) == float(logged["valid_uer"])
    assert round(report["wer"], 3) == float(logged["valid_wer"])


def test_words_references_give_the_same_scores_as_letters(lively_checkpoint, tiny_finetuned, tmp_path):
    manifest = tiny_finetuned.data / "valid.tsv"
    from_ltr = run_decode(lively_checkpoint, manifest, tmp_path / "a")
    from_wrd = run_decode(lively_checkpoint, manifest, tmp_path / "b", "--ref", str(tiny_finetuned.data / "valid.wrd"))
    keys = ("unit_errors", "units", "word_errors", "words")
    assert [from_ltr[k] for k in keys] == [from_wrd[k] for k in keys]
    without = run_decode(lively_checkpoint, manifest, tmp_path / "c", "--no-ref")
    assert "cer" not in without and without["references"] is None
    assert (tmp_path / "c" / "valid.hyp.ltr").read_text() == (tmp_path / "a" / "valid.hyp.ltr").read_text()


@needs_flashlight
def test_beam_search_without_lm_finds_the_greedy_path(lively_checkpoint, tiny_finetuned, tmp_path):
    """With max (Viterbi) merging and no LM, the best beam hypothesis is the best path's labels."""
    manifest = tiny_finetuned.data / "valid.tsv"
    greedy = run_decode(lively_checkpoint, manifest, tmp_path / "greedy")
    beam = run_decode(lively_checkpoint, manifest, tmp_path / "beam", "--decoder", "beam", "--beam", "20")
    assert beam["decoder"] == "beam 20"
    assert (tmp_path / "beam" / "valid.hyp.ltr").read_text() == (tmp_path / "greedy" / "valid.hyp.ltr").read_text()
    assert beam["unit_errors"] == greedy["unit_errors"] and beam["word_errors"] == greedy["word_errors"]


def write_arpa(path: Path, sentences) -> set:
    """A bigram ARPA LM with uniform unigrams over the words of ``sentences`` (as text, by hand); its words."""
    words = sorted({w for s in sentences for w in s.split()})
    bigrams = sorted({pair for s in sentences for pair in zip(["<s>", *s.split()], [*s.split(), "</s>"])})
    unigram = math.log10(1.0 / (len(words) + 2))
    lines = ["\\data\\", f"ngram 1={len(words) + 3}", f"ngram 2={len(bigrams)}", "", "\\1-grams:",
             f"{unigram:.4f}\t<unk>\t0", f"-99\t<s>\t-0.5", f"{unigram:.4f}\t</s>\t0"]
    lines += [f"{unigram:.4f}\t{w}\t-0.5" for w in words]
    lines += ["", "\\2-grams:"] + [f"-0.3\t{a} {b}" for a, b in bigrams] + ["", "\\end\\", ""]
    path.write_text("\n".join(lines))
    return set(words)


@needs_flashlight
def test_beam_search_with_an_ngram_lm_emits_only_its_words(lively_checkpoint, tiny_finetuned, tmp_path):
    manifest = tiny_finetuned.data / "valid.tsv"
    references = (tiny_finetuned.data / "valid.wrd").read_text().splitlines()
    vocabulary = write_arpa(tmp_path / "lm.arpa", references)
    report = run_decode(lively_checkpoint, manifest, tmp_path / "lm", "--decoder", "beam", "--beam", "20",
                        "--lm", str(tmp_path / "lm.arpa"), "--lm-weight", "1", "--word-score", "4")
    assert report["decoder"].startswith("beam 20 + lm.arpa")
    hypotheses = (tmp_path / "lm" / "valid.hyp.wrd").read_text().splitlines()
    assert len(hypotheses) == 6 and all(hypotheses)
    assert set(" ".join(hypotheses).split()) <= vocabulary
    run_decode(lively_checkpoint, manifest, tmp_path / "greedy")
    assert not set((tmp_path / "greedy" / "valid.hyp.wrd").read_text().split()) & vocabulary, "the model alone spells no word"

    # an explicit lexicon restricts the words further
    lexicon = tmp_path / "lexicon.txt"
    chosen = sorted(vocabulary)[:5]
    lexicon.write_text("".join(f"{w}\t{' '.join(w)} |\n" for w in chosen))
    run_decode(lively_checkpoint, manifest, tmp_path / "lex", "--decoder", "beam", "--beam", "20",
               "--lm", str(tmp_path / "lm.arpa"), "--lexicon", str(lexicon), "--lm-weight", "1", "--word-score", "4")
    words = (tmp_path / "lex" / "valid.hyp.wrd").read_text().split()
    assert words and set(words) <= set(chosen)


def test_bad_input_is_one_error_line_and_writes_nothing(tiny_checkpoint, tiny_finetuned, tmp_path, monkeypatch, capsys):
    manifest = tiny_finetuned.data / "valid.tsv"
    short_refs = tmp_path / "short.ltr"
    short_refs.write_text("".join((tiny_finetuned.data / "valid.ltr").read_text().splitlines(True)[:5]))
    bad_arpa = tmp_path / "bad.arpa"
    bad_arpa.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0 HI 0\n-1.0 THERE 0\n\n\\end\\\n")  # spaces, not tabs
    cases = [
        ((str(tiny_checkpoint),), rf"error: {re.escape(str(tiny_checkpoint))}: a mel_hubert pretraining checkpoint"),
        ((str(tiny_finetuned.checkpoint), "--ref", str(short_refs)),
         rf"error: {re.escape(str(short_refs))}: 5 reference lines for the 6 utterances of {re.escape(str(manifest))}"),
    ]
    if NO_FLASHLIGHT is None:
        cases.append(((str(tiny_finetuned.checkpoint), "--decoder", "beam", "--lm", str(bad_arpa)),
                      rf"error: {re.escape(str(bad_arpa))}: KenLM cannot load it: "))
    for args, message in cases:
        out = tmp_path / "out"
        # as the console script runs it: no argv, so user errors become the error line and exit 2
        monkeypatch.setattr(sys, "argv", ["melhubert-decode", *args, "--manifest", str(manifest), "--out-dir", str(out)])
        assert decode.main() == 2
        stderr = capsys.readouterr().err
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and re.match(message, lines[0]), stderr
        assert not out.exists()
