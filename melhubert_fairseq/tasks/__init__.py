from melhubert_fairseq.tasks import mel_hubert_pretraining  # noqa: F401  (registers the task)
