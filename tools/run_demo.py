"""The whole Mel-HuBERT stage-1 pipeline on the bundled demo corpus, then frozen probes and CTC fine-tuning,
on CPU, in minutes.

demo/corpus (FLAC) -> fbank + mean/std + manifests -> k-means labels -> fairseq-hydra-train
with config/demo.yaml -> how well the model predicts the masked frames' clusters compared
with chance. Then SUPERB-style frozen probes (melhubert_fairseq.probe) of the normalised
fbank, of the same network randomly initialised and of the pretrained one: phone recognition
(linear CTC on the corpus's espeak-ng phones, train -> valid) and few-shot speaker
identification (2 utterances per speaker train, the other 8 test), mean ± spread over seeds,
in one table. Then the transcripts in fairseq's audio_finetuning layout -> fairseq-hydra-train
with config/finetune_demo.yaml (fairseq's wav2vec_ctc on the pretrained model) twice: from
the pretrained weights and from a random initialisation of the same network
(model.no_pretrained_weights=true) -> the valid character error rate of both.

The corpus and the configs are files of a melhubert-fairseq checkout, which pip does not
install: the demo runs in the checkout this package is imported from (an editable install)
or in the one the current directory is in, and otherwise says so.
"""
import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import melhubert_fairseq
from melhubert_fairseq.cli import console_main
from melhubert_fairseq.data.features import MEAN_STD_NAME
from melhubert_fairseq.errors import InputError
from melhubert_fairseq.finetuning import check_finetuning_checkpoint, write_finetuning_data
from melhubert_fairseq.tools import dump_km_labels, learn_kmeans, wav_to_fbank

#: The installed plugin: fairseq-hydra-train's common.user_dir.
PLUGIN_DIR = Path(melhubert_fairseq.__file__).resolve().parent
#: The bundled corpus, relative to a checkout's root.
CORPUS = Path("demo", "corpus")
#: The fairseq-hydra-train configs, relative to a checkout's root.
CONFIG_DIR = Path("config")
SPLITS = ("train", "valid")
#: Files the demo reads from a checkout; a folder holding them all is one.
CHECKOUT_FILES = (
    *(CORPUS / name for name in ("train.tsv", "valid.tsv", "transcripts.tsv", "train.phn", "valid.phn", "train.spk", "valid.spk")),
    CONFIG_DIR / "demo.yaml",
    CONFIG_DIR / "finetune_demo.yaml",
)
#: Upstreams the probe table compares, in its row order (melhubert_fairseq.probe.features' names).
PROBE_UPSTREAMS = ("fbank", "random init", "pretrained")
#: The demo's PR heads: Adam steps, half the tool's default (CTC heads are the demo's costliest probe; on a
#: 50-update demo checkpoint one head's PER was 41.5 after 300 steps and 41.9 after 400).
DEMO_PR_STEPS = 300
#: The demo's SID classifiers: full-batch Adam steps.
DEMO_SID_STEPS = 200
#: Phone folding of the demo's PR probe (one espeak-ng allophone occurs only in valid).
PHONE_MAP = CORPUS / "phones.map"
#: The two fine-tunings the demo compares: name -> extra overrides.
FINETUNE_INITS = {"pretrained": [], "random init": ["model.no_pretrained_weights=true"]}


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags of the demo."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", help="where features, labels, checkpoints and logs go (default: demo_run in the checkout)")
    parser.add_argument("--num-clusters", type=int, default=100, help="K of the stage-1 k-means on fbank")
    parser.add_argument("--max-update", type=int, help="override config/demo.yaml's optimization.max_update")
    parser.add_argument("--min-accuracy-ratio", type=float, default=5.0, help="fail unless final masked accuracy exceeds this many times chance (0 = no check)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the fbank extraction")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing --out-dir first")
    parser.add_argument("--no-finetune", action="store_true", help="skip the CTC fine-tunings")
    parser.add_argument("--no-probe", action="store_true", help="skip the frozen probes (PR, few-shot SID)")
    parser.add_argument("--probe-seeds", type=int, default=5, help="SID heads (few-shot splits) per upstream; the table shows mean ± spread")
    parser.add_argument("--probe-pr-seeds", type=int, default=3, help="PR heads per upstream (each costs as much as all SID heads)")
    parser.add_argument("--probe-shots", type=int, default=2, help="SID: training utterances per speaker; the other 8 test")
    parser.add_argument("--probe-pr-steps", type=int, default=DEMO_PR_STEPS, help="PR: Adam steps of each CTC head")
    parser.add_argument("--probe-sid-steps", type=int, default=DEMO_SID_STEPS, help="SID: steps of each classifier")
    parser.add_argument(
        "--pretrained", metavar="CHECKPOINT",
        help="skip pretraining; probe and fine-tune this mel_hubert checkpoint (it must record its fbank statistics)",
    )
    parser.add_argument("--finetune-max-update", type=int, help="override config/finetune_demo.yaml's optimization.max_update")
    parser.add_argument(
        "--finetune-override", action="append", default=[], metavar="KEY=VALUE",
        help="extra fairseq-hydra-train override for both fine-tunings (repeatable), e.g. model.mask_prob=0.3",
    )
    parser.add_argument("overrides", nargs="*", help="extra fairseq-hydra-train overrides for pretraining, e.g. model.encoder_layers=2")
    return parser


