"""Datasets without downloads: CT-like synthetic phantoms, and the Cityscapes label table, layouts
and procedural driving scenes (natural images), for tests, demos and experiments.

Names load on first use: ``atso-fast relabel`` reads the Cityscapes layout from here and should
not pay for the phantom generator's scipy import on every start.
"""

from __future__ import annotations

from atso_fast import lazy_exports

_EXPORTS = {
    "cityscapes_frames": "atso_fast.datasets.cityscapes",
    "label_ids_to_train_ids": "atso_fast.datasets.cityscapes",
    "plain_frames": "atso_fast.datasets.cityscapes",
    "train_id_colors": "atso_fast.datasets.cityscapes",
    "train_ids_to_label_ids": "atso_fast.datasets.cityscapes",
    "make_driving_cityscapes": "atso_fast.datasets.driving",
    "make_scene": "atso_fast.datasets.driving",
    "make_archive": "atso_fast.datasets.synthetic",
    "make_phantom": "atso_fast.datasets.synthetic",
    "make_phantom_2d": "atso_fast.datasets.synthetic",
    "make_phantoms": "atso_fast.datasets.synthetic",
    "phantom_class_names": "atso_fast.datasets.synthetic",
    "phantom_num_classes": "atso_fast.datasets.synthetic",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
