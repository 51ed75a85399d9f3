"""melhubert-fairseq: Mel-HuBERT pretraining as a fairseq plugin."""
from setuptools import setup

setup(
    name="melhubert-fairseq",
    version="0.1.0",
    description="Mel-HuBERT (log-Mel HuBERT) pretraining as a fairseq user-dir plugin",
    python_requires=">=3.10",
    packages=[
        "melhubert_fairseq",
        "melhubert_fairseq.data",
        "melhubert_fairseq.models",
        "melhubert_fairseq.tasks",
        "melhubert_fairseq.criterions",
        "melhubert_fairseq.tools",
    ],
    # The data tools live in tools/ (where users look for them) but install as
    # melhubert_fairseq.tools so console scripts and tests can import them.
    package_dir={"melhubert_fairseq.tools": "tools"},
    install_requires=[
        # torch is deliberately unpinned and listed first: install it yourself
        # beforehand (see README); any installed torch >= 2.1 satisfies this,
        # so pip never replaces it.
        "torch>=2.1",
        # ve-fairseq is a build of fairseq main that imports on Python 3.11/3.12
        # (fairseq==0.12.2 does not). It pulls torchaudio, which we never import.
        "ve-fairseq>=0.12.3",
        "numpy",
        "omegaconf",
        "hydra-core",
        "soundfile",
        "tqdm",
        "kaldiio",
        "kaldi-native-fbank",
        "scikit-learn",
        "tensorboardX",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": []},
)
