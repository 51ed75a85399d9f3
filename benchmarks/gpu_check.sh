#!/usr/bin/env bash
# One GPU check (benchmarks/gpu_check.py): gpu tests, bf16/fp16 training through fairseq, speed vs HuBERT.
#
#   bash benchmarks/gpu_check.sh                        # on a GPU machine, from any directory
#   bash benchmarks/gpu_check.sh --device cpu --quick   # CPU smoke run (CI)
#
# The GPU machine has no network: wheels of the packages it lacks travel in .whl/ (made by
# benchmarks/gpu_wheels.sh on a machine with PyPI) and are installed here into
# /tmp/melhubert-site first. PYTHON picks the interpreter (default python3). The full log is
# copied to $OUT/gpu_check.log when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing $(ls .whl/*.whl | wc -l) carried wheels from .whl/ into /tmp/melhubert-site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/melhubert-site .whl/*.whl
    export PYTHONPATH=/tmp/melhubert-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
if [[ -n "${OUT:-}" ]]; then
    set +e +o pipefail  # exit with the check's status, not tee's
    "$python" benchmarks/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
    exit "${PIPESTATUS[0]}"
fi
exec "$python" benchmarks/gpu_check.py "$@"
