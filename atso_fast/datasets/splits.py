"""Seeded, interleaved splits of the slices (or slabs) of one volume for semi-supervised experiments.

Contiguous blocks (labelled = one block of slices, test = another) put different anatomy in each
set: the pelvis block holds no liver. An interleaved split cuts the axis into bands and draws,
inside every band, a held-out block (test slices, validation slices, and a guard slice on each
side of every held-out chunk, which no set uses, so that no training slice touches a test slice)
and then labelled and unlabelled slices from the rest of the band. Every band of the volume
therefore contributes to every set, and the draw changes with the seed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["interleaved_split"]


def interleaved_split(
    n: int,
    *,
    bands: int,
    test_chunk: int = 2,
    val_chunk: int = 0,
    labelled_per_band: int = 2,
    guard: int = 1,
    seed: int = 0,
) -> dict[str, list[int]]:
    """Indices ``0..n-1`` split into labelled, unlabelled, validation, test and guard sets.

    Band ``b`` covers ``[edges[b], edges[b+1])`` with ``edges = linspace(0, n, bands + 1)``. Its
    held-out block is ``guard + test_chunk + guard`` slices, followed or preceded (at random) by
    ``val_chunk + guard`` more when ``val_chunk > 0``; it starts at a random offset inside the band.
    ``labelled_per_band`` of the remaining slices are drawn as labelled, the others are unlabelled.

    Args:
        n: number of slices along the axis.
        bands: number of bands (>= 1).
        test_chunk: test slices per band (>= 1).
        val_chunk: validation slices per band (>= 0).
        labelled_per_band: labelled slices per band (>= 1).
        guard: unused slices on each side of a held-out chunk (>= 0).
        seed: the draw.

    Returns:
        ``{"labelled", "unlabelled", "val", "test", "guard"}``: sorted, disjoint lists covering ``0..n-1``.

    Raises:
        ValueError: a band too small for its held-out block, labelled slices and one unlabelled slice.
    """
    if bands < 1 or test_chunk < 1 or val_chunk < 0 or labelled_per_band < 1 or guard < 0:
        raise ValueError(
            f"need bands, test_chunk, labelled_per_band >= 1 and val_chunk, guard >= 0, got "
            f"bands={bands}, test_chunk={test_chunk}, val_chunk={val_chunk}, "
            f"labelled_per_band={labelled_per_band}, guard={guard}"
        )
    rng = np.random.default_rng([int(seed), 17])
    edges = [int(e) for e in np.linspace(0, int(n), int(bands) + 1).astype(int)]
    out: dict[str, list[int]] = {"labelled": [], "unlabelled": [], "val": [], "test": [], "guard": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        block = _held_out_block(test_chunk, val_chunk, guard, bool(rng.integers(2)))
        if hi - lo < len(block) + labelled_per_band + 1:
            raise ValueError(
                f"band [{lo}, {hi}) of {hi - lo} slices cannot hold a held-out block of {len(block)}, "
                f"{labelled_per_band} labelled and one unlabelled slice (n={n}, bands={bands})"
            )
        start = lo + int(rng.integers(hi - lo - len(block) + 1))
        for offset, role in enumerate(block):
            out[role].append(start + offset)
        rest = [i for i in range(lo, hi) if not start <= i < start + len(block)]
        labelled = set(rng.choice(rest, size=labelled_per_band, replace=False).tolist())
        out["labelled"] += sorted(labelled)
        out["unlabelled"] += [i for i in rest if i not in labelled]
    return {k: sorted(v) for k, v in out.items()}


def _held_out_block(test_chunk: int, val_chunk: int, guard: int, val_first: bool) -> list[str]:
    test = ["guard"] * guard + ["test"] * test_chunk + ["guard"] * guard
    if val_chunk == 0:
        return test
    val = ["val"] * val_chunk + ["guard"] * guard
    return val[::-1] + test if val_first else test + val
