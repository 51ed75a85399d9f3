"""Let fairseq load its own checkpoints under torch>=2.6 with ``weights_only=True`` kept on.

fairseq calls ``torch.load`` without ``weights_only``; since torch 2.6 that
means the safe unpickler, which refuses anything not allow-listed. Rather than
turning the safe loader off (which would let a checkpoint run arbitrary code),
we allow-list exactly the plain container types fairseq checkpoints hold.
Importing the plugin (which fairseq does before it reads a checkpoint) is
enough to register them.
"""
from __future__ import annotations

import collections
import typing

import torch


def fairseq_checkpoint_safe_globals() -> list:
    """The classes a fairseq checkpoint (plain, re-saved or DDP) may contain."""
    import omegaconf
    from fairseq.data import Dictionary
    from fairseq.distributed.utils import _TensorPlaceholder

    return [
        Dictionary,
        omegaconf.DictConfig,
        omegaconf.ListConfig,
        omegaconf.base.ContainerMetadata,
        omegaconf.base.Metadata,
        omegaconf.nodes.AnyNode,
        typing.Any,
        collections.defaultdict,
        # Needed as pickled globals by DDP runs: without them the 2-process resume in
        # tests/test_distributed.py fails.
        dict,
        list,
        int,
        _TensorPlaceholder,
    ]


def register_fairseq_safe_globals() -> None:
    """Add the fairseq checkpoint types to torch's weights-only allow-list."""
    torch.serialization.add_safe_globals(fairseq_checkpoint_safe_globals())
