"""What every ``atso-fast`` command shares: help that shows defaults, one-line errors, a quiet
console (no library warnings unless asked for), and a clean exit when stdout goes away."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from atso_fast.cliargs import HelpFormatter, make_parser

__all__ = ["HelpFormatter", "make_parser", "one_line", "parse_or_status", "quiet_library_warnings", "silence_stdout"]

_LIBRARIES = r"(torch|torchvision|onnx|onnxruntime|onnxscript|monai|nibabel|ray|numpy)(\.|$)"


def one_line(message: str) -> str:
    """The first non-empty line of ``message`` (errors are one line on the console)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return lines[0] if lines else "unknown error"


def quiet_library_warnings() -> None:
    """Hide third-party deprecation chatter and library ``UserWarning``s on the console, unless
    the user asked for warnings (``python -W ...`` or ``PYTHONWARNINGS``). Our own warnings
    (``RuntimeWarning``: say, ``auto`` running one runtime because the other did not load) stay,
    printed as one line each."""
    warnings.formatwarning = _one_line_warning
    if sys.warnoptions:
        return
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=_LIBRARIES)


def _one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """Warnings on the console as one line, ``atso-fast: warning: ...`` (no source line)."""
    return f"atso-fast: warning: {message}\n"


def silence_stdout() -> None:
    """Point stdout at the null device: its reader went away (``atso-fast -h | head``), and
    Python's flush at exit must not fail with a ``BrokenPipeError`` traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file descriptor (captured stdout)
        pass


def parse_or_status(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status argparse chose (``--help``: 0, a usage error: 2)."""
    try:
        return parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
