"""The original Mel-HuBERT release's checkpoints: their format (:mod:`.format`), conversion to fairseq
``mel_hubert`` checkpoints (:mod:`.convert`) and export back (:mod:`.export`)."""
