"""Procedural driving scenes with pixel labels, written in the Cityscapes layout (no downloads).

A scene is a camera looking down a street: sky above a horizon, a road in perspective (a
trapezoid to a vanishing point) with dashed lane markings, sidewalks on both sides, terrain and
trees beyond them, a row of buildings with windows, poles with traffic signs, cars on the road
and people on the sidewalks (sized by their distance), and sometimes the ego vehicle's bonnet at
the bottom. Colours get per-class texture, a lighting gradient, and sensor noise. ``domain``
changes the look, never the layout's statistics: ``"day"``, ``"dusk"`` (warm, darker),
``"fog"`` (contrast falls with distance) and ``"night"`` (dark, noisy): a domain-shift test bed.

Labels are Cityscapes labelIds (road 7, sidewalk 8, building 11, pole 17, traffic sign 20,
vegetation 21, terrain 22, sky 23, person 24, car 26, ego vehicle 1), so reading them back
exercises the official labelId -> trainId map. Every scene is a pure function of
``(seed, index, domain, size)``: any frame can be drawn alone and the same one always comes back.
Frames are small by default (128 x 256); a frame takes a few milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atso_fast.datasets.cityscapes import IMAGE_SUFFIX, LABEL_SUFFIX
from atso_fast.io.atomic import atomic_write_bytes
from atso_fast.io.images import encode_png

__all__ = ["DOMAINS", "SceneIds", "make_driving_cityscapes", "make_scene"]


@dataclass(frozen=True)
class SceneIds:
    """The Cityscapes labelIds a scene uses."""

    ego: int = 1
    road: int = 7
    sidewalk: int = 8
    building: int = 11
    pole: int = 17
    sign: int = 20
    vegetation: int = 21
    terrain: int = 22
    sky: int = 23
    person: int = 24
    car: int = 26


IDS = SceneIds()

DOMAINS: Mapping[str, dict[str, float | tuple[float, float, float]]] = {
    "day": {
        "light": 1.0,
        "tint": (1.0, 1.0, 1.0),
        "sky_top": (0.35, 0.55, 0.85),
        "sky_low": (0.7, 0.8, 0.92),
        "fog": 0.0,
        "noise": 0.02,
    },
    "dusk": {
        "light": 0.7,
        "tint": (1.1, 0.85, 0.7),
        "sky_top": (0.3, 0.25, 0.45),
        "sky_low": (0.95, 0.55, 0.3),
        "fog": 0.0,
        "noise": 0.03,
    },
    "fog": {
        "light": 0.95,
        "tint": (0.95, 0.97, 1.0),
        "sky_top": (0.75, 0.77, 0.8),
        "sky_low": (0.8, 0.82, 0.84),
        "fog": 1.6,
        "noise": 0.02,
    },
    "night": {
        "light": 0.3,
        "tint": (0.8, 0.85, 1.1),
        "sky_top": (0.02, 0.02, 0.06),
        "sky_low": (0.08, 0.07, 0.12),
        "fog": 0.0,
        "noise": 0.06,
    },
}
"""Looks: global light, colour tint, sky gradient, fog density (0: none), sensor noise sigma."""


class _Canvas:
    """The picture ``rgb (H, W, 3)`` float in [0, 1] and its labelIds ``(H, W)`` being painted."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = height, width, rng
        self.rgb = np.zeros((height, width, 3), np.float32)
        self.ids = np.zeros((height, width), np.uint8)
        self.rows = np.arange(height, dtype=np.float32)[:, None]
        self.cols = np.arange(width, dtype=np.float32)[None, :]

    def paint(
        self,
        mask: np.ndarray,
        label: int,
        colour,
        texture: float = 0.05,
        box: tuple[slice, slice] = (slice(None), slice(None)),
    ) -> None:
        """``colour`` with multiplicative noise where ``mask`` (of the ``box`` region) is set."""
        if not mask.any():
            return
        region = self.rgb[box]
        noise = 1.0 + texture * self.rng.standard_normal(int(mask.sum()), dtype=np.float32)[:, None]
        region[mask] = np.asarray(colour, np.float32) * noise
        self.ids[box][mask] = label


def _sky_and_ground(c: _Canvas, horizon: float, look: dict) -> None:
    t = np.clip(c.rows / max(horizon, 1.0), 0, 1)[..., None]
    sky = (1 - t) * np.asarray(look["sky_top"], np.float32) + t * np.asarray(look["sky_low"], np.float32)
    c.rgb[:] = np.broadcast_to(sky, c.rgb.shape)
    c.ids[:] = IDS.sky
    below = np.broadcast_to(c.rows >= horizon, (c.h, c.w))
    c.paint(below, IDS.terrain, (0.42, 0.5, 0.3), 0.12)


