"""Causal checkpoints made by the original release's own code, converted here: every hidden state compared.

The release's code is not part of this project and is never imported by it. Get it once, outside the checkout::

    git clone https://github.com/nervjack2/Speech-SSL-Compression /tmp/ssc
    mkdir /tmp/release && git -C /tmp/ssc archive 73aa6ab melhubert | tar -x -C /tmp/release
    python benchmarks/check_original_release.py --release-code /tmp/release

For 20/10 ms and post-/pre-LN, a small ``attention_type: causal`` model of that code
(``melhubert/model.py`` of July 2022) with random weights is saved in its format
(``Upstream_Config["hubert"]``), converted with ``melhubert-convert-original`` and run through both on a
padded batch; the table gives the largest difference on real frames per layer and of the final output.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile

import torch

CASES = {
    "20ms-postLN": {},
    "20ms-preLN": {"layer_norm_first": True},
    "10ms-postLN": {"feat_emb_dim": 40},
    "10ms-preLN": {"feat_emb_dim": 40, "layer_norm_first": True},
}
BASE = dict(feat_emb_dim=80, conv_pos=16, conv_pos_groups=4, encoder_layers=3, encoder_embed_dim=64,
            encoder_ffn_embed_dim=128, encoder_attention_heads=4, attention_type="causal", num_cluster=16)


def main() -> int:
    """Run every case and print its differences."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release-code", required=True, help="folder holding the release's melhubert/ package")
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.release_code))
    from melhubert.model import MelHuBERTConfig, MelHuBERTModel  # the release's code
    from fairseq import checkpoint_utils

    import melhubert_fairseq
    from melhubert_fairseq.tools.convert_original_checkpoint import main as convert

    melhubert_fairseq.register_with_fairseq()  # fairseq's loader below rebuilds the plugin's task and model

    print("| case | largest |difference| per layer | final output |\n|---|---|---|")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in CASES.items():
            cfg = {**BASE, **extra}
            torch.manual_seed(0)
            with contextlib.redirect_stdout(io.StringIO()):  # the release's code prints its layer count
                theirs = MelHuBERTModel(MelHuBERTConfig(cfg))
            with torch.no_grad():  # every weight random, LayerNorms included, so no mapping error hides
                for key, param in theirs.named_parameters():
                    offset = 1.0 if key.endswith("layer_norm.weight") else 0.0
                    param.copy_(offset + torch.randn_like(param) / max(param.shape[-1], 1) ** 0.5)
            theirs.eval()
            path = os.path.join(tmp, f"{name}.ckpt")
            torch.save({"model": theirs.state_dict(), "Upstream_Config": {"hubert": cfg}, "Step": 1}, path)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                convert([path, path + ".pt"])
            ours = checkpoint_utils.load_model_ensemble_and_task([path + ".pt"])[0][0].eval()
            feat = torch.randn(2, 37, cfg["feat_emb_dim"])
            real = torch.arange(37)[None] < torch.tensor([37, 25])[:, None]  # the release's pad_mask: True = real
            feat[~real] = 0
            with torch.no_grad():
                last, _, _, _, _, hidden, _ = theirs(feat.clone(), real.long(), get_hidden=True, no_pred=True)
                out = ours.extract_features(feat, padding_mask=~real, mask=False)
            layers = [(a - b)[real].abs().max().item() for a, b in zip(out["layer_results"], hidden)]
            final = (out["x"] - last)[real].abs().max().item()
            worst = max(worst, final, *layers)
            print(f"| {name} | {', '.join(f'{d:.1e}' for d in layers)} | {final:.1e} |")
    print(f"largest difference over all cases: {worst:.1e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
