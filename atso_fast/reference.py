"""Public name of the NumPy kernel oracle; the code is in :mod:`atso_fast.kernels.reference`."""
from __future__ import annotations

from atso_fast.engine.windows import gaussian_importance
from atso_fast.kernels.reference import (
    accumulate,
    bilinear_rows,
    extract_patches,
    finalize,
    num_label_classes,
)

__all__ = ["accumulate", "bilinear_rows", "extract_patches", "finalize", "gaussian_importance", "num_label_classes"]
