"""CTC decoding of fine-tuned checkpoints (fairseq's ``wav2vec_ctc`` over ``mel_hubert``), scored as fairseq scores it.

* Emissions: the checkpoint's model on 16 kHz audio, batched and padded as fairseq's ``audio_finetuning``
  batches are (``source``, ``padding_mask``), normalised to log-probs with ``get_normalized_probs``; an
  utterance's frames are those its padding mask keeps, exactly the lengths fairseq's ``ctc`` criterion uses.
* Greedy: per frame argmax, repeats merged, blanks dropped; the blank is ``dictionary.bos()`` (index 0, fairseq's
  ``ctc`` criterion's ``blank_idx`` for a task without ``blank_symbol``).
* Beam search: flashlight-text's CTC decoders (the library behind torchaudio's ``ctc_decoder``; it installs as one
  binary wheel without torch): without a language model the lexicon-free decoder; with a KenLM n-gram (ARPA or
  KenLM binary) the lexicon decoder, words spelled in the dictionary's letters with ``|`` after each.
* Scores: :class:`ErrorCounts` counts as ``fairseq/criterions/ctc.py`` does at validation: edit distance
  between the hypothesis units and the reference's dictionary ids (CER, fairseq's ``uer``), and between the words
  of both after fairseq's ``letter`` post-processing (WER; with an LM the decoder's own words).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import editdistance
import torch
from fairseq.data.data_utils import post_process

from melhubert_fairseq import load_checkpoint
from melhubert_fairseq.checkpoint_loading import load_fairseq_state
from melhubert_fairseq.errors import InputError, check_regular_file
from melhubert_fairseq.finetuning import letter_targets
from melhubert_fairseq.models.waveform_frontend import collate_waveforms
from melhubert_fairseq.models.mel_hubert import MODEL_NAME

#: fairseq's word boundary symbol in letter dictionaries (the CTC "silence" for flashlight's decoders).
WORD_BOUNDARY = "|"
#: KenLM's unknown word.
UNK_WORD = "<unk>"
#: fairseq's post_process mode for letter targets (the ctc criterion's default).
LETTER_POST_PROCESS = "letter"


# --- the model ------------------------------------------------------------------------------------------


@dataclass
class CtcModel:
    """A fine-tuned CTC model ready to give emissions: the fairseq model (eval mode, on ``device``), its target
    dictionary and whether its task normalised the waveform (``task.normalize``)."""

    model: torch.nn.Module
    dictionary: object  # fairseq.data.Dictionary
    device: torch.device
    normalize: bool
    path: str

    @property
    def blank(self) -> int:
        """The CTC blank: ``dictionary.bos()``, as fairseq's ``ctc`` criterion."""
        return self.dictionary.bos()


def load_ctc_model(path: str, device: str = "cpu") -> CtcModel:
    """Load a ``wav2vec_ctc`` checkpoint; a pretraining (``mel_hubert``) or other checkpoint is refused naming it."""
    state = load_fairseq_state(path, mmap=True)
    cfg = state.get("cfg") or {}
    name = (cfg.get("model") or {}).get("_name") if hasattr(cfg, "get") else None
    if name == MODEL_NAME:
        raise InputError(
            f"{path}: a mel_hubert pretraining checkpoint, which has no CTC output layer: decode a checkpoint "
            "fine-tuned from it with wav2vec_ctc (README: Fine-tuning with fairseq (CTC))"
        )
    if name != "wav2vec_ctc":
        raise InputError(f"{path}: a fairseq {name!r} checkpoint, not a CTC fine-tuned one ('wav2vec_ctc')")
    del state
    model, cfg, task = load_checkpoint(path)
    return CtcModel(model.to(device), task.target_dictionary, torch.device(device), bool(cfg.task.normalize), path)


