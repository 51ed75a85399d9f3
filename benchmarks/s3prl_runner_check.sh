#!/usr/bin/env bash
# s3prl's own runner (run_downstream.py) on a mel_hubert checkpoint, end to end, in an environment of its own:
#   1. a venv with the versions s3prl 0.4.18's runner runs with: torch 2.8.0 + torchaudio 2.8.0 exactly
#      (s3prl's hub.py imports torchaudio APIs that 2.9 removed; torchaudio must match torch or its native
#      library does not load), s3prl 0.4.18, huggingface_hub<1 (the runner imports HfFolder), librosa,
#      and this plugin, all under a constraints file so that no install replaces torch or torchaudio;
#   2. registers our upstream in that venv's s3prl/hub.py (-u melhubert_fairseq_local);
#   3. a VoxCeleb1-style folder from the bundled corpus (demo/corpus: 12 speakers x 10 utterances -> ids
#      id10001..id10012, 6/2/2 utterances per speaker for train/dev/test) and its iden_split.txt;
#   4. writes the voxceleb1 downstream config.yaml (the PyPI sdist ships none) with a few steps;
#   5. s3prl's `run_downstream.py -m train -d voxceleb1`, then `-m evaluate` on the test split with
#      TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (s3prl loads its own checkpoint, which holds an argparse.Namespace,
#      with torch.load's default, weights_only=True since torch 2.6); the plugin passes weights_only itself,
#      so the variable changes s3prl's load only. Prints the test accuracy last.
#
# Usage: bash benchmarks/s3prl_runner_check.sh [CHECKPOINT]
#   CHECKPOINT: a mel_hubert checkpoint (with its fbank statistics); without one, the demo's pretraining
#   (melhubert-demo --no-finetune) makes one in that venv first.
# Environment: S3PRL_CHECK_DIR (venv, data, results; default s3prl_check/ in the checkout),
#   S3PRL_WHEELS (a folder of already downloaded wheels, e.g. from
#   `pip download torch==2.8.0 torchaudio==2.8.0 -d DIR`: torch 2.8.0 from PyPI is the CUDA build, ~3 GB with
#   its nvidia-* wheels), S3PRL_STEPS (training steps, default 200), S3PRL_DEVICE (default cuda if present, else cpu),
#   PYTHON (the interpreter for the venv, default python3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mkdir -p "${S3PRL_CHECK_DIR:-$REPO/s3prl_check}" && cd "${S3PRL_CHECK_DIR:-$REPO/s3prl_check}" && pwd)
VENV=$WORK/venv
STEPS=${S3PRL_STEPS:-200}
CKPT=${1:-}
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "[s3prl_runner_check] $*"; }

# --- 1. the environment --------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY=$VENV/bin/python
FIND_LINKS=()
if [ -n "${S3PRL_WHEELS:-}" ]; then FIND_LINKS=(--find-links "$S3PRL_WHEELS"); fi
cat > "$WORK/constraints.txt" <<'EOF'
torch==2.8.0
torchaudio==2.8.0
huggingface_hub<1
EOF
say "installing torch 2.8.0 + torchaudio 2.8.0, s3prl 0.4.18, huggingface_hub<1, librosa and the plugin into $VENV"
"$PY" -m pip install -q "${FIND_LINKS[@]}" torch==2.8.0 torchaudio==2.8.0
"$PY" -m pip install -q "${FIND_LINKS[@]}" -c "$WORK/constraints.txt" s3prl==0.4.18 "huggingface_hub<1" librosa
# not editable: nothing is written into the checkout
"$PY" -m pip install -q "${FIND_LINKS[@]}" -c "$WORK/constraints.txt" "$REPO"
"$PY" - <<'EOF'
import importlib.metadata as md, sys
print("[s3prl_runner_check] versions: python " + sys.version.split()[0] + ", " + ", ".join(
    f"{name} {md.version(name)}" for name in
    ("torch", "torchaudio", "s3prl", "huggingface_hub", "librosa", "ve-fairseq", "melhubert-fairseq")))
EOF

# --- 2. register the upstream in s3prl's hub ------------------------------------------------------
S3PRL_DIR=$("$PY" -c "import os, s3prl; print(os.path.dirname(s3prl.__file__))" 2>/dev/null | tail -1)
HUB_LINE="from melhubert_fairseq.s3prl_upstream.hubconf import *"
grep -qxF "$HUB_LINE" "$S3PRL_DIR/hub.py" || echo "$HUB_LINE" >> "$S3PRL_DIR/hub.py"
say "registered: '$HUB_LINE' in $S3PRL_DIR/hub.py"

# --- a checkpoint ----------------------------------------------------------------------------------
if [ -z "$CKPT" ]; then
    CKPT=$WORK/demo_run/checkpoints/checkpoint_best.pt
    if [ ! -f "$CKPT" ]; then
        say "no checkpoint given: pretraining the demo model in this venv (melhubert-demo --no-finetune)"
        # the console script: `python -m` from the checkout would import its melhubert_fairseq, which lacks tools/
        (cd "$REPO" && "$VENV/bin/melhubert-demo" --no-finetune --overwrite --out-dir "$WORK/demo_run")
    fi
fi
CKPT=$(cd "$(dirname "$CKPT")" && pwd)/$(basename "$CKPT")

