"""Synthesise the bundled demo corpus: real English speech from espeak-ng, 16 kHz mono FLAC.

Each of 120 fixed sentences is spoken once, by one of 12 synthetic speakers
(an espeak-ng accent plus a voice variant, a pitch and a loudness), at a speaking rate
drawn per utterance. All choices come from a seeded random generator, and
espeak-ng is deterministic, so the same espeak-ng version regenerates the same
audio. espeak-ng writes 22050 Hz audio; it is resampled to 16 kHz with the
same polyphase resampler ``load_audio(resample=True)`` uses, given a faint
seeded noise floor (about -84 dBFS, so pauses are not digital zeros), and
stored as 16-bit FLAC.

Outputs, under ``--out-dir`` (default ``demo/corpus``):

* ``<speaker>/<utt_id>.flac``
* ``train.tsv`` / ``valid.tsv``: fairseq audio manifests (root line ``.``,
  meaning the manifest's own directory, then ``relative/path.flac<TAB>num_samples``);
  every 10th utterance goes to valid.
* ``transcripts.tsv``: ``utt_id, voice, speed_wpm, pitch, amplitude, num_samples, text``
  with a header line.
* ``train.phn`` / ``valid.phn``: the phones espeak-ng spoke, one line of space-separated
  phones per manifest row (``espeak-ng -x`` with the utterance's voice, stress marks and
  pauses removed), for ``melhubert-probe pr``;
* ``train.spk`` / ``valid.spk``: the speaker of each manifest row (``spk01`` ...), for
  ``melhubert-probe sid``.

``--labels-only`` writes the ``.phn`` and ``.spk`` files of an existing corpus from its
``transcripts.tsv`` and manifests, without touching the audio.

Needs the ``espeak-ng`` program (Debian/Ubuntu: ``apt-get install espeak-ng``).
"""
from __future__ import annotations

import sys
import argparse
import io
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import soundfile

from melhubert_fairseq.data.audio_manifest import read_audio_manifest, write_audio_manifest
from melhubert_fairseq.data.fbank import num_fbank_frames, resample_audio
from melhubert_fairseq.data.features import FBANK_SAMPLE_RATE
from melhubert_fairseq.atomic_output import atomic_output
from melhubert_fairseq.disk_full import writing
from melhubert_fairseq.staged_outputs import StagedOutputs
from melhubert_fairseq.cli import console_main, with_progress
from melhubert_fairseq.errors import InputError

