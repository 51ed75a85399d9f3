"""Console-script behaviour shared by every tool in tools/."""
import argparse
import contextlib
import functools
import os
import sys
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TypeVar

from tqdm import tqdm

from melhubert_fairseq.data.features import FBANK_FRAME_RATE_HZ
from melhubert_fairseq.data.frame_rates import LABEL_RATE_HELP
from melhubert_fairseq.disk_full import DiskFullError
from melhubert_fairseq.errors import InputError

T = TypeVar("T")

#: Set to 1 to see the traceback of a user error too (a bug always keeps its traceback).
TRACEBACK_ENV = "MELHUBERT_TRACEBACK"


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is the user's mistake, printed as one ``error:`` line: an :class:`InputError` (every
    check of this project raises it), or a file problem the operating system names (missing, already there,
    disk full, not permitted). Anything else is a bug and keeps its traceback."""
    if isinstance(err, (InputError, FileNotFoundError, FileExistsError, DiskFullError)):
        return True
    return isinstance(err, OSError) and err.filename is not None


def format_user_error(err: BaseException) -> str:
    """The one ``error: ...`` line for a user error (a multi-line message is joined into one line)."""
    message = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return f"error: {message or type(err).__name__}"


@contextlib.contextmanager
def progress_bar(**tqdm_args) -> Iterator[tqdm]:
    """``with tqdm(...) as bar`` whose bar is erased, not drawn once more, when the block raises: the
    ``error:`` line then stands alone instead of following a half-drawn bar."""
    bar = tqdm(**tqdm_args)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


def with_progress(iterable: Iterable[T], **tqdm_args) -> Iterator[T]:
    """``tqdm(iterable, ...)`` whose bar stays when the loop completes and is erased when it stops early
    (bad input raised inside it, or the caller left the loop)."""
    # Not tqdm's own iterator: the loop's unwinding closes that one, and so draws the bar once more,
    # before any handler could ask for the bar to be erased.
    if "total" not in tqdm_args and hasattr(iterable, "__len__"):
        tqdm_args["total"] = len(iterable)
    with progress_bar(**tqdm_args) as bar:
        for item in iterable:
            yield item
            bar.update()


def set_torch_threads(parser: argparse.ArgumentParser, threads: Optional[int], flag: str = "--threads") -> None:
    """Check a tool's ``--threads`` value (>= 1, or None for torch's default) and give torch that many."""
    if threads is None:
        return
    if threads < 1:
        parser.error(f"{flag} must be >= 1")
    import torch  # here: --help and flag errors need no torch

    torch.set_num_threads(threads)


def console_main(main: Callable) -> Callable:
    """Wrap a tool's ``main(argv)``: from the command line (argv None), user errors print as one
    ``error: ...`` line with exit code 2 instead of a traceback, and success exits 0 whatever
    ``main`` returns. Called with an argv list (tests, other tools) it behaves exactly like ``main``."""

    @functools.wraps(main)
    def wrapper(argv: Optional[List[str]] = None):
        if argv is not None:
            return main(argv)
        try:
            result = main(None)
        except Exception as err:
            if not is_user_error(err) or os.environ.get(TRACEBACK_ENV) == "1":
                raise
            print(format_user_error(err), file=sys.stderr)
            return 2
        return result if isinstance(result, int) else 0

    return wrapper


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """The --num-classes and --label-rate flags shared by the label-writing tools."""
    parser.add_argument("--num-classes", type=int, default=512, help="number of clusters K; labels must be in [0, K)")
    parser.add_argument("--label-rate", type=float, default=float(FBANK_FRAME_RATE_HZ), help=LABEL_RATE_HELP)


def report_skipped(problems: Sequence[str]) -> None:
    """One ``skipped: ...`` line on stderr per thing a tool left out (a label import with --skip-missing)."""
    for problem in problems:
        print(f"skipped: {problem}", file=sys.stderr)


def summary_line(action: str, utterances: int, frames: int, seconds: float, written: Dict[str, str]) -> str:
    """Closing line of every import tool: utterances, hours, frames, time taken and the files written."""
    hours = frames / FBANK_FRAME_RATE_HZ / 3600
    outputs = "; ".join(f"{kind}: {path}" for kind, path in written.items())
    return f"{action} {utterances} utterances, {hours:.2f} h ({frames} frames) in {seconds:.1f} s -> {outputs}"
