from melhubert_fairseq.models import mel_hubert  # noqa: F401  (registers the model)
