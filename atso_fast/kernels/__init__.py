"""Native kernels (``atso_fast._C``) behind validated wrappers, and their NumPy oracle.

The bottom layer of the package: it imports nothing else from ``atso_fast``.
"""

from __future__ import annotations

from atso_fast.kernels import native, reference

__all__ = ["native", "reference"]
