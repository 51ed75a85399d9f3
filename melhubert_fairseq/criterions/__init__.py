from melhubert_fairseq.criterions import hard_label_masked_ce  # noqa: F401  (registers the criterion)
