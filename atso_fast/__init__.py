"""atso-fast: fast ATSO (asynchronous teacher-student optimisation) for semi-supervised
medical image segmentation, with a native relabel engine."""
from __future__ import annotations

__version__ = "0.1.0"

from atso_fast.export import ModelPackage, PackageError, export_model, load_package  # noqa: E402
from atso_fast.native import build_info, has_cuda  # noqa: E402
from atso_fast.relabel import RelabelResult, Relabeler  # noqa: E402

__all__ = [
    "ModelPackage",
    "PackageError",
    "RelabelResult",
    "Relabeler",
    "build_info",
    "export_model",
    "has_cuda",
    "load_package",
    "__version__",
]


def __getattr__(name: str):
    # The trainer pulls in more of torch; load it only when asked for.
    if name in ("ATSO", "ATSOConfig"):
        from atso_fast.train import atso

        return getattr(atso, name)
    raise AttributeError(f"module 'atso_fast' has no attribute {name!r}")
