"""atso-fast: fast ATSO (asynchronous teacher-student optimisation) for semi-supervised
medical image segmentation, with a native relabel engine.

Public names are loaded on first use, so ``import atso_fast.io`` does not pull in torch or
ONNX, and one broken optional part does not break the others.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelPackage": "atso_fast.package",
    "PackageError": "atso_fast.package",
    "export_model": "atso_fast.package",
    "load_package": "atso_fast.package",
    "import_nnunet": "atso_fast.package.nnunet",
    "build_info": "atso_fast.kernels.native",
    "has_cuda": "atso_fast.kernels.native",
    "RelabelResult": "atso_fast.engine",
    "Relabeler": "atso_fast.engine",
    "relabel_archive": "atso_fast.archive",
    "relabel_archive_ray": "atso_fast.ray_engine",
    "ATSO": "atso_fast.train.atso",
    "ATSOConfig": "atso_fast.train.atso",
}

__all__ = [*_EXPORTS, "__version__"]


def lazy_exports(module: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports each of ``exports`` (name -> defining module) on
    first use and keeps it in ``module``'s namespace."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(importlib.import_module(exports[name]), name)
            setattr(sys.modules[module], name, value)
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