def last_metrics(log_path: Path, tag: str) -> Optional[Dict[str, str]]:
    """The last json metrics line fairseq logged under ``[tag]`` (train, valid, train_inner)."""
    found = None
    pattern = re.compile(rf"\]\[{tag}\]\[INFO\] - (\{{.*\}})")
    with open(log_path, encoding="utf-8") as handle:
        for line in handle:
            match = pattern.search(line)
            if match:
                found = json.loads(match.group(1))
    return found


def find_checkout() -> Path:
    """The melhubert-fairseq checkout holding the demo's corpus and configs: the one this package is imported
    from (an editable install), else the current directory or a folder above it; an InputError if neither is."""
    cwd = Path.cwd().resolve()
    for candidate in (PLUGIN_DIR.parent, cwd, *cwd.parents):
        if all((candidate / name).is_file() for name in CHECKOUT_FILES):
            return candidate
    raise InputError(
        f"the demo needs a melhubert-fairseq checkout: pip does not install its {CORPUS}/ and {CONFIG_DIR}/, and "
        f"neither {PLUGIN_DIR.parent} (where melhubert_fairseq is installed) nor {cwd} or a folder above it holds "
        "them; run it from inside a clone of the repository (or install the clone with pip install -e .)"
    )


def make_features(checkout: Path, out: Path, workers: int) -> Path:
    """fbank for both splits; valid is normalised with the train statistics."""
    feature_dir = out / "features"
    corpus = checkout / CORPUS
    wav_to_fbank.main(["--manifest", str(corpus / "train.tsv"), "--out-dir", str(feature_dir), "--workers", str(workers)])
    wav_to_fbank.main([
        "--manifest", str(corpus / "valid.tsv"), "--out-dir", str(feature_dir),
        "--mean-std", str(feature_dir / MEAN_STD_NAME),
    ])
    return feature_dir


def make_labels(out: Path, feature_dir: Path, num_clusters: int) -> Path:
    """Stage-1 labels: k-means of the train fbank frames, assigned to every frame of both splits."""
    centroids = out / "kmeans" / f"fbank-k{num_clusters}.npy"
    label_dir = out / "labels"
    learn_kmeans.main([
        "--manifest", str(feature_dir / "train.tsv"), "--km-path", str(centroids),
        "--num-clusters", str(num_clusters), "--sample-frac", "1.0",
    ])
    for split in SPLITS:
        dump_km_labels.main([
            "--manifest", str(feature_dir / f"{split}.tsv"), "--km-path", str(centroids), "--out-dir", str(label_dir),
        ])
    return label_dir


def hydra_train(checkout: Path, config_name: str, hydra_dir: Path, overrides: List[str]) -> Path:
    """Run fairseq-hydra-train with the checkout's config/``config_name``.yaml, from the checkout, training this
    installed plugin; return its log file."""
    command = [
        sys.executable, "-m", "fairseq_cli.hydra_train", "--config-dir", str(checkout / CONFIG_DIR),
        "--config-name", config_name, f"common.user_dir={PLUGIN_DIR}",
        f"hydra.run.dir={hydra_dir}", *overrides,
    ]
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=checkout, check=True)
    return hydra_dir / "hydra_train.log"


def train(
    checkout: Path, out: Path, feature_dir: Path, label_dir: Path, num_clusters: int, max_update: Optional[int],
    overrides: List[str],
) -> Path:
    """Pretrain with config/demo.yaml; return the log file."""
    return hydra_train(checkout, "demo", out / "hydra", [
        f"task.data={feature_dir}", f"task.label_dir={label_dir}", f"task.num_classes={num_clusters}",
        f"checkpoint.save_dir={out / 'checkpoints'}",
        *([f"optimization.max_update={max_update}"] if max_update else []),
        *overrides,
    ])


