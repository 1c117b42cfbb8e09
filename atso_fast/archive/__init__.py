"""Bulk relabelling of an archive: planning, resume, reader/writer threads, the manifest.

Engine-agnostic: any object with ``relabel_volume(array)`` relabels, so this layer sits below the
engine (``atso_fast.engine``), which offers it as ``Relabeler.relabel_archive``; the Ray engine
(``atso_fast.ray_engine``) reuses its planning and per-case steps.
"""

from __future__ import annotations

from atso_fast.archive.pipeline import (
    MANIFEST_NAME,
    Case,
    CaseRecorder,
    Grid,
    VolumeRelabeler,
    check_archive,
    read_input,
    relabel_archive,
    relabel_case,
    run_archive,
)

__all__ = [
    "Case",
    "CaseRecorder",
    "Grid",
    "MANIFEST_NAME",
    "VolumeRelabeler",
    "check_archive",
    "read_input",
    "relabel_archive",
    "relabel_case",
    "run_archive",
]
