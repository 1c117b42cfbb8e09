"""The preprocessing spec of a model package (``model.json``): how a scan reaches the network's
grid and how the network's output goes back to the scan's grid.

Fields (all optional; a package without them runs at the scan's own resolution as before)::

    "spacing": [z, y, x] | [y, x] (2D models: z kept) | null     target spacing, mm, of the
                                  network's axes (after "transpose")
    "class_names": [C names] | null
    "mirror_axes": [axes] | null  spatial axes test-time mirroring may flip (nnU-Net's
                                  inference_allowed_mirroring_axes; null: all)
    "preprocessing": {
        "orientation": "as-stored" | "RAS",   nnU-Net's way, or MONAI/TotalSegmentator's canonical
        "transpose": [a, b, c] | null,        nnU-Net's transpose_forward (after orientation)
        "crop_to_nonzero": false | true,      nnU-Net's crop to the nonzero bounding box
        "resampling": {"data_order": 3, "data_order_z": 0, "probabilities_order": 1,
                       "probabilities_order_z": 0, "separate_z": null | true | false,
                       "anisotropy_threshold": 3.0},   nnU-Net's resampling and anisotropy rule
        "grid": "monai" | "nnunet"            window grid and gaussian profile
    }

:func:`check_fields` validates them; the engine (``atso_fast.engine.preprocess``) applies them.
"""

from __future__ import annotations

import copy
import math
from typing import Any

__all__ = ["ORIENTATIONS", "GRIDS", "default_preprocessing", "check_preprocessing", "check_fields"]

ORIENTATIONS = ("as-stored", "RAS")
GRIDS = ("monai", "nnunet")
_RESAMPLING = {
    "data_order": 3,
    "data_order_z": 0,
    "probabilities_order": 1,
    "probabilities_order_z": 0,
    "separate_z": None,
    "anisotropy_threshold": 3.0,
}
_DEFAULTS = {
    "orientation": "as-stored",
    "transpose": None,
    "crop_to_nonzero": False,
    "resampling": _RESAMPLING,
    "grid": "monai",
}


def default_preprocessing() -> dict[str, Any]:
    """A complete spec with every default (as-stored, no transpose or crop, nnU-Net's resampling
    orders, MONAI grid)."""
    return copy.deepcopy(_DEFAULTS)


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def _order(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 5:
        raise _fail(where, f"preprocessing.resampling.{name} must be a spline order 0..5, got {value!r}")
    return value


def _check_resampling(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return dict(_RESAMPLING)
    if not isinstance(value, dict) or set(value) - set(_RESAMPLING):
        raise _fail(where, f"preprocessing.resampling must be an object with keys {sorted(_RESAMPLING)}, got {value!r}")
    out = {**_RESAMPLING, **value}
    for key in ("data_order", "data_order_z", "probabilities_order", "probabilities_order_z"):
        out[key] = _order(out[key], key, where)
    if out["probabilities_order"] > 1 or out["probabilities_order_z"] > 1:
        raise _fail(
            where,
            "preprocessing.resampling probabilities orders must be 0 or 1 (the output is "
            f"resampled row by row), got {value!r}",
        )
    if out["separate_z"] not in (None, True, False):
        raise _fail(
            where, f"preprocessing.resampling.separate_z must be null, true or false, got {out['separate_z']!r}"
        )
    thr = out["anisotropy_threshold"]
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not math.isfinite(thr) or thr <= 0:
        raise _fail(where, f"preprocessing.resampling.anisotropy_threshold must be a positive number, got {thr!r}")
    out["anisotropy_threshold"] = float(thr)
    return out


def check_preprocessing(value: Any, spatial_dims: int, where: str) -> dict[str, Any]:
    """A complete, validated copy of a ``preprocessing`` object (``None``: the defaults).

    Raises:
        ValueError: naming ``where`` and the field.
    """
    if value is None:
        return default_preprocessing()
    if not isinstance(value, dict) or set(value) - set(_DEFAULTS):
        raise _fail(where, f"preprocessing must be an object with keys {sorted(_DEFAULTS)}, got {value!r}")
    out = {**default_preprocessing(), **copy.deepcopy(value)}
    if out["orientation"] not in ORIENTATIONS:
        raise _fail(where, f"preprocessing.orientation must be one of {ORIENTATIONS}, got {out['orientation']!r}")
    if out["transpose"] is not None:
        t = out["transpose"]
        if not isinstance(t, list) or sorted(t) != [0, 1, 2] or any(isinstance(a, bool) for a in t):
            raise _fail(where, f"preprocessing.transpose must be a permutation of [0, 1, 2] or null, got {t!r}")
        out["transpose"] = None if t == [0, 1, 2] else [int(a) for a in t]
    if not isinstance(out["crop_to_nonzero"], bool):
        raise _fail(where, f"preprocessing.crop_to_nonzero must be true or false, got {out['crop_to_nonzero']!r}")
    out["resampling"] = _check_resampling(out["resampling"], where)
    if out["grid"] not in GRIDS:
        raise _fail(where, f"preprocessing.grid must be one of {GRIDS}, got {out['grid']!r}")
    return out


def _check_spacing(value: Any, spatial_dims: int, where: str) -> list[float] | None:
    if value is None:
        return None
    sizes = (3,) if spatial_dims == 3 else (2, 3)
    ok = (
        isinstance(value, (list, tuple))
        and len(value) in sizes
        and all(not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in value)
    )
    if not ok:
        want = "3" if spatial_dims == 3 else "2 (in-plane) or 3"
        raise _fail(where, f"spacing must be {want} positive numbers (mm) or null, got {value!r}")
    return [float(v) for v in value]


def _check_names(value: Any, num_classes: int, where: str) -> list[str] | None:
    if value is None:
        return None
    count = max(num_classes, 2)  # one sigmoid channel names background and foreground
    if (
        not isinstance(value, (list, tuple))
        or len(value) not in (num_classes, count)
        or not all(isinstance(v, str) for v in value)
    ):
        raise _fail(where, f"class_names must be {num_classes} strings (one per class) or null, got {value!r}")
    return list(value)


def _check_mirror(value: Any, spatial_dims: int, where: str) -> list[int] | None:
    if value is None:
        return None
    ok = (
        isinstance(value, (list, tuple))
        and all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < spatial_dims for a in value)
        and len(set(value)) == len(value)
    )
    if not ok:
        raise _fail(where, f"mirror_axes must be distinct spatial axes in [0, {spatial_dims}) or null, got {value!r}")
    return sorted(int(a) for a in value)


def check_fields(meta: dict[str, Any], spatial_dims: int, num_classes: int, where: str) -> dict[str, Any]:
    """The validated ``spacing``, ``class_names``, ``mirror_axes`` and ``preprocessing`` of a
    ``model.json`` object (missing ones get their defaults).

    Raises:
        ValueError: naming ``where`` and the field.
    """
    return {
        "spacing": _check_spacing(meta.get("spacing"), spatial_dims, where),
        "class_names": _check_names(meta.get("class_names"), num_classes, where),
        "mirror_axes": _check_mirror(meta.get("mirror_axes"), spatial_dims, where),
        "preprocessing": check_preprocessing(meta.get("preprocessing"), spatial_dims, where),
    }
