"""Datasets: CT-like synthetic phantoms (no downloads) for tests, demos and experiments."""
from __future__ import annotations

from atso_fast.datasets.synthetic import (
    make_archive,
    make_phantom,
    make_phantom_2d,
    make_phantoms,
    phantom_class_names,
    phantom_num_classes,
)

__all__ = [
    "make_archive",
    "make_phantom",
    "make_phantom_2d",
    "make_phantoms",
    "phantom_class_names",
    "phantom_num_classes",
]
