"""Print the absolute folder of the installed plugin, for ``common.user_dir=$(melhubert-user-dir)``.

fairseq resolves ``common.user_dir=melhubert_fairseq`` against the current directory first and then
next to its own package: the plain name works from the repository root, or from anywhere with a
regular (non-editable) install. With an editable install run from another directory, or under a
config that changes directory (fairseq's own fine-tuning configs), give this absolute path instead.
"""
import argparse
from typing import List, Optional

import melhubert_fairseq
from melhubert_fairseq.cli import console_main


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (none but --help)."""
    return argparse.ArgumentParser(
        prog="melhubert-user-dir",
        description="Print the absolute path to give fairseq as common.user_dir (or --user-dir).",
    )


@console_main
def main(argv: Optional[List[str]] = None) -> int:
    """Print the plugin's package folder."""
    build_parser().parse_args(argv)
    print(melhubert_fairseq.PACKAGE_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