# --- 3. VoxCeleb1-style layout from the bundled corpus -------------------------------------------
DATA=$WORK/voxceleb1
rm -rf "$DATA"
"$PY" - "$REPO/demo/corpus" "$DATA" <<'EOF'
"""demo/corpus -> {DATA}/dev/wav/id100NN/<voice>/000KK.wav (16-bit PCM) and {DATA}/iden_split.txt."""
import os, sys
import soundfile as sf
from melhubert_fairseq.data.manifest import AUDIO, iter_tsv_manifest

corpus, data = sys.argv[1:]
by_speaker = {}
for split in ("train", "valid"):
    for root, _line, rel_path, _samples in iter_tsv_manifest(os.path.join(corpus, f"{split}.tsv"), AUDIO):
        by_speaker.setdefault(os.path.dirname(rel_path), []).append(os.path.join(root, rel_path))
rows = []
for number, speaker_dir in enumerate(sorted(by_speaker), start=1):
    voice = speaker_dir.split("_", 1)[1]  # spk01_en-us-nyc_m2 -> en-us-nyc_m2 plays the YouTube video id
    for index, path in enumerate(sorted(by_speaker[speaker_dir]), start=1):
        rel = f"id{10000 + number}/{voice}/{index:05d}.wav"
        out = os.path.join(data, "dev", "wav", rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        audio, rate = sf.read(path, dtype="int16")
        sf.write(out, audio, rate, subtype="PCM_16")
        rows.append(f"{1 if index <= 6 else 2 if index <= 8 else 3} {rel}\n")
with open(os.path.join(data, "iden_split.txt"), "w") as handle:
    handle.writelines(rows)
print(f"[s3prl_runner_check] VoxCeleb1 layout: {len(by_speaker)} speakers, {len(rows)} utterances "
      f"({sum(r[0] == '1' for r in rows)} train / {sum(r[0] == '2' for r in rows)} dev / {sum(r[0] == '3' for r in rows)} test) in {data}")
EOF
# s3prl caches the file lists of its VoxCeleb1 splits inside its own package folder and reuses them for
# every later run, whatever the data: remove them, or a second corpus trains on the first one's paths.
rm -rf "$S3PRL_DIR/downstream/voxceleb1/.cache"

# --- 4. the downstream config (s3prl's voxceleb1/config.yaml, few steps) ----------------------------
DEVICE=${S3PRL_DEVICE:-$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" | tail -1)}
EVAL_STEP=$(( STEPS / 2 ))
cat > "$WORK/voxceleb1_config.yaml" <<EOF
# s3prl 0.4.18 s3prl/downstream/voxceleb1/config.yaml (from its git repository; the PyPI sdist has none),
# with $STEPS steps, no gradient accumulation, a higher learning rate and 0 workers for a short CPU run.
runner:
  total_steps: $STEPS
  gradient_clipping: 1
  gradient_accumulate_steps: 1
  log_step: $EVAL_STEP
  eval_step: $EVAL_STEP
  save_step: $EVAL_STEP
  max_keep: 1
  eval_dataloaders:
    - dev
optimizer:
  name: TorchOptim
  torch_optim_name: Adam
  lr: 1.0e-3
downstream_expert:
  datarc:
    file_path: $DATA
    meta_data: $DATA/iden_split.txt
    num_workers: 0
    train_batch_size: 8
    eval_batch_size: 1
    max_timestep: 128000
  modelrc:
    projector_dim: 256
    select: UtteranceLevel
    UtteranceLevel:
      pooling: MeanPooling
EOF

# --- 5. s3prl's runner: train, then evaluate ------------------------------------------------------
EXPDIR=$WORK/result/melhubert_sid
rm -rf "$EXPDIR"
cd "$WORK"
say "training: run_downstream.py -m train -u melhubert_fairseq_local -k $CKPT -d voxceleb1 ($STEPS steps on $DEVICE)"
"$PY" "$S3PRL_DIR/run_downstream.py" -m train -u melhubert_fairseq_local -k "$CKPT" -d voxceleb1 \
    -c "$WORK/voxceleb1_config.yaml" -p "$EXPDIR" --device "$DEVICE" > "$WORK/train.log" 2>&1 \
    || { tail -30 "$WORK/train.log"; say "training failed (log: $WORK/train.log)"; exit 1; }
grep -E "^dev acc" "$WORK/train.log" | sed 's/^/[s3prl_runner_check] during training: /' || true
# dev-best.ckpt is written when the dev accuracy improves on 0; states-STEPS.ckpt always
EVAL_CKPT=$EXPDIR/dev-best.ckpt
[ -f "$EVAL_CKPT" ] || EVAL_CKPT=$EXPDIR/states-$STEPS.ckpt
say "evaluating: run_downstream.py -m evaluate -e $EVAL_CKPT (test split)"
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 "$PY" "$S3PRL_DIR/run_downstream.py" -m evaluate -e "$EVAL_CKPT" \
    --device "$DEVICE" > "$WORK/evaluate.log" 2>&1 \
    || { tail -30 "$WORK/evaluate.log"; say "evaluation failed (log: $WORK/evaluate.log)"; exit 1; }
ACC=$(grep -E "^test acc" "$WORK/evaluate.log" | tail -1)
[ -n "$ACC" ] || { tail -30 "$WORK/evaluate.log"; say "no 'test acc' line in $WORK/evaluate.log"; exit 1; }
say "SID on the demo corpus (12 speakers, chance 1/12 = 0.083), s3prl's runner: $ACC"
