#!/usr/bin/env bash
# Wheels of what benchmarks/gpu_check.sh needs and the GPU machine lacks, into .whl/ (git-ignored).
#
# Run on a machine with PyPI, in any directory; then send .whl/ with the checkout (device tool:
# carry=[".whl"]). Targets the GPU machine's CPython 3.12 on manylinux x86_64 (PYTHON_VERSION
# changes it); torch, numpy, scipy, scikit-learn, sacrebleu, regex, tqdm, pyyaml and pytest are
# already there. About 23 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
version=${PYTHON_VERSION:-3.12}
rm -rf .whl && mkdir .whl
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    ve-fairseq==0.12.3 hydra-core==1.3.8 omegaconf==2.3.1 bitarray==3.12.3 kaldi-native-fbank==1.23.0 \
    soundfile==0.14.0 cffi==2.0.0 pycparser==3.0
# omegaconf 2.x needs antlr4 4.9.x, published as a source archive only: build its pure-Python wheel.
"$python" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -l .whl
echo "done: $(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
