"""Data tools: Kaldi dumps, audio, k-means labels and checkpoints into manifests (installed as melhubert_fairseq.tools)."""