SENTENCES = [
    "The morning train to the coast was delayed by almost an hour.",
    "She painted the old fence a bright shade of green last summer.",
    "Please remember to water the tomatoes before you leave for work.",
    "A sudden gust of wind scattered the papers across the parking lot.",
    "The library closes early on Sundays and stays shut on public holidays.",
    "He poured the coffee slowly and watched the steam rise from the cup.",
    "Our neighbours adopted a small grey cat with one white paw.",
    "The committee will announce its decision at the end of the month.",
    "Thunder rolled over the hills while the children counted the seconds.",
    "Fresh bread from the corner bakery sells out before nine o'clock.",
    "Every spring the river floods the low fields near the old mill.",
    "The pilot calmly explained that we would land in twenty minutes.",
    "My grandmother kept her recipes in a tin box on the kitchen shelf.",
    "The museum has reopened its gallery of ancient maps and globes.",
    "Turn left at the second traffic light and park behind the bank.",
    "The soup tasted better on the second day than it did on the first.",
    "A flock of geese flew south in a perfect line above the lake.",
    "The mechanic said the brakes would need replacing before winter.",
    "We found a quiet table by the window and ordered two pots of tea.",
    "The orchestra tuned their instruments as the audience took their seats.",
    "Small boats rocked gently in the harbour as the tide came in.",
    "The new software update fixed the problem with the printer.",
    "He whistled a cheerful tune while sweeping the leaves from the path.",
    "The students gathered in the hall to hear the results of the contest.",
    "A thin layer of frost covered the windscreen of every car in the street.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "They hiked for six hours before reaching the cabin at the summit.",
    "The old clock in the tower has not told the right time for years.",
    "Please speak a little louder, the back of the room cannot hear you.",
    "The farmer loaded the cart with potatoes, onions and sacks of grain.",
    "Bright lanterns hung from the trees along the edge of the square.",
    "The detective studied the muddy footprints near the garden gate.",
    "Most of the shops in the village close at half past five.",
    "The baby finally fell asleep after a long walk in the pram.",
    "A loud crash from the kitchen told us the shelf had given way.",
    "The lecture on volcanoes was the most popular talk of the week.",
    "She carefully folded the letter and slipped it into her coat pocket.",
    "The bus driver waited patiently while the old man found his ticket.",
    "Heavy rain is expected across the north of the country tonight.",
    "We planted a row of sunflowers along the back wall of the garden.",
    "The price of petrol has risen sharply over the last three months.",
    "His brother teaches chemistry at a school on the other side of town.",
    "The sailors pulled hard on the ropes as the storm grew stronger.",
    "Nobody noticed that the front door had been left wide open.",
    "The band played until midnight and the crowd asked for one more song.",
    "A red kite circled slowly over the field looking for mice.",
    "Please check that all the windows are locked before we go out.",
    "The architect showed us a model of the new railway station.",
    "The children built a sandcastle with towers, walls and a deep moat.",
    "It took the team three attempts to lift the piano up the stairs.",
    "The doctor advised him to rest his ankle for at least a week.",
    "Lemon juice and honey in warm water can soothe a sore throat.",
    "The ferry to the island leaves every two hours from the north pier.",
    "We could hear the distant sound of church bells across the valley.",
    "The carpenter measured the doorway twice before cutting the wood.",
    "Her favourite book is a long novel about a family of whalers.",
    "The gardeners trimmed the hedges into the shapes of birds and animals.",
    "An old map of the city hangs above the fireplace in the study.",
    "The runners stretched their legs while waiting for the starting gun.",
    "A cold draught blew under the door and chilled the whole room.",
    "The engineers tested the bridge with a convoy of heavy lorries.",
    "Six kinds of cheese were laid out on a wooden board for the guests.",
    "The power cut lasted for most of the evening, so we lit candles.",
    "Ask the waiter whether the fish was caught this morning.",
    "The path through the forest was covered with a carpet of pine needles.",
    "My cousin plays the violin in a string quartet on Friday nights.",
    "The puppy chewed through the laces of both of my new shoes.",
    "A long queue of cars stretched back from the border crossing.",
    "The scientist recorded the temperature of the pond every hour.",
    "We watched the fireworks from the roof of the tallest building in town.",
    "The kettle whistled just as the telephone began to ring.",
    "Three small islands lie just off the rocky southern coast.",
    "The teacher wrote the date in neat letters at the top of the board.",
    "Autumn leaves drifted down and settled on the surface of the pond.",
    "The hotel offers free breakfast to guests who book in advance.",
    "He repaired the broken chair with glue, nails and a lot of patience.",
    "A narrow staircase leads up to a tiny room under the roof.",
    "The market sells fruit, flowers, fish and second hand books.",
    "Our flight was cancelled, so we spent the night at the airport.",
    "The wind turned the sails of the windmill faster and faster.",
    "The nurse took his temperature and wrote the number on a chart.",
    "A bowl of ripe plums sat on the table next to the open window.",
    "The choir practised the same difficult passage again and again.",
    "Bring a warm jumper, because the evenings by the sea can be cold.",
    "The town council voted to build a new swimming pool next year.",
    "Every drawer in the desk was full of pencils, stamps and string.",
    "The hikers crossed the stream by jumping from stone to stone.",
    "A golden retriever waited patiently outside the butcher's shop.",
    "The film was so long that half the audience fell asleep.",
    "She typed the final chapter of her thesis late on a Tuesday night.",
    "The goalkeeper dived to the left and saved the penalty.",
    "Clear water bubbled up from a spring at the foot of the hill.",
    "The postman delivers the letters shortly after eleven each morning.",
    "We packed sandwiches, apples and a flask of soup for the journey.",
    "The castle walls are more than four metres thick in places.",
    "A strange light appeared in the sky just after sunset.",
    "The tailor shortened the sleeves of the jacket by two centimetres.",
    "Children in the village learn to swim in the lake each summer.",
    "The reporter asked the minister three questions about the budget.",
    "Dark clouds gathered over the mountains as we reached the pass.",
    "The shop assistant wrapped the vase in several layers of paper.",
    "The river is wide and slow where it meets the sea.",
    "My uncle grows enormous pumpkins for the autumn fair.",
    "Seven wooden steps lead down from the porch to the lawn.",
    "The chef sharpened his knives before the dinner service began.",
    "A pair of swans nest every year among the reeds by the bridge.",
    "The exam starts at nine, so please arrive a few minutes early.",
    "The photographer asked everyone to move closer together and smile.",
    "We followed the signs to the beach but ended up at a farm.",
    "The heavy door creaked loudly as it swung open in the wind.",
    "Half of the orange trees were damaged by the late frost.",
    "He counted the coins twice and found that one was missing.",
    "The meeting was moved to Thursday because the manager was ill.",
    "A row of tall poplars shelters the house from the northern wind.",
    "The museum guide spoke quickly about the history of the abbey.",
    "Our team won the quiz by answering the very last question correctly.",
    "Snow fell all night and by morning the roads were impassable.",
    "The potter shaped a tall jug on the wheel in less than a minute.",
    "Could you pass me the salt and the pepper, please?",
    "The last bus home leaves the station at a quarter to midnight.",
]

