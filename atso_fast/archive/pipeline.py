"""Bulk relabelling of an archive of volumes, and the ``atso-fast relabel`` command.

Data flow (one process; several processes can share an output folder with ``num_parts``)::

    list inputs -> part split -> plan names -> skip finished (resume)
      -> reader threads: read_volume (gunzip with isal)   look-ahead readers + queue_size
      -> main thread: relabeler.relabel_volume(array)     the runtime stays busy
      -> writer threads: gzip + atomic writes, then one manifest row per case

Crash safety: outputs are written atomically and a case's ``ok`` row is appended only after all
its outputs are renamed into place, so after ``kill -9`` a resumed run redoes exactly the cases
without an ``ok`` row, and its outputs equal those of an uninterrupted run byte for byte.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from atso_fast.io import (
    InputError,
    Manifest,
    VolumeMeta,
    format_for,
    input_root,
    is_temp_name,
    list_inputs,
    output_path,
    read_volume,
    select_part,
    write_confidence,
    write_labels,
)
from atso_fast.io import (
    case_id as make_case_id,
)

__all__ = ["Case", "CaseRecorder", "Grid", "MANIFEST_NAME", "VolumeRelabeler", "relabel_archive", "relabel_case",
           "run_archive"]

MANIFEST_NAME = "manifest.jsonl"
"""File name of the manifest inside the output folder."""


@dataclass
class Case:
    """One input and the outputs planned for it (``error`` set when planning refused it)."""

    case_id: str
    path: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None


class VolumeRelabeler(Protocol):
    """What the archive needs from an engine (``atso_fast.engine.Relabeler`` is one).

    ``relabel_volume(array)`` takes ``(Z, Y, X)`` or ``(M, Z, Y, X)`` and returns a result with
    ``labels`` ``(Z, Y, X)`` uint8/uint16, ``confidence`` ``(Z, Y, X)`` uint8 and a ``stats`` dict
    (``label_counts``, ``ignored_fraction``, ``mean_confidence``). An optional ``runtime_label``
    string is reported in the summary; an engine with ``takes_geometry = True`` is also given the
    scan's ``spacing`` and ``affine`` (from the file) as keyword arguments.
    """

    def relabel_volume(self, array: np.ndarray) -> Any: ...


class Grid(Protocol):
    """The part of a :class:`~atso_fast.io.VolumeMeta` a recorder reads."""

    @property
    def spatial_shape(self) -> tuple[int, ...]: ...


@runtime_checkable
class CaseRecorder(Protocol):
    """Where an engine records what happened to each case (the contract between
    :func:`run_archive` and the engines that process cases: the threaded pipeline here, whose
    recorder writes the manifest, and a Ray actor's per-case stand-in in ``atso_fast.ray_engine``).

    ``ok`` is called once a case's outputs are all in place, ``fail`` with a one-line message
    naming the file and the problem; ``busy`` accumulates seconds inside ``relabel_volume``
    under ``lock``.
    """

    lock: threading.Lock
    busy: float

    def ok(self, case: Case, meta: Grid, stats: Mapping[str, Any], seconds: float) -> None: ...

    def fail(self, case: Case, message: str, shape: Sequence[int] | None = None) -> None: ...


class _Tally:
    """Thread-safe counters, the failure list and the progress bar of one run."""

    def __init__(self, manifest: Manifest, output_dir: Path, bar: Any) -> None:
        self.manifest, self.output_dir, self.bar = manifest, output_dir, bar
        self.lock = threading.Lock()
        self.done = self.failed = self.voxels = 0
        self.busy = 0.0
        self.failures: list[tuple[str, str]] = []
        self.start = time.perf_counter()

    def ok(self, case: Case, meta: Grid, stats: Mapping[str, Any], seconds: float) -> None:
        """Record a finished case: manifest row first, then counters and progress."""
        outputs = {k: Path(os.path.relpath(p, self.output_dir)).as_posix()
                   for k, p in case.outputs.items()}
        self.manifest.append({
            "case_id": case.case_id, "input": str(case.path), "status": "ok",
            "shape": list(meta.spatial_shape), "seconds": round(seconds, 6),
            "label_counts": stats.get("label_counts"),
            "ignored_fraction": stats.get("ignored_fraction"),
            "mean_confidence": stats.get("mean_confidence"), "outputs": outputs, "error": None,
            "spacing": stats.get("spacing"), "timings": stats.get("timings"),
        })
        with self.lock:
            self.done += 1
            self.voxels += math.prod(meta.spatial_shape)
            self._advance()

    def fail(self, case: Case, message: str, shape: Sequence[int] | None = None) -> None:
        """Record a failed case: manifest row, one line on stderr, counters."""
        message = " ".join(str(message).split()) or "unknown error"
        try:
            self.manifest.append({"case_id": case.case_id, "input": str(case.path),
                                  "status": "failed", "shape": shape, "outputs": {},
                                  "error": message})
        finally:
            line = f"atso-fast relabel: case {case.case_id} failed: {message}"
            with self.lock:
                self.failed += 1
                self.failures.append((case.case_id, message))
                if self.bar is not None:
                    self.bar.write(line, file=sys.stderr)
                else:
                    print(line, file=sys.stderr, flush=True)
                self._advance()

    def _advance(self) -> None:
        if self.bar is not None:
            rate = self.voxels / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate / 1e6:.3g} Mvox/s", refresh=False)
            self.bar.update(1)


# ------------------------------------------------------------------------------ public API
def relabel_archive(relabeler: Any, inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                    output_dir: str | os.PathLike[str], *, recursive: bool = False,
                    resume: bool = False, num_parts: int = 1, part_id: int = 0,
                    save_confidence: bool = False, readers: int = 2, writers: int = 2,
                    queue_size: int = 2, progress: bool | None = None) -> dict[str, Any]:
    """Relabel every volume of an archive and write label maps plus a JSONL manifest.

    Outputs go to ``output_dir/<case_id>.nii.gz`` for NIfTI inputs (input affine and header,
    uint8 or uint16), ``.npy``/``.npz`` for numpy inputs, optionally ``<case_id>_confidence.*``,
    and one ``manifest.jsonl`` row per case. A failing case (unreadable or corrupt file,
    relabel error, write error) becomes a ``failed`` row and one stderr line; the run goes on.

    Args:
        relabeler: any object with ``relabel_volume(array) -> result`` where ``array`` is
            ``(Z, Y, X)`` or ``(M, Z, Y, X)`` and ``result`` has ``labels`` ``(Z, Y, X)``
            uint8/uint16, ``confidence`` ``(Z, Y, X)`` uint8 and a ``stats`` dict
            (``label_counts``, ``ignored_fraction``, ``mean_confidence``).
        inputs: a folder, a list file (``.txt``/``.lst``), one image, or a sequence of images
            (case ids relative to their common folder); see :func:`atso_fast.io.list_inputs`.
        output_dir: created if needed; inputs inside it are ignored when ``inputs`` is a parent
            folder, and no output may overwrite an input or leave this folder.
        recursive: descend into sub-folders of a folder input.
        resume: skip cases whose last manifest row is ``ok`` and whose outputs exist;
            failed cases are retried.
        num_parts: split the sorted inputs round robin into this many parts ...
        part_id: ... and process only this one (``0 <= part_id < num_parts``).
        save_confidence: also write the uint8 confidence map.
        readers: reader threads (decode ahead of the relabeler).
        writers: writer threads (compress and write behind it).
        queue_size: decoded volumes waiting for the relabeler beyond those being read; also
            bounds finished results waiting for a writer. Memory stays bounded by these.
        progress: tqdm bar on stderr; ``None`` means only when stderr is a terminal.

    Returns:
        Summary dict: ``total, done, skipped, failed, seconds, cases_per_s, voxels_per_s,
        busy_fraction`` (time inside ``relabel_volume`` / wall time), ``failures``
        (list of ``(case_id, error)``) and ``runtime`` (the relabeler's ``runtime_label`` at
        the end, when it has one: which runtime ``auto`` chose).

    Raises:
        InputError: ``inputs`` does not exist or cannot be listed.
        ValueError: invalid ``num_parts``/``part_id``/thread counts.
        TypeError: ``relabeler`` has no ``relabel_volume``.
    """
    _check_options(relabeler, readers=readers, writers=writers, queue_size=queue_size)
    process = partial(_pipeline, relabeler, readers=readers, writers=writers, queue_size=queue_size)
    summary = run_archive(process, inputs, output_dir, recursive=recursive, resume=resume,
                          num_parts=num_parts, part_id=part_id, save_confidence=save_confidence,
                          progress=progress)
    label = getattr(relabeler, "runtime_label", None)  # optional (VolumeRelabeler)
    if label:
        summary["runtime"] = label
    return summary


def run_archive(process: Callable[[list[Case], CaseRecorder], None],
                inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                output_dir: str | os.PathLike[str], *, recursive: bool = False,
                resume: bool = False, num_parts: int = 1, part_id: int = 0,
                save_confidence: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Plan, resume and record an archive run around an engine's ``process(cases, tally)``.

    The engine-independent part of :func:`relabel_archive` (planning, part split, resume, stale
    temp removal, planning failures, manifest, progress bar, summary), so every engine (the
    threaded pipeline here, ``atso_fast.ray_engine``) has the same semantics. ``process`` gets
    the cases still to do and must record each one with ``tally.ok(case, meta, stats, seconds)``
    or ``tally.fail(case, message, shape)``; ``meta`` needs only ``spatial_shape``. Arguments
    and return value are those of :func:`relabel_archive`.
    """
    output_dir = Path(output_dir)
    cases = _plan(inputs, output_dir, recursive=recursive, num_parts=num_parts,
                  part_id=part_id, save_confidence=save_confidence)
    output_dir.mkdir(parents=True, exist_ok=True)
    with Manifest(output_dir / MANIFEST_NAME) as manifest:
        todo = _pending(cases, manifest, output_dir) if resume else cases
        _remove_stale_temps(todo)
        with _progress_bar(progress, len(cases), len(cases) - len(todo)) as bar:
            tally = _Tally(manifest, output_dir, bar)
            for case in (c for c in todo if c.error is not None):
                tally.fail(case, case.error or "cannot plan outputs")
            process([c for c in todo if c.error is None], tally)
    return _summary(tally, total=len(cases), skipped=len(cases) - len(todo))


def relabel_case(relabeler: Any, case_id: str, path: str | os.PathLike[str],
                 outputs: Mapping[str, str | os.PathLike[str]], tally: CaseRecorder) -> None:
    """Read, relabel and write one planned case in this thread (a Ray actor's unit of work).

    Same steps, error messages and write order as the threaded pipeline; the outcome goes to
    ``tally.ok`` / ``tally.fail`` (``tally`` also needs ``lock`` and a float ``busy``).
    ``outputs`` maps ``"labels"`` (and optionally ``"confidence"``) to the planned files.
    """
    case = Case(case_id, Path(path), {k: Path(v) for k, v in outputs.items()})
    read: Future = Future()
    try:
        read.set_result(read_volume(case.path))
    except Exception as exc:  # reported by _take exactly as a reader thread's error
        read.set_exception(exc)
    loaded = _take(case, read, tally)
    if loaded is None:
        return
    result, seconds = _relabel(relabeler, case, loaded, tally)
    if result is not None:
        _write_case(case, loaded[1], result, seconds, tally, threading.Semaphore(0))


def _check_options(relabeler: Any, **counts: int) -> None:
    if not callable(getattr(relabeler, "relabel_volume", None)):
        raise TypeError(f"relabeler must have a relabel_volume(array) method, got {type(relabeler).__name__}")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _summary(tally: _Tally, *, total: int, skipped: int) -> dict[str, Any]:
    seconds = time.perf_counter() - tally.start
    return {
        "total": total, "done": tally.done, "skipped": skipped, "failed": tally.failed,
        "seconds": seconds,
        "cases_per_s": tally.done / seconds if seconds > 0 else 0.0,
        "voxels_per_s": tally.voxels / seconds if seconds > 0 else 0.0,
        "busy_fraction": min(tally.busy / seconds, 1.0) if seconds > 0 else 0.0,
        "failures": list(tally.failures),
    }


# -------------------------------------------------------------------------------- planning
def _collect(inputs: Any, output_dir: Path, recursive: bool) -> tuple[list[Path], Path]:
    """Input paths and the root their case ids are relative to."""
    if isinstance(inputs, (str, os.PathLike)):
        paths, root = list_inputs(inputs, recursive=recursive), input_root(inputs)
        real_out, real_root = os.path.realpath(output_dir), os.path.realpath(root)
        if Path(inputs).is_dir() and real_out != real_root:  # skip earlier outputs in a subfolder
            paths = [p for p in paths
                     if os.path.commonpath([os.path.realpath(p), real_out]) != real_out]
        return paths, root
    paths = [Path(p) for p in inputs]
    parents = [os.path.abspath(p.parent) for p in paths]
    return paths, Path(os.path.commonpath(parents)) if parents else Path.cwd()


def _plan(inputs: Any, output_dir: Path, *, recursive: bool, num_parts: int, part_id: int,
          save_confidence: bool) -> list[Case]:
    """Cases of this part with their output paths; name clashes become planning errors."""
    all_paths, root = _collect(inputs, output_dir, recursive)
    paths = select_part(all_paths, num_parts, part_id)
    all_inputs = frozenset(os.path.realpath(p) for p in all_paths)
    owners: dict[str, str] = {}
    cases = []
    for path in paths:
        case = _plan_case(path, root, output_dir, save_confidence, all_inputs)
        clash = next((owners[os.path.realpath(p)] for p in case.outputs.values()
                      if os.path.realpath(p) in owners), None)
        if clash is not None:  # report under the input path so the owner's rows stay clean
            case = Case(str(path), path, error=f"{path}: output name clashes with case {clash}")
        for out in case.outputs.values():
            owners[os.path.realpath(out)] = case.case_id
        cases.append(case)
    return cases


def _plan_case(path: Path, root: Path, output_dir: Path, save_confidence: bool,
               all_inputs: frozenset[str]) -> Case:
    try:
        cid = make_case_id(path, root)
    except InputError as exc:
        return Case(path.name, path, error=str(exc))
    try:
        suffix = format_for(path).output_suffix  # confidence maps add _confidence before it
        outputs = {"labels": output_path(output_dir, cid, suffix, inputs=all_inputs)}
        if save_confidence:
            outputs["confidence"] = output_path(output_dir, cid, "_confidence" + suffix,
                                                inputs=all_inputs)
    except InputError as exc:
        return Case(cid, path, error=str(exc))
    except ValueError as exc:
        return Case(cid, path, error=f"{path}: {exc}")
    return Case(cid, path, outputs)


def _pending(cases: list[Case], manifest: Manifest, output_dir: Path) -> list[Case]:
    """Cases still to do: not finished in the manifest with the same output files present."""
    finished = manifest.completed()
    todo = []
    for case in cases:
        row = finished.get(case.case_id) if case.error is None else None
        recorded = row.get("outputs", {}) if row else {}
        wanted = {k: Path(os.path.relpath(p, output_dir)).as_posix() for k, p in case.outputs.items()}
        if not row or any(recorded.get(k) != v for k, v in wanted.items()):
            todo.append(case)
    return todo


def _remove_stale_temps(cases: list[Case]) -> None:
    """Delete temp files a killed run left for outputs this run is about to write."""
    targets: dict[Path, set[str]] = {}
    for case in cases:
        for out in case.outputs.values():
            targets.setdefault(out.parent, set()).add(out.name)
    for folder, names in targets.items():
        try:
            entries = [e.name for e in os.scandir(folder)]
        except OSError:
            continue
        for name in entries:
            if is_temp_name(name) and name[1:name.rindex(".atso-")] in names:
                (folder / name).unlink(missing_ok=True)


# -------------------------------------------------------------------------------- pipeline
def _pipeline(relabeler: VolumeRelabeler, cases: list[Case], tally: _Tally, *, readers: int,
              writers: int, queue_size: int) -> None:
    """Read ahead on ``readers`` threads, relabel here, write on ``writers`` threads."""
    slots = threading.BoundedSemaphore(writers + queue_size)
    feed = iter(cases)
    pending: deque[tuple[Case, Future]] = deque()
    with ThreadPoolExecutor(readers, "atso-read") as read_pool, \
            ThreadPoolExecutor(writers, "atso-write") as write_pool:
        try:
            _top_up(pending, feed, read_pool, readers + queue_size)
            while pending:
                case, future = pending.popleft()
                _top_up(pending, feed, read_pool, readers + queue_size)
                loaded = _take(case, future, tally)
                if loaded is None:
                    continue
                result, seconds = _relabel(relabeler, case, loaded, tally)
                if result is None:
                    continue
                slots.acquire()
                write_pool.submit(_write_case, case, loaded[1], result, seconds, tally, slots)
                del loaded, result
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise


def _top_up(pending: deque, feed: Iterator[Case], pool: ThreadPoolExecutor, depth: int) -> None:
    while len(pending) < depth:
        case = next(feed, None)
        if case is None:
            return
        pending.append((case, pool.submit(read_volume, case.path)))


def _take(case: Case, future: Future, tally: CaseRecorder) -> tuple[np.ndarray, VolumeMeta] | None:
    try:
        return future.result()
    except InputError as exc:
        tally.fail(case, str(exc))
    except Exception as exc:  # anything else a reader can raise (MemoryError, ...)
        tally.fail(case, f"{case.path}: cannot read: {type(exc).__name__}: {exc}")
    return None


def _relabel(relabeler: VolumeRelabeler, case: Case, loaded: tuple[np.ndarray, VolumeMeta],
             tally: CaseRecorder) -> tuple[Any, float]:
    array, meta = loaded
    start = time.perf_counter()
    try:
        result = relabeler.relabel_volume(array, **_geometry(relabeler, meta))
    except Exception as exc:  # one bad case must not stop the archive
        result = None
        tally.fail(case, f"{case.path}: relabel failed: {type(exc).__name__}: {exc}",
                   list(array.shape))
    finally:
        seconds = time.perf_counter() - start
        with tally.lock:
            tally.busy += seconds
    return result, seconds


def _geometry(relabeler: VolumeRelabeler, meta: VolumeMeta) -> dict[str, Any]:
    """The scan's spacing and affine, for engines that resample (``takes_geometry``: the
    ``Relabeler`` does; a plain ``relabel_volume(array)`` gets the array alone)."""
    if not getattr(relabeler, "takes_geometry", False):
        return {}
    return {"spacing": meta.spacing, "affine": meta.affine}


def _write_case(case: Case, meta: VolumeMeta, result: Any, seconds: float, tally: CaseRecorder,
                slots: threading.BoundedSemaphore) -> None:
    """Write a case's outputs atomically, then its ``ok`` row (never the other way round)."""
    try:
        try:
            case.outputs["labels"].parent.mkdir(parents=True, exist_ok=True)
            write_labels(case.outputs["labels"], result.labels, meta)
            if "confidence" in case.outputs:
                if getattr(result, "confidence", None) is None:
                    raise ValueError("the relabeler returned no confidence map")
                write_confidence(case.outputs["confidence"], result.confidence, meta)
            stats = dict(getattr(result, "stats", None) or {})
        except Exception as exc:
            tally.fail(case, f"{case.path}: writing outputs failed: {type(exc).__name__}: {exc}",
                       list(meta.spatial_shape))
            return
        try:
            tally.ok(case, meta, stats, seconds)
        except Exception as exc:  # e.g. disk full while appending the row
            tally.fail(case, f"{case.path}: manifest append failed: {type(exc).__name__}: {exc}")
    finally:
        slots.release()


@contextmanager
def _progress_bar(progress: bool | None, total: int, initial: int) -> Iterator[Any]:
    """A tqdm bar on stderr (cases, cases/s, ETA; Mvox/s as postfix), or ``None``."""
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not progress:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="case", file=sys.stderr, dynamic_ncols=True,
               desc="relabel", smoothing=0.1)
    try:
        yield bar
    finally:
        bar.close()
