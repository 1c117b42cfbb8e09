"""Public name of the native kernels: ``atso_fast.native.accumulate`` etc.

The kernels live in :mod:`atso_fast.kernels.native`; this module keeps the documented names
(and ``gaussian_importance``, the weight map the kernels take) in one import.
"""
from __future__ import annotations

from atso_fast.engine.windows import gaussian_importance
from atso_fast.kernels.native import (
    FinalizeResult,
    accumulate,
    build_info,
    extract_patches,
    finalize,
    has_cuda,
    has_native,
    kernel_threads,
    resample_finalize,
)

__all__ = ["FinalizeResult", "accumulate", "build_info", "extract_patches", "finalize", "gaussian_importance",
           "has_cuda", "has_native", "kernel_threads", "resample_finalize"]
