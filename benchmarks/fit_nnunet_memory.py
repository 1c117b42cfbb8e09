"""nnUNetPredictor's peak RSS against the scan's depth, fitted on the measured points, extended to a
depth it cannot run at here, and set against atso-fast's peak measured at that depth.

Reads the JSON files ``bench_nnunet.py memory --json`` writes (a later file's row replaces an
earlier file's at the same depth and side), fits ``peak = a + b * Z`` by least squares over every
depth where nnU-Net's peak was measured, and prints the slope, the residuals, the extrapolation to
``--depth`` and the ratio to our peak measured there. The extrapolation is a straight line through
measured points, not a measurement.

Usage:
    python benchmarks/fit_nnunet_memory.py benchmarks/results/nnunet_memory_*.json [--depth 400]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

__all__ = ["fit_line", "main", "measured_peaks"]


def measured_peaks(files: list[Path]) -> dict[str, dict[int, tuple[float, str]]]:
    """``{side: {Z: (peak GiB, file name)}}`` of every row with a measured peak."""
    out: dict[str, dict[int, tuple[float, str]]] = {"ours": {}, "nnunet": {}}
    for path in files:
        data = json.loads(path.read_text())
        if data.get("part") != "memory":
            raise ValueError(f"{path}: not a bench_nnunet.py memory result (part {data.get('part')!r})")
        for row in data["rows"]:
            for side, peaks in out.items():
                peak = row.get(side, {}).get("peak_rss_gib")
                if peak is not None:
                    peaks[int(row["shape"][0])] = (float(peak), path.name)
    return out


def fit_line(z: np.ndarray, peak: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Least-squares ``peak = a + b * z``: ``(a, b, residuals)``."""
    if len(z) < 2:
        raise ValueError(f"a line needs measured peaks at 2 or more depths, got {len(z)}")
    b, a = np.polyfit(z, peak, 1)
    return float(a), float(b), peak - (a + b * z)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--depth", type=int, default=400, help="depth Z to extrapolate nnU-Net's peak to")
    args = parser.parse_args(argv)
    peaks = measured_peaks(args.files)
    depths = sorted(peaks["nnunet"])
    z = np.array(depths, np.float64)
    theirs = np.array([peaks["nnunet"][d][0] for d in depths])
    a, b, res = fit_line(z, theirs)
    at = a + b * args.depth
    result = {
        "nnunet_measured": {d: peaks["nnunet"][d] for d in depths},
        "intercept_gib": a,
        "slope_gib_per_slice": b,
        "residuals_gib": dict(zip(depths, res.round(4).tolist())),
        "depth": args.depth,
        "nnunet_extrapolated_gib": at,
    }
    if args.depth in peaks["ours"]:
        ours, source = peaks["ours"][args.depth]
        result.update(ours_measured_gib=ours, ours_source=source, ratio_extrapolated=ours / at)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
