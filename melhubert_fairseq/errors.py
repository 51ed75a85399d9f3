"""The one exception type for bad user input, and the first check every input file goes through.

Tools raise :class:`InputError` for anything wrong with what the user gave
them (a malformed manifest row, a truncated WAV, int16 features, a std of
1e-40); the message already says ``<file>:<line> (<utterance>): <what>``, so
the console-script wrapper (:func:`melhubert_fairseq.cli.console_main`)
prints it as one ``error:`` line and exits 2. Missing or already existing
files stay ``FileNotFoundError`` / ``FileExistsError`` (what callers and
tests catch); both are user errors to the wrapper too.
"""
from __future__ import annotations

import os
import stat


class InputError(ValueError):
    """Bad user input; the message names the file (line, utterance) and what is wrong with it."""


def check_regular_file(path: str, where: str = "", what: str = "file") -> os.stat_result:
    """``os.stat`` of ``path``, refusing anything but a regular file (or a symlink to one).

    Called before opening an input, so a FIFO, a socket or a device in place
    of a ``.npy`` or audio file is an error instead of a read that blocks
    forever; a folder is an error instead of numpy's or libsndfile's
    confusing message.
    """
    prefix = f"{where}: " if where else ""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{prefix}{what} {path} is missing") from None
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a folder" if stat.S_ISDIR(info.st_mode)
            else "a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode)
            else "a socket" if stat.S_ISSOCK(info.st_mode)
            else "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
            else "not a regular file"
        )
        raise InputError(f"{prefix}{path} is {kind}, expected a regular {what}")
    return info
