"""Console-script behaviour shared by every tool in tools/."""
import functools
import pickle
import sys
from typing import Callable, List, Optional

from melhubert_fairseq.errors import InputError

#: What bad input raises in this project: messages already name the file, utterance and problem.
#: InputError is the project's own; ValueError/OSError stay for library errors that name a file.
USER_ERRORS = (InputError, ValueError, OSError, pickle.UnpicklingError)


def format_user_error(err: BaseException) -> str:
    """The one ``error: ...`` line for a user error (a multi-line message is joined into one line)."""
    message = " ".join(part.strip() for part in str(err).splitlines() if part.strip())
    return f"error: {message or type(err).__name__}"


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
            print(format_user_error(err), file=sys.stderr)
            return 2
        return result if isinstance(result, int) else 0

    return wrapper