#: espeak-ng accents and voice variants the speakers are drawn from.
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbcwmd"]
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5"]
#: Std of the Gaussian noise floor added to every utterance (2 LSB of 16-bit audio, about -84 dBFS):
#: espeak-ng's pauses are digital zeros, which no microphone records and which
#: would pile up at Kaldi's log floor (-15.9) as an outlier mode in every mel bin.
NOISE_FLOOR_STD = 2.0 / 32768
#: Fraction of utterances held out as the validation split (every N-th one).
VALID_EVERY = 10


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: espeak-ng accent + variant at a fixed pitch and loudness."""

    name: str
    voice: str
    pitch: int
    amplitude: int


@dataclass(frozen=True)
class Utterance:
    """One sentence assigned to a speaker at a speaking rate."""

    utt_id: str
    speaker: Speaker
    speed_wpm: int
    text: str

    @property
    def relative_path(self) -> str:
        """Path of the FLAC file relative to the corpus directory."""
        return f"{self.speaker.name}/{self.utt_id}.flac"


def plan_corpus(num_speakers: int, seed: int) -> List[Utterance]:
    """Deterministically assign every sentence to a speaker and a speaking rate."""
    rng = random.Random(seed)
    combos = [(accent, variant) for accent in ACCENTS for variant in VARIANTS]
    if num_speakers > len(combos):
        raise InputError(f"at most {len(combos)} speakers are available, asked for {num_speakers}")
    chosen = rng.sample(combos, num_speakers)
    speakers = [
        Speaker(
            name=f"spk{i:02d}_{accent}_{variant}",
            voice=f"{accent}+{variant}",
            pitch=rng.randint(30, 70),
            # espeak-ng's default (100) peaks near full scale; read speech corpora are quieter.
            amplitude=rng.randint(30, 60),
        )
        for i, (accent, variant) in enumerate(chosen, start=1)
    ]
    order = list(range(len(SENTENCES)))
    rng.shuffle(order)
    utterances = []
    for position, sentence_index in enumerate(order):
        speaker = speakers[position % num_speakers]
        utterances.append(
            Utterance(
                utt_id=f"{speaker.name.split('_')[0]}-{sentence_index:03d}",
                speaker=speaker,
                speed_wpm=rng.randint(150, 195),
                text=SENTENCES[sentence_index],
            )
        )
    return utterances


def synthesize(utt: Utterance, espeak: str, noise_rng: np.random.Generator) -> np.ndarray:
    """Run espeak-ng for one utterance; return 16 kHz float32 mono audio with a faint noise floor."""
    speaker = utt.speaker
    command = [espeak, "-v", speaker.voice, "-s", str(utt.speed_wpm), "-p", str(speaker.pitch),
               "-a", str(speaker.amplitude), "--stdout", utt.text]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(
            f"{utt.utt_id}: espeak-ng failed (exit {result.returncode}): {result.stderr.decode(errors='replace').strip()}"
        )
    audio, sample_rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32")
    if audio.ndim != 1:
        raise RuntimeError(f"{utt.utt_id}: espeak-ng produced {audio.shape[1]} channels, expected 1")
    resampled = resample_audio(audio, sample_rate, FBANK_SAMPLE_RATE)
    resampled = resampled + noise_rng.normal(0.0, NOISE_FLOOR_STD, len(resampled)).astype(np.float32)
    # Resampling and noise can overshoot full scale by a hair; 16-bit FLAC cannot hold that.
    return np.clip(resampled, -1.0, 32767 / 32768)


def espeak_phones(voice: str, text: str, espeak: str) -> List[str]:
    """The phones espeak-ng speaks for ``text`` in ``voice``: its ``-x`` mnemonics one by one, without stress
    marks (``'`` and ``,``) and pauses (``_:``, ``_!``), across the clause lines it prints."""
    command = [espeak, "-x", "-q", "--sep= ", "-v", voice, text]
    result = subprocess.run(command, capture_output=True, check=False, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{voice} {text!r}: espeak-ng -x failed (exit {result.returncode}): {result.stderr.strip()}")
    phones = [token.replace("'", "").replace(",", "") for token in result.stdout.split()]
    return [phone for phone in phones if phone and not phone.startswith("_")]


def speaker_of(utt_id: str) -> str:
    """The speaker label of a demo utterance: its id's prefix (``spk03-013`` -> ``spk03``)."""
    return utt_id.split("-")[0]


def write_probe_labels(out_dir: str, espeak: str) -> int:
    """``{split}.phn`` and ``{split}.spk`` for every manifest of the corpus in ``out_dir``, row by row, from
    its ``transcripts.tsv``; return the number of utterances labelled."""
    transcripts = {}
    with open(os.path.join(out_dir, "transcripts.tsv"), encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            utt_id, voice, *_, text = line.rstrip("\n").split("\t")
            transcripts[utt_id] = (voice, text)
    count = 0
    for split in ("train", "valid"):
        items = read_audio_manifest(os.path.join(out_dir, f"{split}.tsv"))
        utt_ids = [os.path.splitext(os.path.basename(item.relative_path))[0] for item in items]
        phones = [" ".join(espeak_phones(*transcripts[utt_id], espeak)) for utt_id in utt_ids]
        with atomic_output(os.path.join(out_dir, f"{split}.phn"), overwrite=True) as handle:
            handle.write("".join(line + "\n" for line in phones))
        with atomic_output(os.path.join(out_dir, f"{split}.spk"), overwrite=True) as handle:
            handle.write("".join(speaker_of(utt_id) + "\n" for utt_id in utt_ids))
        count += len(utt_ids)
    return count


def build_corpus(out_dir: str, num_speakers: int, seed: int, espeak: str) -> tuple:
    """Synthesise every utterance into ``out_dir``; return (utterances, total samples, total frames)."""
    utterances = plan_corpus(num_speakers, seed)
    split_rows = {"train": [], "valid": []}
    transcript_lines = ["utt_id\tvoice\tspeed_wpm\tpitch\tamplitude\tnum_samples\ttext"]
    total_samples = total_frames = 0
    noise_rng = np.random.default_rng(seed)
    for position, utt in enumerate(with_progress(utterances, desc="synthesising", unit="utt")):
        audio = synthesize(utt, espeak, noise_rng)
        path = os.path.join(out_dir, utt.relative_path)
        with writing(path) as handle:  # a full disk is one error line naming the file
            soundfile.write(handle, audio, FBANK_SAMPLE_RATE, format="FLAC", subtype="PCM_16", compression_level=1.0)
        split = "valid" if position % VALID_EVERY == VALID_EVERY - 1 else "train"
        split_rows[split].append((utt.relative_path, len(audio)))
        transcript_lines.append(
            f"{utt.utt_id}\t{utt.speaker.voice}\t{utt.speed_wpm}\t{utt.speaker.pitch}\t"
            f"{utt.speaker.amplitude}\t{len(audio)}\t{utt.text}"
        )
        total_samples += len(audio)
        total_frames += num_fbank_frames(len(audio))
    for split, rows in split_rows.items():
        write_audio_manifest(os.path.join(out_dir, f"{split}.tsv"), ".", sorted(rows))  # root: the corpus folder
    with writing(os.path.join(out_dir, "transcripts.tsv"), "w") as handle:
        handle.write("\n".join(transcript_lines) + "\n")
    write_probe_labels(out_dir, espeak)
    return utterances, total_samples, total_frames


@console_main
def main(argv: Optional[List[str]] = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="demo/corpus", help="corpus directory to create (default: demo/corpus)")
    parser.add_argument("--num-speakers", type=int, default=12, help="number of synthetic speakers (default: 12)")
    parser.add_argument("--seed", type=int, default=1234, help="seed for speaker, pitch and rate choices (default: 1234)")
    parser.add_argument("--espeak", default="espeak-ng", help="espeak-ng executable (default: espeak-ng on PATH)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing corpus directory")
    parser.add_argument(
        "--labels-only", action="store_true",
        help="only (re)write the .phn and .spk files of the existing corpus in --out-dir from its transcripts.tsv",
    )
    args = parser.parse_args(argv)

    out_dir = os.path.abspath(args.out_dir)
    if args.labels_only:
        if not os.path.isfile(os.path.join(out_dir, "transcripts.tsv")):
            raise InputError(f"{out_dir}: no transcripts.tsv; --labels-only labels an existing demo corpus")
        if shutil.which(args.espeak) is None:
            raise InputError(f"{args.espeak} not found; install espeak-ng (e.g. apt-get install espeak-ng)")
        count = write_probe_labels(out_dir, args.espeak)
        print(f"wrote phones (.phn) and speakers (.spk) of {count} utterances to {out_dir}")
        return
    if os.path.exists(out_dir) and not args.overwrite:
        raise InputError(f"{out_dir} already exists; refusing to overwrite it (pass --overwrite to replace it)")
    if shutil.which(args.espeak) is None:
        raise InputError(f"{args.espeak} not found; install espeak-ng (e.g. apt-get install espeak-ng)")
    start = time.perf_counter()
    # Build in a hidden sibling folder and swap it in, so a failure leaves the old corpus (or nothing).
    with StagedOutputs(os.path.basename(out_dir), [os.path.dirname(out_dir)], args.overwrite) as staged:
        staging = staged.path(out_dir)
        os.mkdir(staging)
        utterances, total_samples, total_frames = build_corpus(staging, args.num_speakers, args.seed, args.espeak)
        staged.publish([out_dir])
    seconds = total_samples / FBANK_SAMPLE_RATE
    size_mb = sum(
        os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(out_dir) for name in names
    ) / 1e6
    print(
        f"wrote {len(utterances)} utterances from {args.num_speakers} speakers to {out_dir}: "
        f"{seconds / 3600:.3f} hours ({seconds / 60:.1f} min, {size_mb:.1f} MB), "
        f"{total_frames} frames, {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(main())
