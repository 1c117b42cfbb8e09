"""What every ``atso-fast`` command shares: help that shows defaults, one-line errors, a quiet
console (no library warnings unless asked for), and a clean exit when stdout goes away."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

__all__ = ["HelpFormatter", "make_parser", "one_line", "quiet_library_warnings", "silence_stdout"]

_LIBRARIES = r"(torch|torchvision|onnx|onnxruntime|onnxscript|monai|nibabel|ray|numpy)(\.|$)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` to every option's help, unless the help already says it; flags
    show ``off``/``on`` rather than ``False``/``True``, and a ``None`` default is left to the
    help text (which then says what it means, e.g. ``default: all cores``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text or action.default is argparse.SUPPRESS \
                or not action.option_strings or action.default is None:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


class _ExactParser(argparse.ArgumentParser):
    """An option must be spelt out: ``allow_abbrev=False`` alone still lets ``-d`` stand for a
    single-dash long option such as nnU-Net's ``-device`` (Python 3.11)."""

    def _get_option_tuples(self, option_string: str) -> list:  # type: ignore[override]
        tuples = super()._get_option_tuples(option_string)
        # keep exact names and a one-letter option with its value attached (-f0); drop prefixes
        return [t for t in tuples if t[1] in (option_string, option_string[:2]) and len(t[1]) <= len(option_string)]


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Every command's parser: help that shows defaults, and no abbreviations (nnU-Net's ``-d 901``
    must not be taken for ``-device``; a typo is an error, not a guess)."""
    return _ExactParser(prog=prog, description=description, formatter_class=HelpFormatter, allow_abbrev=False)


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


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
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
