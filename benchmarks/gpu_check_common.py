"""What the stages of gpu_check.py share: the checkout, the --quick model sizes, the time budget and progress lines."""
from __future__ import annotations

import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Encoder sizes of the --quick models (the tests' tiny model), for both Mel-HuBERT and HuBERT.
QUICK_SIZES = dict(encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128, encoder_attention_heads=4, conv_pos=16, conv_pos_groups=4)
#: HuBERT's conv front end at 32 instead of 512 channels for --quick (same strides: 50 Hz frames).
QUICK_HUBERT_FRONT_END = dict(conv_feature_layers="[(32,10,5)] + [(32,3,2)] * 4 + [(32,2,2)] * 2")


class Budget:
    """Wall-clock budget of the whole check: stages ask it how long they may still run."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.perf_counter() - self.start

    def left(self) -> float:
        """Seconds left of the budget (may be negative)."""
        return self.seconds - self.elapsed()


def log(message: str) -> None:
    """Progress line, flushed at once (the device tool returns the output's tail)."""
    print(message, flush=True)