def _road(c: _Canvas, horizon: float, vx: float, spread: tuple[float, float]) -> None:
    """Road, sidewalks and dashed lane markings below the horizon."""
    dy = c.rows - horizon
    left, right = vx - dy * spread[0], vx + dy * spread[1]
    walk = 0.55 * dy * (spread[0] + spread[1]) / 2
    ground = dy > 0
    c.paint(ground & (c.cols >= left - walk) & (c.cols <= right + walk), IDS.sidewalk, (0.62, 0.58, 0.56), 0.06)
    road = ground & (c.cols >= left) & (c.cols <= right)
    c.paint(road, IDS.road, (0.33, 0.32, 0.34), 0.08)
    depth = 1.0 / np.maximum(dy, 1.0)
    dash = (np.floor(40.0 * depth * c.h / 128 + 0.3) % 2 == 0) & (dy > 2)
    for frac in (0.5, 0.25, 0.75)[: 1 + int(c.rng.integers(0, 3))]:
        centre = left + frac * (right - left)
        width = np.maximum(0.012 * (right - left), 0.6)
        mark = road & dash & (np.abs(c.cols - centre) <= width)
        c.rgb[mark] = 0.9  # markings are road in Cityscapes: colour only


def _buildings(c: _Canvas, horizon: float, vx: float) -> None:
    """A skyline of blocks behind the street, with rows of windows; a gap around the road's end."""
    x, gap = 0, (vx - 0.06 * c.w, vx + 0.06 * c.w)
    base = int(horizon + 0.03 * c.h)
    while x < c.w:
        bw = int(c.rng.integers(c.w // 12, c.w // 5))
        top = int(horizon - c.rng.uniform(0.12, 0.42) * c.h)
        if not gap[0] <= x + bw / 2 <= gap[1]:
            box = (slice(max(top, 0), base), slice(x, min(x + bw, c.w)))
            shade = c.rng.uniform(0.35, 0.7)
            colour = shade * np.asarray((1.0, 0.95, 0.9)) * c.rng.uniform(0.85, 1.1, 3)
            mask = np.ones((box[0].stop - box[0].start, box[1].stop - box[1].start), bool)
            c.paint(mask, IDS.building, colour, 0.05, box)
            rr, cc = np.mgrid[box[0], box[1]]
            windows = ((rr - top) % 7 < 3) & ((cc - x) % 6 < 3) & (rr < base - 3)
            c.rgb[box][windows] *= 0.55
        x += bw


def _trees_and_poles(c: _Canvas, horizon: float, vx: float, spread: tuple[float, float]) -> None:
    for _ in range(int(c.rng.integers(2, 6))):
        side = c.rng.choice((-1, 1))
        cy = horizon + c.rng.uniform(0.0, 0.08) * c.h
        cx = vx + side * c.rng.uniform(0.25, 0.5) * c.w
        r = c.rng.uniform(0.05, 0.12) * c.h
        box = (slice(max(int(cy - 2 * r), 0), min(int(cy + r), c.h)), slice(max(int(cx - r), 0), min(int(cx + r), c.w)))
        rr, cc = c.rows[box[0]], c.cols[:, box[1]]
        crown = ((rr - (cy - r)) / r) ** 2 + ((cc - cx) / (0.8 * r)) ** 2 <= 1
        c.paint(crown, IDS.vegetation, (0.2, 0.38, 0.12), 0.2, box)
    for _ in range(int(c.rng.integers(0, 3))):
        dy = c.rng.uniform(0.2, 0.6) * (c.h - horizon)
        side = c.rng.choice((-1, 1))
        x = vx + side * dy * (spread[0 if side < 0 else 1] * 1.3)
        top, bottom, half = int(horizon + dy - 3.0 * dy), int(horizon + dy), max(dy * 0.03, 0.6)
        pole = (c.rows >= top) & (c.rows < bottom) & (np.abs(c.cols - x) <= half)
        c.paint(pole, IDS.pole, (0.5, 0.5, 0.52), 0.03)
        sign = (np.abs(c.rows - top - 0.15 * dy) <= 0.15 * dy) & (np.abs(c.cols - x) <= 0.18 * dy)
        c.paint(sign, IDS.sign, (0.85, 0.8, 0.1), 0.05)


def _agents(c: _Canvas, horizon: float, vx: float, spread: tuple[float, float]) -> None:
    """Cars on the road and people on the sidewalks, far ones first (near ones occlude them)."""
    agents = [("car", c.rng.uniform(0.08, 0.95)) for _ in range(int(c.rng.integers(1, 5)))]
    agents += [("person", c.rng.uniform(0.1, 0.9)) for _ in range(int(c.rng.integers(0, 4)))]
    for kind, near in sorted(agents, key=lambda a: a[1]):
        dy = near * (c.h - horizon)
        bottom = horizon + dy
        left, right = vx - dy * spread[0], vx + dy * spread[1]
        if kind == "car":
            width = (right - left) * c.rng.uniform(0.22, 0.38)
            x0 = c.rng.uniform(left, max(right - width, left))
            body = (c.rows <= bottom) & (c.rows >= bottom - 0.55 * width) & (c.cols >= x0) & (c.cols <= x0 + width)
            c.paint(body, IDS.car, c.rng.uniform(0.05, 0.9, 3), 0.04)
            glass = (
                body & (c.rows <= bottom - 0.32 * width) & (c.cols >= x0 + 0.12 * width) & (c.cols <= x0 + 0.88 * width)
            )
            c.rgb[glass] *= 0.35
        else:
            height = (right - left) * c.rng.uniform(0.2, 0.3)
            side = c.rng.choice((-1, 1))
            x = (left - 0.28 * dy * spread[0]) if side < 0 else (right + 0.28 * dy * spread[1])
            torso = (np.abs(c.rows - (bottom - 0.45 * height)) <= 0.45 * height) & (np.abs(c.cols - x) <= 0.12 * height)
            head = (c.rows - (bottom - 0.95 * height)) ** 2 + (c.cols - x) ** 2 <= (0.08 * height) ** 2
            c.paint(torso | head, IDS.person, c.rng.uniform(0.1, 0.8, 3), 0.1)


def _ego(c: _Canvas) -> None:
    depth = c.rng.uniform(0.04, 0.1) * c.h
    bonnet = c.rows >= c.h - depth * (1 - 0.5 * ((c.cols - c.w / 2) / (c.w / 2)) ** 2)
    c.paint(bonnet, IDS.ego, (0.12, 0.12, 0.14), 0.05)


def _look(c: _Canvas, horizon: float, look: dict) -> np.ndarray:
    """Lighting, tint, fog by distance and sensor noise; returns uint8 RGB."""
    rgb = c.rgb * np.float32(look["light"]) * np.asarray(look["tint"], np.float32)
    rgb *= (1.0 + 0.15 * (c.cols / c.w - 0.5) * c.rng.uniform(-1, 1))[..., None]  # sun from one side
    if look["fog"]:
        near = np.clip((c.rows - horizon) / max(c.h - horizon, 1.0), 0, 1)  # 0 at the horizon, 1 at the bottom
        keep = np.exp(-float(look["fog"]) * (1.0 - near))[..., None]
        rgb = keep * rgb + (1 - keep) * np.asarray(look["sky_low"], np.float32)
    rgb += float(look["noise"]) * c.rng.standard_normal(rgb.shape, dtype=np.float32)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_scene(
    seed: int = 0, index: int = 0, *, height: int = 128, width: int = 256, domain: str = "day"
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(rgb (H, W, 3) uint8, label_ids (H, W) uint8)`` (Cityscapes labelIds).

    Raises:
        ValueError: an unknown ``domain`` or a frame smaller than 32 x 32.
    """
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    if int(height) < 32 or int(width) < 32:
        raise ValueError(f"a scene needs at least 32 x 32 pixels, got {height} x {width}")
    rng = np.random.default_rng([int(seed), int(index)])
    c = _Canvas(int(height), int(width), rng)
    horizon = rng.uniform(0.36, 0.5) * c.h
    vx = rng.uniform(0.4, 0.6) * c.w
    spread = (rng.uniform(0.9, 1.6) * c.w / c.h, rng.uniform(0.9, 1.6) * c.w / c.h)
    _sky_and_ground(c, horizon, DOMAINS[domain])
    _buildings(c, horizon, vx)
    _road(c, horizon, vx, spread)
    _trees_and_poles(c, horizon, vx, spread)
    _agents(c, horizon, vx, spread)
    if rng.random() < 0.5:
        _ego(c)
    return _look(c, horizon, DOMAINS[domain]), c.ids


def make_driving_cityscapes(
    root: str | os.PathLike[str],
    *,
    splits: Mapping[str, int] | None = None,
    cities: Sequence[str] = ("aachen", "bremen"),
    height: int = 128,
    width: int = 256,
    domain: str = "day",
    seed: int = 0,
) -> Path:
    """Write scenes as a Cityscapes folder: ``ROOT/leftImg8bit/{split}/{city}/{city}_000000_{k:06d}_leftImg8bit.png``
    and ``ROOT/gtFine/{split}/{city}/..._gtFine_labelIds.png`` (atomically); returns ``root``.

    Args:
        splits: frames per split (default ``{"train": 8, "val": 4}``), spread over ``cities`` in turn.
        domain: the look of every frame (see :data:`DOMAINS`).
        seed: frames of split ``s`` are scenes ``(seed, offset + k)``, the splits drawn one after
            the other (so no frame appears in two splits).

    Raises:
        ValueError: an unknown domain, no city, or a negative frame count.
    """
    splits = {"train": 8, "val": 4} if splits is None else dict(splits)
    if not cities or any(not str(city) or "/" in str(city) for city in cities):
        raise ValueError(f"cities must be non-empty folder names, got {list(cities)!r}")
    if any(int(n) < 0 for n in splits.values()):
        raise ValueError(f"frame counts must be >= 0, got {splits}")
    root, offset = Path(root), 0
    for split, count in splits.items():
        for k in range(int(count)):
            city = cities[k % len(cities)]
            rgb, ids = make_scene(seed, offset + k, height=height, width=width, domain=domain)
            stem = f"{city}_000000_{k:06d}"
            for folder, name, data in (("leftImg8bit", stem + IMAGE_SUFFIX, rgb), ("gtFine", stem + LABEL_SUFFIX, ids)):
                where = root / folder / split / city
                where.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(where / name, encode_png(data))
        offset += int(count)
    return root
