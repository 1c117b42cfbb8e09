"""The error every package check raises (its own module, so the checks and the format share it)."""

from __future__ import annotations

__all__ = ["PackageError"]


class PackageError(ValueError):
    """A model package is missing, unreadable, inconsistent or unsafe; the message names the file."""
