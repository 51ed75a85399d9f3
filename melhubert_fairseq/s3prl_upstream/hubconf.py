"""s3prl hub entries: ``-u melhubert_fairseq_local -k CHECKPOINT`` once registered in s3prl/hub.py (README)."""
from melhubert_fairseq.s3prl_upstream.expert import UpstreamExpert as _UpstreamExpert


def melhubert_fairseq_local(ckpt: str, *args, **kwargs) -> _UpstreamExpert:
    """A local ``mel_hubert`` checkpoint (``-k``, trained, averaged or converted by this plugin) as an upstream."""
    return _UpstreamExpert(ckpt, *args, **kwargs)