def finetune(
    checkout: Path, out: Path, checkpoint: Path, max_update: Optional[int], overrides: List[str]
) -> Tuple[Dict[str, Dict[str, str]], str]:
    """CTC fine-tuning of ``checkpoint`` with config/finetune_demo.yaml, from it and from a random init of it;
    return each one's last validation metrics and what the valid split holds."""
    data_dir = out / "finetune" / "data"
    corpus = checkout / CORPUS
    splits = write_finetuning_data(
        {split: str(corpus / f"{split}.tsv") for split in SPLITS}, str(corpus / "transcripts.tsv"), str(data_dir)
    )
    results = {}
    for name, init_overrides in FINETUNE_INITS.items():
        run_dir = out / "finetune" / name.replace(" ", "_")
        log_path = hydra_train(checkout, "finetune_demo", run_dir / "hydra", [
            f"task.data={data_dir}", f"model.w2v_path={checkpoint}", f"checkpoint.save_dir={run_dir / 'checkpoints'}",
            *([f"optimization.max_update={max_update}"] if max_update else []),
            *init_overrides,
            *overrides,
        ])
        results[name] = {**(last_metrics(log_path, "valid") or {}), "log": str(log_path)}
    valid = next(split for split in splits if split.name == "valid")
    return results, f"{valid.num_utterances} valid utterances, {valid.num_letters} letter targets"


def finetune_summary(results: Dict[str, Dict[str, str]], valid_size: str) -> str:
    """The fine-tuning lines of the summary: valid CER (and WER) of each init, and which is lower."""
    cer = {name: float(metrics.get("valid_uer", "nan")) for name, metrics in results.items()}
    lines = [
        f"  valid CER {cer[name]:.1f}% (WER {float(metrics.get('valid_wer', 'nan')):.1f}%) fine-tuned from {name} "
        f"({metrics.get('valid_num_updates', '?')} updates; log: {metrics['log']})"
        for name, metrics in results.items()
    ]
    pretrained, random_init = cer["pretrained"], cer["random init"]
    if pretrained < random_init:
        verdict = f"pretraining lowered the valid CER by {random_init - pretrained:.1f} points"
    elif pretrained > random_init:
        verdict = f"pretraining did not help: random init is {pretrained - random_init:.1f} CER points lower"
    else:
        verdict = "pretrained and random init reach the same valid CER"
    return f"CTC fine-tuning of the whole network (not a frozen probe) on demo/corpus ({valid_size}; greedy decoding; CER counts letters, apostrophes and word boundaries):\n" + (
        "\n".join(lines) + f"\n  {verdict}"
    )


def probe(checkout: Path, checkpoint: Path, args: argparse.Namespace) -> list:
    """PR (train -> valid) and few-shot SID (``--probe-shots`` per speaker -> the rest) of fbank, the
    checkpoint's network randomly initialised, and the checkpoint, each over several seeds."""
    from dataclasses import replace

    from melhubert_fairseq.probe.features import extract_probe_features, load_upstream
    from melhubert_fairseq.probe.run import DEFAULT_SETTINGS, check_probe_data, load_probe_data, run_pr, run_sid
    from melhubert_fairseq.probe.settings import PR, SID, TASKS

    corpus = checkout / CORPUS
    data = load_probe_data([str(corpus / "train.tsv")], [str(corpus / "valid.tsv")], TASKS, str(checkout / PHONE_MAP))
    check_probe_data(data, TASKS, args.probe_shots)
    pr_settings = replace(DEFAULT_SETTINGS[PR], steps=args.probe_pr_steps)
    sid_settings = replace(DEFAULT_SETTINGS[SID], steps=args.probe_sid_steps)
    results = []
    for name in PROBE_UPSTREAMS:
        features = extract_probe_features(load_upstream(name, str(checkpoint)), data.rows, keep_frames=True, keep_pooled=True)
        results.append(run_pr(features, data, list(range(1, args.probe_pr_seeds + 1)), pr_settings, progress=True))
        results.append(run_sid(features, data, list(range(1, args.probe_seeds + 1)), args.probe_shots, sid_settings, progress=True))
    return results


