from melhubert_fairseq.criterions import apc_l1, hard_label_masked_ce  # noqa: F401  (register the criteria)
