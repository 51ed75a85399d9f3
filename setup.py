"""melhubert-fairseq: Mel-HuBERT pretraining as a fairseq plugin."""
from setuptools import find_packages, setup

setup(
    name="melhubert-fairseq",
    version="0.1.0",
    description="Mel-HuBERT (log-Mel HuBERT) pretraining as a fairseq user-dir plugin",
    python_requires=">=3.10",
    # Every subpackage of melhubert_fairseq (a listed one is easy to forget: a regular install would lack it).
    packages=find_packages(include=["melhubert_fairseq", "melhubert_fairseq.*"]) + ["melhubert_fairseq.tools"],
    # The data tools live in tools/ (where users look for them) but install as
    # melhubert_fairseq.tools so console scripts and tests can import them: a
    # top-level "tools" package would collide with any other in site-packages.
    # demo/ and config/ are not installed; the demo finds them in a checkout.
    package_dir={"melhubert_fairseq.tools": "tools"},
    install_requires=[
        # torch is deliberately unpinned and listed first: install it yourself
        # beforehand (see README); any installed torch >= 2.1 satisfies this,
        # so pip never replaces it.
        "torch>=2.1",
        # ve-fairseq is a build of fairseq main that imports on Python 3.11/3.12
        # (fairseq==0.12.2 does not). It pulls torchaudio, which we never import.
        # Pinned: the version every test runs against.
        "ve-fairseq==0.12.3",
        "numpy",
        "omegaconf",
        "hydra-core",
        "soundfile",
        "tqdm",
        "kaldiio",
        # >= 1.18: MelBanks.compute and FeatureWindowFunction, which the torch front end reads its constants from.
        "kaldi-native-fbank>=1.18",
        # >= 1.3: InconsistentVersionWarning, which melhubert-import-kmeans reports as a note.
        "scikit-learn>=1.3",
        # fairseq simple_kmeans' model format, read by melhubert-import-kmeans (scikit-learn needs it too).
        "joblib",
        "scipy",
        "tensorboardX",
        # fairseq's ctc criterion imports it to score every validation of CTC fine-tuning
        # (criterions/ctc.py), but ve-fairseq does not declare it.
        "editdistance",
    ],
    extras_require={
        "test": ["pytest"],
        # s3prl's Featurizer for tests/test_s3prl_upstream.py (tested: 0.4.18 next to torch 2.13). Its runner
        # also needs a torchaudio that loads; `pip install --no-deps s3prl==0.4.18` is enough for the test.
        "s3prl": ["s3prl>=0.4.18"],
        # The faster k-means backend of melhubert-learn-kmeans; without it scikit-learn fits. An extra, so an
        # installed faiss-gpu is not replaced by (or clashes with) faiss-cpu.
        "faiss": ["faiss-cpu"],
        # Beam search (with an optional KenLM n-gram) for melhubert-decode: flashlight-text is the CTC decoder
        # behind torchaudio's ctc_decoder, a binary wheel with KenLM built in that needs neither torch nor
        # torchaudio (docs/decoding.md says why not pyctcdecode + kenlm). Greedy decoding needs nothing extra.
        "decode": ["flashlight-text"],
    },
    entry_points={
        "console_scripts": [
            "melhubert-demo = melhubert_fairseq.tools.run_demo:main",
            "melhubert-make-demo-corpus = melhubert_fairseq.tools.make_demo_corpus:main",
            "melhubert-wav-to-fbank = melhubert_fairseq.tools.wav_to_fbank:main",
            "melhubert-import-kaldi-features = melhubert_fairseq.tools.import_kaldi_features:main",
            "melhubert-import-kaldi-labels = melhubert_fairseq.tools.import_kaldi_labels:main",
            "melhubert-create-manifest = melhubert_fairseq.tools.create_manifest:main",
            "melhubert-learn-kmeans = melhubert_fairseq.tools.learn_kmeans:main",
            "melhubert-dump-km-labels = melhubert_fairseq.tools.dump_km_labels:main",
            "melhubert-merge-km-shards = melhubert_fairseq.tools.merge_km_shards:main",
            "melhubert-import-kmeans = melhubert_fairseq.tools.import_kmeans:main",
            "melhubert-convert-original = melhubert_fairseq.tools.convert_original_checkpoint:main",
            "melhubert-export-original = melhubert_fairseq.tools.export_original_checkpoint:main",
            "melhubert-extract-features = melhubert_fairseq.tools.extract_features:main",
            "melhubert-average-checkpoints = melhubert_fairseq.tools.average_checkpoints:main",
            "melhubert-user-dir = melhubert_fairseq.tools.user_dir:main",
            "melhubert-decode = melhubert_fairseq.tools.decode:main",
            "melhubert-probe = melhubert_fairseq.tools.probe:main",
        ]
    },
)
