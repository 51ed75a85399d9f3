"""SUPERB-style probes of a frozen upstream: phone recognition (PR) and speaker identification (SID).

The upstream is a ``mel_hubert`` checkpoint (every hidden state), the same network
randomly initialised (``--random-init``: the checkpoint's fbank statistics kept,
no weight of it), or the normalised fbank it reads (``--fbank``, the floor). Its
features are extracted once; then, for each seed, a light head is trained on
SUPERB's learnable softmax-weighted sum of all states:

* ``pr``: a linear CTC layer over phones, greedy decoding, phone error rate (PER)
  on the ``--test`` manifests. Needs ``{split}.phn`` beside every manifest: one
  line of space-separated phones per manifest row.
* ``sid``: mean pooling over each utterance's frames, a linear classifier,
  accuracy. Needs ``{split}.spk`` beside every manifest: one speaker id per row.
  With ``--shots N`` each seed trains on N utterances per speaker drawn from all
  the manifests (``--train`` and ``--test``) and tests on the rest (few-shot: the
  full setting saturates on small corpora); without, it trains on ``--train`` and
  tests on ``--test``.

Manifests are fairseq audio manifests (16 kHz audio, through the checkpoint's
own front end) or fbank feature manifests as used for training. Prints each
probe's mean and spread (sample std) over the seeds, the learned state weights
(0 = input of the first transformer layer), and with ``--per-layer`` each state
probed alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from melhubert_fairseq.cli import console_main, set_torch_threads
from melhubert_fairseq.probe.settings import DEFAULT_STEPS, PR, SID

#: Probes the tool runs.
TASK_CHOICES = ("pr", "sid")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of melhubert-probe."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tasks", nargs="+", choices=TASK_CHOICES, help="probes to run on the same features")
    parser.add_argument("--train", action="append", required=True, metavar="MANIFEST",
                        help="manifest(s) the heads train on (repeatable); .phn/.spk beside each")
    parser.add_argument("--test", action="append", default=[], metavar="MANIFEST",
                        help="manifest(s) the heads are scored on (repeatable); .phn/.spk beside each")
    parser.add_argument("--checkpoint", help="mel_hubert checkpoint to probe (fairseq, trained, averaged or converted)")
    upstream = parser.add_mutually_exclusive_group()
    upstream.add_argument("--random-init", action="store_true",
                          help="probe the checkpoint's network freshly initialised (--init-seed), keeping only its fbank statistics")
    upstream.add_argument("--fbank", action="store_true",
                          help="probe the normalised stacked fbank the model reads (the floor); without --checkpoint, "
                          "feature manifests stacked --stack-frames at a time")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of --random-init's weights")
    parser.add_argument("--stack-frames", type=int, default=2, help="10 ms frames per fbank frame for --fbank without --checkpoint")
    parser.add_argument("--phone-map", help="pr: file of 'phone replacement' lines folding phones before training (e.g. TIMIT 61 -> 39)")
    parser.add_argument("--shots", type=int, help="sid: train on this many utterances per speaker, test on the rest")
    parser.add_argument("--seeds", type=int, default=3, help="heads trained per probe (seeds 1..N); mean and spread over them")
    parser.add_argument("--per-layer", action="store_true", help="also probe every state alone")
    parser.add_argument("--lr", type=float, help="Adam learning rate of the heads (default: the probe's own)")
    parser.add_argument("--pr-steps", type=int, help=f"pr: Adam steps of the CTC head (default {DEFAULT_STEPS[PR]})")
    parser.add_argument("--sid-steps", type=int, help=f"sid: full-batch Adam steps of the classifier (default {DEFAULT_STEPS[SID]})")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--feature-dtype", default="float32", choices=["float32", "float16"],
                        help="dtype the extracted frames are held in (float16 halves memory on large corpora)")
    parser.add_argument("--max-batch-frames", type=int, default=20000, help="padded model frames per upstream forward")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Probe one upstream; print one line per probe and a closing summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.random_init and not args.checkpoint:
        parser.error("--random-init needs --checkpoint (the network to initialise afresh)")
    if not args.fbank and not args.checkpoint:
        parser.error("give --checkpoint (with --random-init for its un-pretrained twin), or --fbank")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.shots is not None and args.shots < 1:
        parser.error("--shots must be >= 1")
    set_torch_threads(parser, args.threads)
    import torch  # here: --help needs no torch

    from dataclasses import replace

    from melhubert_fairseq.probe.features import FBANK, PRETRAINED, RANDOM_INIT, extract_probe_features, load_upstream
    from melhubert_fairseq.probe.run import DEFAULT_SETTINGS, check_probe_data, load_probe_data, run_pr, run_sid

    start = time.perf_counter()
    tasks = list(dict.fromkeys(args.tasks))
    data = load_probe_data(args.train, args.test, tasks, args.phone_map)
    check_probe_data(data, tasks, args.shots)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = FBANK if args.fbank else RANDOM_INIT if args.random_init else PRETRAINED
    upstream = load_upstream(name, args.checkpoint, device, seed=args.init_seed, stack=args.stack_frames,
                             max_batch_frames=args.max_batch_frames)
    features = extract_probe_features(
        upstream, data.rows, keep_frames=PR in tasks, keep_pooled=SID in tasks, max_batch_frames=args.max_batch_frames,
        dtype=args.feature_dtype, progress=not args.no_progress,
    )
    extracted = time.perf_counter()
    seeds = list(range(1, args.seeds + 1))
    results = []
    for task in tasks:
        settings = DEFAULT_SETTINGS[task]
        if args.lr:
            settings = replace(settings, lr=args.lr)
        if task == PR:
            settings = replace(settings, steps=args.pr_steps or settings.steps)
            result = run_pr(features, data, seeds, settings, device, args.per_layer, progress=not args.no_progress)
        else:
            settings = replace(settings, steps=args.sid_steps or settings.steps)
            result = run_sid(features, data, seeds, args.shots, settings, device, args.per_layer, progress=not args.no_progress)
        results.append(result)
        print(result.describe(), flush=True)
    end = time.perf_counter()
    frames = int(features.offsets[-1])
    print(
        f"probed {name} ({args.checkpoint or 'fbank features'}) on {len(data.rows)} utterances ({frames} frames, "
        f"{features.num_states} states) on {device}: features {extracted - start:.1f} s, heads {end - extracted:.1f} s; "
        + "; ".join(f"{r.task} {r.metric} {r.mean:.1f} ± {r.spread:.1f} %" for r in results)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
