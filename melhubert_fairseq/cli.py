"""Console-script behaviour shared by every tool in tools/."""
import functools
import pickle
import sys
from typing import Callable, List, Optional

#: What bad input raises in this project: messages already name the file, utterance and problem.
USER_ERRORS = (ValueError, OSError, pickle.UnpicklingError)


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
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return result if isinstance(result, int) else 0

    return wrapper