def batches_by_size(lengths: Sequence[int], max_samples: int) -> List[List[int]]:
    """Indices grouped longest first so that no batch's padded size (longest x count) exceeds ``max_samples``
    (an utterance longer than that is a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    batches: List[List[int]] = []
    for index in order:
        if batches and lengths[batches[-1][0]] * (len(batches[-1]) + 1) <= max_samples:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


@torch.no_grad()
def emissions(ctc_model: CtcModel, waveforms: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """1-D 16 kHz waveforms -> (log-probs (B, T, V) float32 on the CPU, frames per utterance (B,)), computed as
    fairseq's ``ctc`` criterion computes them at validation."""
    waves = [wav.to(ctc_model.device, torch.float32) for wav in waveforms]
    if ctc_model.normalize:  # fairseq's RawAudioDataset.postprocess
        waves = [torch.nn.functional.layer_norm(wav, wav.shape) for wav in waves]
    source, padding_mask = collate_waveforms(waves)
    net_output = ctc_model.model(source=source, padding_mask=padding_mask)
    lprobs = ctc_model.model.get_normalized_probs(net_output, log_probs=True).contiguous()  # (T, B, V)
    if net_output["padding_mask"] is not None:
        lengths = (~net_output["padding_mask"]).long().sum(-1)
    else:
        lengths = lprobs.new_full((lprobs.size(1),), lprobs.size(0), dtype=torch.long)
    return lprobs.transpose(0, 1).float().contiguous().cpu(), lengths.cpu()


# --- decoders --------------------------------------------------------------------------------------------


@dataclass
class Hypothesis:
    """A decoded utterance: dictionary ids (repeats merged, no blanks) and its words."""

    units: List[int]
    words: List[str]


def units_to_words(dictionary, units: Sequence[int]) -> List[str]:
    """Words of a letter-unit sequence as fairseq's ``ctc`` criterion makes them (``letter`` post-processing)."""
    return post_process(dictionary.string(list(units)), LETTER_POST_PROCESS).split()


class GreedyDecoder:
    """Best path: per-frame argmax, repeats merged, blanks dropped (fairseq's ``ctc`` criterion's decoding)."""

    name = "greedy"

    def __init__(self, dictionary, blank: int) -> None:
        self.dictionary = dictionary
        self.blank = blank

    def decode(self, lprobs: torch.Tensor, length: int) -> Hypothesis:
        """``lprobs`` (T, V) of one utterance, of which the first ``length`` frames are real."""
        toks = lprobs[:length].argmax(dim=-1).unique_consecutive()
        units = toks[toks != self.blank].tolist()
        return Hypothesis(units, units_to_words(self.dictionary, units))


@dataclass
class BeamOptions:
    """flashlight-text's decoder options (the names torchaudio's ``ctc_decoder`` uses)."""

    beam_size: int = 50
    beam_size_token: Optional[int] = None  # None: every token
    beam_threshold: float = 25.0
    lm_weight: float = 2.0
    word_score: float = 0.0
    unk_score: float = float("-inf")
    sil_score: float = 0.0


def flashlight_decoder_module():
    """``flashlight.lib.text.decoder``, or an :class:`InputError` saying how to install it."""
    try:  # flashlight-text is an optional extra (melhubert_fairseq[decode]): imported only when beam search is asked for
        import flashlight.lib.text.decoder as decoder
    except ImportError:
        raise InputError(
            "beam search needs flashlight-text (a binary wheel that leaves torch alone): "
            "pip install flashlight-text, or pip install 'melhubert-fairseq[decode]'"
        ) from None
    return decoder


def is_arpa(path: str) -> bool:
    """Whether ``path`` is an ARPA text LM (its first non-empty line is ``\\data\\``)."""
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                return line.strip() == b"\\data\\"
    return False


def arpa_unigrams(path: str) -> List[str]:
    """The words of an ARPA LM's ``\\1-grams:`` section, in file order."""
    words: List[str] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        in_unigrams = False
        for line in handle:
            line = line.strip()
            if line == "\\1-grams:":
                in_unigrams = True
            elif line.startswith("\\"):
                if in_unigrams:
                    break
            elif in_unigrams and line:
                fields = line.split()
                if len(fields) >= 2:
                    words.append(fields[1])
    return words


def read_lexicon(path: str) -> Dict[str, List[List[str]]]:
    """word -> spellings of a lexicon file (``WORD<TAB or space>W O R D |`` per line, fairseq/flashlight format)."""
    check_regular_file(path, what="lexicon")
    lexicon: Dict[str, List[List[str]]] = {}
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise InputError(f"{path}:{line_no} ({fields[0]}): a word without a spelling")
            lexicon.setdefault(fields[0], []).append(fields[1:])
    if not lexicon:
        raise InputError(f"{path}: an empty lexicon")
    return lexicon


