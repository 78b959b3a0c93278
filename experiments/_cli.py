"""Small helpers shared by the ``experiments`` command lines.

User error ends in ONE line on stderr (``prog: error: <culprit>: <why>``) and exit status 2,
never a traceback: :class:`ArgumentParser` does it for flags, :func:`fail` for everything
found later (files, directories, records).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import NoReturn


# The prog of the command being run: helpers shared between commands (experiments.dpo's
# model loading, used by diagnose and squeeze) then name the command the user typed.
_current_prog: str | None = None


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (no usage block).

    Creating one makes its ``prog`` the default of :func:`fail`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse reads "-1e-4" as an unknown flag (its pattern has no exponent), and a
        # signed radius such as --rho -1e-4 must parse like --rho -0.0001.
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
        global _current_prog
        _current_prog = self.prog

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(message: str, prog: str | None = None) -> NoReturn:
    """Print ``prog: error: message`` on one line to stderr and exit with status 2.

    ``prog`` defaults to the last :class:`ArgumentParser`'s, else the script name.
    """
    prog = prog or _current_prog or Path(sys.argv[0]).name
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(2)


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def finite_float(text: str) -> float:
    """A finite float (any sign)."""
    return _number(float, text)


def nonzero_float(text: str) -> float:
    """A finite, non-zero float (a signed learning rate or radius)."""
    value = _number(float, text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be non-zero, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_at_least(low: int):
    """An argparse type: an integer ``>= low``."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def writable_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Create ``path`` (with parents) and prove it writable by writing a probe file.

    Any failure (a parent that is a regular file, no permission, a read-only file system)
    ends in :func:`fail` naming ``flag`` and the path.
    """
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        fail(f"{flag} {str(out)!r}: not a writable directory ({err.strerror or err})")
    return out
