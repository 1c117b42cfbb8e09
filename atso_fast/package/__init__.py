"""Model packages: the format, its loader (untrusted input) and the exporter.

``export_model`` needs torch and onnx, imported when it runs; loading a package needs neither.
"""

from __future__ import annotations

from atso_fast.package.export import export_model
from atso_fast.package.model import (
    FORMAT_VERSION,
    ModelPackage,
    PackageError,
    load_package,
    validate_meta,
)

__all__ = ["FORMAT_VERSION", "ModelPackage", "PackageError", "export_model", "load_package", "validate_meta"]