def spell_words(words: Sequence[str], dictionary) -> Tuple[Dict[str, List[List[str]]], int]:
    """(lexicon spelling each word in the dictionary's letters + ``|``, number of words left out because a
    letter is not in the dictionary); KenLM's ``<s>``, ``</s>`` and ``<unk>`` are left out."""
    lexicon: Dict[str, List[List[str]]] = {}
    skipped = 0
    for word in words:
        if word in ("<s>", "</s>", UNK_WORD):
            continue
        if all(letter in dictionary.indices for letter in word):
            lexicon[word] = [list(word) + [WORD_BOUNDARY]]
        else:
            skipped += 1
    return lexicon, skipped


@contextlib.contextmanager
def _stderr_captured() -> Iterator[None]:
    """Send file descriptor 2 (KenLM's C++ progress lines) to a temporary file for the block."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class BeamSearchDecoder:
    """flashlight-text's CTC beam search over the model's letters; with ``lm_path`` a KenLM n-gram and a
    lexicon (``lexicon_path``, or the ARPA file's unigrams spelled in letters) constrain it to words."""

    def __init__(
        self,
        dictionary,
        blank: int,
        options: BeamOptions,
        lm_path: Optional[str] = None,
        lexicon_path: Optional[str] = None,
    ) -> None:
        fl = flashlight_decoder_module()
        # The optional flashlight-text extra, as in flashlight_decoder_module (which said how to install it).
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary as FlDictionary

        self.dictionary = dictionary
        self.blank = blank
        if WORD_BOUNDARY not in dictionary.indices:
            raise InputError(f"the model's dictionary has no word boundary {WORD_BOUNDARY!r}: beam search needs letter targets")
        silence = dictionary.index(WORD_BOUNDARY)
        num_tokens = len(dictionary)
        beam_size_token = options.beam_size_token or num_tokens
        self.lexicon: Optional[Dict[str, List[List[str]]]] = None
        self.words_left_out = 0
        if lm_path is None:
            if lexicon_path is not None:
                raise InputError("--lexicon needs --lm: without a language model the beam search is over letters")
            self.name = f"beam {options.beam_size}"
            decoder_options = fl.LexiconFreeDecoderOptions(
                beam_size=options.beam_size, beam_size_token=beam_size_token, beam_threshold=options.beam_threshold,
                lm_weight=0.0, sil_score=options.sil_score, log_add=False, criterion_type=fl.CriterionType.CTC,
            )
            self.decoder = fl.LexiconFreeDecoder(decoder_options, fl.ZeroLM(), silence, blank, [])
            return
        check_regular_file(lm_path, what="language model")
        if lexicon_path is not None:
            self.lexicon = read_lexicon(lexicon_path)
        elif is_arpa(lm_path):
            self.lexicon, self.words_left_out = spell_words(arpa_unigrams(lm_path), dictionary)
            if not self.lexicon:
                raise InputError(f"{lm_path}: no word of its 1-grams can be spelled in the model's letters")
        else:
            raise InputError(f"{lm_path}: not an ARPA file (a KenLM binary?): give its words with --lexicon")
        for word, spellings in self.lexicon.items():
            for spelling in spellings:
                unknown = [token for token in spelling if token not in dictionary.indices]
                if unknown:
                    raise InputError(f"{lexicon_path}: {word!r} is spelled with {unknown[0]!r}, not in the model's dictionary")
        self.word_dict = FlDictionary()
        for word in self.lexicon:
            self.word_dict.add_entry(word)
        if not self.word_dict.contains(UNK_WORD):
            self.word_dict.add_entry(UNK_WORD)
        self.word_dict.set_default_index(self.word_dict.get_index(UNK_WORD))
        try:
            with _stderr_captured():
                lm = KenLM(lm_path, self.word_dict)
        except RuntimeError as err:
            detail = " ".join(str(err).split("\n")[1:]).strip() or str(err).strip()
            raise InputError(f"{lm_path}: KenLM cannot load it: {detail}") from None
        trie = fl.Trie(num_tokens, silence)
        start = lm.start(False)
        for word, spellings in self.lexicon.items():
            word_index = self.word_dict.get_index(word)
            _state, score = lm.score(start, word_index)
            for spelling in spellings:
                trie.insert([dictionary.index(token) for token in spelling], word_index, score)
        trie.smear(fl.SmearingMode.MAX)
        decoder_options = fl.LexiconDecoderOptions(
            beam_size=options.beam_size, beam_size_token=beam_size_token, beam_threshold=options.beam_threshold,
            lm_weight=options.lm_weight, word_score=options.word_score, unk_score=options.unk_score,
            sil_score=options.sil_score, log_add=False, criterion_type=fl.CriterionType.CTC,
        )
        self.lm = lm  # kept alive with the decoder, which refers to it
        self.decoder = fl.LexiconDecoder(
            decoder_options, trie, lm, silence, blank, self.word_dict.get_index(UNK_WORD), [], False
        )
        self.name = f"beam {options.beam_size} + {os.path.basename(lm_path)} (lm_weight {options.lm_weight:g}, word_score {options.word_score:g})"

    def decode(self, lprobs: torch.Tensor, length: int) -> Hypothesis:
        """``lprobs`` (T, V) float32 contiguous CPU log-probs of one utterance, first ``length`` frames real."""
        if lprobs.dtype != torch.float32 or not lprobs.is_contiguous() or lprobs.device.type != "cpu":
            raise ValueError("flashlight decodes float32 contiguous CPU emissions")
        results = self.decoder.decode(lprobs.data_ptr(), int(length), lprobs.size(1))
        if not results:
            return Hypothesis([], [])
        best = results[0]
        # flashlight's path is one token per frame between a silence it starts from and one it ends with
        frame_tokens = list(best.tokens)[1 : 1 + int(length)]
        toks = torch.tensor(frame_tokens, dtype=torch.long).unique_consecutive()
        units = toks[toks != self.blank].tolist()
        if self.lexicon is None:
            words = units_to_words(self.dictionary, units)
        else:
            words = [self.word_dict.get_entry(index) for index in best.words if index >= 0]
        return Hypothesis(units, words)


# --- references and scores -------------------------------------------------------------------------------


@dataclass
class Reference:
    """One reference transcript as dictionary ids (fairseq's ``LabelEncoder``) and words."""

    units: List[int]
    words: List[str]


def read_references(path: str, dictionary, num_rows: int, manifest: str) -> List[Reference]:
    """References of every manifest row from a ``.ltr`` (letters, ``|`` after each word) or ``.wrd`` (words)
    file, one line per row; a different number of lines is an :class:`InputError`."""
    check_regular_file(path, what="references")
    with open(path, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if len(lines) != num_rows:
        raise InputError(
            f"{path}: {len(lines)} reference lines for the {num_rows} utterances of {manifest} "
            "(one line per manifest row, in its order)"
        )
    words_file = path.endswith(".wrd")
    references = []
    for line in lines:
        ltr = letter_targets(line.strip()) if words_file else line.strip()
        # fairseq's audio_finetuning LabelEncoder: encode_line(append_eos=False, add_if_not_exist=False)
        targ = dictionary.encode_line(ltr, append_eos=False, add_if_not_exist=False).long()
        keep = (targ != dictionary.pad()) & (targ != dictionary.eos())
        targ = targ[keep]
        references.append(Reference(targ.tolist(), units_to_words(dictionary, targ.tolist())))
    return references


@dataclass
class ErrorCounts:
    """Edit-distance counts summed over utterances, as fairseq's ``ctc`` criterion logs them."""

    unit_errors: int = 0
    units: int = 0
    word_errors: int = 0
    words: int = 0

    def add(self, hypothesis: Hypothesis, reference: Reference) -> None:
        """Count one utterance."""
        self.unit_errors += editdistance.eval(hypothesis.units, reference.units)
        self.units += len(reference.units)
        self.word_errors += editdistance.eval(hypothesis.words, reference.words)
        self.words += len(reference.words)

    @property
    def cer(self) -> float:
        """Unit (letter) error rate in percent: fairseq's ``uer``."""
        return 100.0 * self.unit_errors / self.units if self.units else float("nan")

    @property
    def wer(self) -> float:
        """Word error rate in percent: fairseq's ``wer``."""
        return 100.0 * self.word_errors / self.words if self.words else float("nan")
