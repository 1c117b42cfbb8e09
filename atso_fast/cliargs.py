"""Argument parsers of every ``atso-fast`` command (also the commands that live below ``cli``:
``bench``, ``train``): help that shows defaults, and options spelt out in full."""

from __future__ import annotations

import argparse

__all__ = ["HelpFormatter", "make_parser"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: X)`` to every option's help,
    unless the help already says it; flags
    show ``off``/``on`` rather than ``False``/``True``, and a ``None`` default is left to the
    help text (which then says what it means, e.g. ``default: all cores``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "default" in text
            or action.default is argparse.SUPPRESS
            or not action.option_strings
            or action.default is None
        ):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


class _ExactParser(argparse.ArgumentParser):
    """An option must be spelt out: ``allow_abbrev=False`` alone still lets ``-d`` stand for a
    single-dash long option such as nnU-Net's ``-device`` (Python 3.11)."""

    def _get_option_tuples(self, option_string: str) -> list:
        tuples = super()._get_option_tuples(option_string)
        # keep exact names and a one-letter option with its value attached (-f0); drop prefixes
        return [t for t in tuples if t[1] in (option_string, option_string[:2]) and len(t[1]) <= len(option_string)]


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Every command's parser: help that shows defaults, and no abbreviations (nnU-Net's ``-d 901``
    must not be taken for ``-device``; a typo is an error, not a guess)."""
    return _ExactParser(prog=prog, description=description, formatter_class=HelpFormatter, allow_abbrev=False)
