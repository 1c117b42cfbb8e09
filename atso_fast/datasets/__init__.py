"""Datasets without downloads: CT-like synthetic phantoms, and the Cityscapes label table, layouts
and procedural driving scenes (natural images), for tests, demos and experiments."""

from __future__ import annotations

from atso_fast.datasets.cityscapes import (
    cityscapes_frames,
    label_ids_to_train_ids,
    plain_frames,
    train_id_colors,
    train_ids_to_label_ids,
)
from atso_fast.datasets.driving import make_driving_cityscapes, make_scene
from atso_fast.datasets.synthetic import (
    make_archive,
    make_phantom,
    make_phantom_2d,
    make_phantoms,
    phantom_class_names,
    phantom_num_classes,
)

__all__ = [
    "cityscapes_frames",
    "label_ids_to_train_ids",
    "make_archive",
    "make_driving_cityscapes",
    "make_phantom",
    "make_phantom_2d",
    "make_phantoms",
    "make_scene",
    "phantom_class_names",
    "phantom_num_classes",
    "plain_frames",
    "train_id_colors",
    "train_ids_to_label_ids",
]