def probe_summary(results: list, shots: int) -> str:
    """The probe table (ProbeResults), each result's seeds and state weights, and whether pretraining beat random init."""
    from melhubert_fairseq.probe.run import beats, format_table, paired_gap
    from melhubert_fairseq.probe.settings import PR, SID, TASKS

    example = {r.task: r for r in results}
    title = (
        f"Frozen probes on demo/corpus (SUPERB-style: learnable weighted sum of all states + linear head; mean ± "
        f"spread over {len(example[PR].values)} PR / {len(example[SID].values)} SID seeds):\n"
        f"  PR: linear CTC over espeak-ng phones, {example[PR].num_train} train / {example[PR].num_test} valid utterances; "
        f"SID: {shots} utterances per speaker train, {example[SID].num_test} test"
    )
    lines = [format_table(results, PROBE_UPSTREAMS, title), "  details:"]
    lines += ["    " + r.describe().replace("\n", "\n    ") for r in results]
    by_key = {(r.upstream, r.task): r for r in results}
    for task in TASKS:
        pretrained, random_init = by_key[("pretrained", task)], by_key[("random init", task)]
        verdict = (
            "beats random init beyond the spread" if beats(pretrained, random_init)
            else "is worse than random init beyond the spread" if beats(random_init, pretrained)
            else "is within the spread of random init"
        )
        gap, gap_spread = paired_gap(pretrained, random_init)
        lines.append(
            f"  {task.upper()}: pretrained {pretrained.metric} {pretrained.mean:.1f} ± {pretrained.spread:.1f} {verdict} "
            f"({random_init.mean:.1f} ± {random_init.spread:.1f}); seed by seed, pretrained minus random init: "
            f"{gap:+.1f} ± {gap_spread:.1f} points in pretraining's favour"
        )
    return "\n".join(lines)


def pretrain(args: argparse.Namespace, checkout: Path, out: Path) -> Tuple[Path, bool]:
    """Features, labels and pretraining; print its summary; return (checkpoint, whether the model learned)."""
    start = time.time()
    feature_dir = make_features(checkout, out, args.workers)
    label_dir = make_labels(out, feature_dir, args.num_clusters)
    log_path = train(checkout, out, feature_dir, label_dir, args.num_clusters, args.max_update, args.overrides)

    chance = 1.0 / args.num_clusters
    train_metrics = last_metrics(log_path, "train") or {}
    valid_metrics = last_metrics(log_path, "valid") or {}
    train_acc = float(train_metrics.get("train_acc_m", "nan"))
    valid_acc = float(valid_metrics.get("valid_acc_m", "nan"))
    print(
        f"demo finished in {time.time() - start:.0f} s: {train_metrics.get('train_num_updates', '?')} updates; "
        f"masked accuracy train {train_acc:.3f} ({train_acc / chance:.1f}x chance), "
        f"valid {valid_acc:.3f} ({valid_acc / chance:.1f}x chance), chance = 1/{args.num_clusters}\n"
        f"  checkpoints: {out / 'checkpoints'}\n  log: {log_path}\n  features: {feature_dir}\n  labels: {label_dir}"
    )
    learned = not args.min_accuracy_ratio or train_acc > args.min_accuracy_ratio * chance
    if not learned:
        print(f"masked accuracy is not above {args.min_accuracy_ratio:g}x chance: the model did not learn", file=sys.stderr)
    return out / "checkpoints" / "checkpoint_last.pt", learned


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo end to end; return 0 when the pretrained model learned (accuracy above the threshold)."""
    args = build_parser().parse_args(argv)
    if args.pretrained and args.no_finetune and args.no_probe:
        raise SystemExit("--pretrained probes and fine-tunes a given checkpoint; it makes no sense with --no-finetune --no-probe")
    if args.pretrained:
        check_finetuning_checkpoint(args.pretrained)  # before anything is written
    checkout = find_checkout()
    out = Path(args.out_dir).resolve() if args.out_dir else checkout / "demo_run"
    if out.exists():
        if not args.overwrite:
            raise SystemExit(f"{out} already exists: pass --overwrite to start the demo again from scratch")
        shutil.rmtree(out)
    start = time.time()
    learned = True
    if args.pretrained:
        checkpoint = Path(args.pretrained).resolve()
    else:
        checkpoint, learned = pretrain(args, checkout, out)
    if not args.no_probe:
        probe_start = time.time()
        results = probe(checkout, checkpoint, args)
        print(
            f"probes finished in {time.time() - probe_start:.0f} s (demo: {time.time() - start:.0f} s so far); "
            + probe_summary(results, args.probe_shots),
            flush=True,
        )
    if not args.no_finetune:
        finetune_start = time.time()
        results, valid_size = finetune(checkout, out, checkpoint, args.finetune_max_update, args.finetune_override)
        print(
            f"fine-tuning finished in {time.time() - finetune_start:.0f} s (demo: {time.time() - start:.0f} s in all); "
            + finetune_summary(results, valid_size)
        )
    return 0 if learned else 1


if __name__ == "__main__":
    sys.exit(main())
