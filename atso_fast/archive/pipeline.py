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

import io
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from atso_fast.archive.plan import (
    Case,
    check_output_folder,
    check_resume,
    plan_archive,
    remove_stale_temps,
    report_skipped,
    run_lock,
)
from atso_fast.io import (
    InputError,
    Manifest,
    VolumeMeta,
    atomic_write_bytes,
    is_dicom_folder,
    not_regular_error,
    read_volume,
    write_confidence,
    write_labels,
)
from atso_fast.io.naming import channel_index
from atso_fast.io.overlay import write_overlay
from atso_fast.progress import duration

__all__ = [
    "Case",
    "CaseRecorder",
    "Grid",
    "MANIFEST_NAME",
    "VolumeRelabeler",
    "check_archive",
    "relabel_archive",
    "relabel_case",
    "read_input",
    "run_archive",
]

MANIFEST_NAME = "manifest.jsonl"
"""File name of the manifest inside the output folder."""


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

    def __init__(
        self,
        manifest: Manifest,
        output_dir: Path,
        bar: Any,
        fingerprint: str | None = None,
        lines: tuple[int, int] | None = None,
    ) -> None:
        self.manifest, self.output_dir, self.bar, self.fingerprint = manifest, output_dir, bar, fingerprint
        self.lines = lines  # (cases to do, cases in all): a line per case on stderr (no terminal)
        self.lock = threading.Lock()
        self.done = self.failed = self.voxels = 0
        self.busy = 0.0
        self.failures: list[tuple[str, str]] = []
        self.start = time.perf_counter()

    def ok(self, case: Case, meta: Grid, stats: Mapping[str, Any], seconds: float) -> None:
        """Record a finished case: manifest row first, then counters and progress."""
        outputs = {k: Path(os.path.relpath(p, self.output_dir)).as_posix() for k, p in case.outputs.items()}
        self.manifest.append(
            {
                "case_id": case.case_id,
                "input": os.path.abspath(case.path),
                "status": "ok",
                "shape": list(meta.spatial_shape),
                "seconds": round(seconds, 6),
                "label_counts": stats.get("label_counts"),
                "ignored_fraction": stats.get("ignored_fraction"),
                "mean_confidence": stats.get("mean_confidence"),
                "outputs": outputs,
                "error": None,
                "spacing": stats.get("spacing"),
                "timings": stats.get("timings"),
                "run": self.fingerprint,
            }
        )
        with self.lock:
            self.done += 1
            self.voxels += math.prod(meta.spatial_shape)
            self._advance()
            self._line(f"case {case.case_id} ok ({seconds:.1f} s)")

    def fail(self, case: Case, message: str, shape: Sequence[int] | None = None) -> None:
        """Record a failed case: manifest row, one line on stderr, counters."""
        message = " ".join(str(message).split()) or "unknown error"
        unrecorded = ""
        try:
            self.manifest.append(
                {
                    "case_id": case.case_id,
                    "input": os.path.abspath(case.path),
                    "status": "failed",
                    "shape": shape,
                    "outputs": {},
                    "error": message,
                }
            )
        except OSError as exc:  # disk full: the run goes on, the failure is still counted and said
            unrecorded = f" (its manifest row could not be written: {exc.strerror or exc})"
        finally:
            line = f"case {case.case_id} failed: {message}{unrecorded}"
            with self.lock:
                self.failed += 1
                self.failures.append((case.case_id, message))
                if self.lines is not None:  # the failure, with the count and ETA, in one line
                    self._line(line)
                elif self.bar is not None:
                    self.bar.write(f"atso-fast relabel: {line}", file=sys.stderr)
                else:
                    print(f"atso-fast relabel: {line}", file=sys.stderr, flush=True)
                self._advance()

    def _line(self, what: str) -> None:
        """nnU-Net prints every case: with stderr in a file (nohup, SLURM) a bar shows nothing,
        so one line per case, with the count and an ETA from the pace so far."""
        if self.lines is None:
            return
        todo, total = self.lines
        finished = self.done + self.failed
        elapsed = time.perf_counter() - self.start
        eta = elapsed / finished * (todo - finished) if finished else 0.0
        print(
            f"atso-fast relabel: [{finished}/{todo}{f' of {total}' if total != todo else ''}] {what}; "
            f"{elapsed:.0f} s elapsed, ETA {duration(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def _advance(self) -> None:
        if self.bar is not None:
            rate = self.voxels / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{rate / 1e6:.3g} Mvox/s", refresh=False)
            self.bar.update(1)


# ------------------------------------------------------------------------------ public API
def relabel_archive(
    relabeler: Any,
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    recursive: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    save_confidence: bool = False,
    save_probabilities: bool = False,
    save_overlay: bool = False,
    readers: int = 2,
    writers: int = 2,
    queue_size: int = 2,
    progress: bool | None = None,
    overlay_palette: np.ndarray | None = None,
) -> dict[str, Any]:
    """Relabel every volume of an archive and write label maps plus a JSONL manifest.

    Outputs go to ``output_dir/<case_id>.nii.gz`` for NIfTI inputs (input affine and header,
    uint8 or uint16), ``.npy``/``.npz`` for numpy inputs, optionally ``<case_id>_confidence.*``,
    and exactly one ``manifest.jsonl`` row per case. A failing case (unreadable, corrupt or
    not a regular file, relabel error, write error) becomes a ``failed`` row and one stderr
    line; the run goes on. What is refused up front, before any case is read, is listed in
    :mod:`atso_fast.archive.plan`.

    Args:
        relabeler: any object with ``relabel_volume(array) -> result`` where ``array`` is
            ``(Z, Y, X)`` or ``(M, Z, Y, X)`` and ``result`` has ``labels`` ``(Z, Y, X)``
            uint8/uint16, ``confidence`` ``(Z, Y, X)`` uint8 and a ``stats`` dict
            (``label_counts``, ``ignored_fraction``, ``mean_confidence``).
        inputs: a folder (case ids relative to it), a list file (``.txt``/``.lst``; case ids
            are the entries' file names), one image, or a sequence of images (case ids relative
            to their common folder); see :func:`atso_fast.io.list_inputs`.
        output_dir: created if needed; must not lie inside a folder input, and no output may
            overwrite an input or leave this folder.
        recursive: descend into sub-folders of a folder input.
        resume: skip cases whose last manifest row is ``ok`` and whose outputs exist;
            failed cases are retried.
        overwrite: redo finished cases (their rows are replaced). Without ``resume`` or
            ``overwrite`` a folder holding finished cases of this run is refused.
        num_parts: split the sorted inputs round robin into this many parts ...
        part_id: ... and process only this one (``0 <= part_id < num_parts``).
        save_confidence: also write the uint8 confidence map.
        save_probabilities: also write ``<case_id>_probabilities.npz`` (key ``probabilities``,
            float32 ``(C, Z, Y, X)`` on the input's grid; the relabeler must return them:
            ``Relabeler(save_probabilities=True)``).
        save_overlay: also write ``<case_id>_overlay.png``, a picture of the three orthogonal
            slices through the labels with the labels on top (:mod:`atso_fast.io.overlay`; a 2D
            frame: the whole frame, in colour when it has 3 channels).
        readers: reader threads (decode ahead of the relabeler).
        writers: writer threads (compress and write behind it).
        queue_size: decoded volumes waiting for the relabeler beyond those being read; also
            bounds finished results waiting for a writer. Memory stays bounded by these.
        progress: tqdm bar on stderr; ``None``: a bar when stderr is a terminal, else one line
            per case (count, seconds, ETA) as nnU-Net prints; ``False``: nothing.
        overlay_palette: ``(N, 3)`` uint8 overlay colours indexed by written label (e.g. the
            Cityscapes colours; every label but the ignore index is drawn, 0 included); default
            tab20 with label 0 as background.

    Returns:
        Summary dict: ``total, done, skipped, failed, seconds, cases_per_s, voxels_per_s,
        busy_fraction`` (time inside ``relabel_volume`` / wall time), ``failures``
        (list of ``(case_id, error)``), ``skipped_inputs`` (list of ``(path, reason)``: hidden
        files and linked folders left out) and ``runtime`` (the relabeler's ``runtime_label``
        at the end, when it has one: which runtime ``auto`` chose).

    Raises:
        InputError: the inputs cannot be listed, inputs and outputs overlap, two inputs share a
            case id, or finished cases are here and neither ``resume`` nor ``overwrite``.
        ValueError: invalid ``num_parts``/``part_id``/thread counts, ``resume`` with ``overwrite``.
        TypeError: ``relabeler`` has no ``relabel_volume``.
    """
    _check_options(relabeler, readers=readers, writers=writers, queue_size=queue_size)
    process = partial(
        _pipeline, relabeler, readers=readers, writers=writers, queue_size=queue_size, palette=overlay_palette
    )
    summary = run_archive(
        process,
        inputs,
        output_dir,
        recursive=recursive,
        resume=resume,
        overwrite=overwrite,
        num_parts=num_parts,
        part_id=part_id,
        save_confidence=save_confidence,
        progress=progress,
        fingerprint=getattr(relabeler, "fingerprint", None),
        save_probabilities=save_probabilities,
        save_overlay=save_overlay,
    )
    label = getattr(relabeler, "runtime_label", None)  # optional (VolumeRelabeler)
    if label:
        summary["runtime"] = label
    return summary


def run_archive(
    process: Callable[[list[Case], CaseRecorder], None],
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    recursive: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    save_confidence: bool = False,
    progress: bool | None = None,
    fingerprint: str | None = None,
    save_probabilities: bool = False,
    save_overlay: bool = False,
) -> dict[str, Any]:
    """Plan, resume and record an archive run around an engine's ``process(cases, tally)``.

    The engine-independent part of :func:`relabel_archive` (planning, part split, resume, stale
    temp removal, planning failures, manifest, progress bar, summary), so every engine (the
    threaded pipeline here, ``atso_fast.ray_engine``) has the same semantics. ``process`` gets
    the cases still to do and must record each one with ``tally.ok(case, meta, stats, seconds)``
    or ``tally.fail(case, message, shape)``; ``meta`` needs only ``spatial_shape``. Arguments
    and return value are those of :func:`relabel_archive`; ``fingerprint`` (the engine's
    :attr:`~atso_fast.engine.Relabeler.fingerprint`) goes into every ``ok`` row, and a resume over
    cases finished with another one is refused. One process at a time writes a part of a folder
    (an exclusive lock for the run), and an output folder it cannot write is refused up front.
    """
    output_dir = Path(output_dir)
    plan, todo = _prepare(
        inputs,
        output_dir,
        recursive=recursive,
        resume=resume,
        overwrite=overwrite,
        num_parts=num_parts,
        part_id=part_id,
        save_confidence=save_confidence,
        fingerprint=fingerprint,
        save_probabilities=save_probabilities,
        save_overlay=save_overlay,
    )
    cases = plan.cases
    output_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(output_dir, part_id, num_parts), Manifest(output_dir / MANIFEST_NAME) as manifest:
        manifest.drop({c.case_id for c in todo})  # redone cases get one new row each
        remove_stale_temps(todo, also=[manifest.path])
        report_skipped(plan.skipped)
        with _progress_bar(progress, len(cases), len(cases) - len(todo)) as bar:
            lines = (len(todo), len(cases)) if progress is None and bar is None else None
            tally = _Tally(manifest, output_dir, bar, fingerprint, lines)
            for case in (c for c in todo if c.error is not None):
                tally.fail(case, case.error or "cannot plan outputs")
            process([c for c in todo if c.error is None], tally)
    summary = _summary(tally, total=len(cases), skipped=len(cases) - len(todo))
    summary["skipped_inputs"] = [(str(path), why) for path, why in plan.skipped]
    return summary


def check_archive(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    recursive: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    save_confidence: bool = False,
    save_probabilities: bool = False,
    save_overlay: bool = False,
) -> dict[str, int]:
    """Everything :func:`run_archive` refuses up front, checked without writing anything (the
    CLI calls it before it loads the model). Returns ``{"total": cases, "todo": to do}``.

    Raises:
        InputError, ValueError: as :func:`relabel_archive`.
    """
    plan, todo = _prepare(
        inputs,
        Path(output_dir),
        recursive=recursive,
        resume=resume,
        overwrite=overwrite,
        num_parts=num_parts,
        part_id=part_id,
        save_confidence=save_confidence,
        save_probabilities=save_probabilities,
        save_overlay=save_overlay,
    )
    return {"total": len(plan.cases), "todo": len(todo)}


def _prepare(
    inputs: Any, output_dir: Path, *, resume: bool, overwrite: bool, fingerprint: str | None = None, **plan_kw: Any
) -> tuple[Any, list[Case]]:
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume skips finished cases, overwrite redoes them")
    plan = plan_archive(inputs, output_dir, **plan_kw)
    check_output_folder(output_dir)
    todo = check_resume(
        plan.cases,
        Manifest(output_dir / MANIFEST_NAME),
        output_dir,
        resume=resume,
        overwrite=overwrite,
        fingerprint=fingerprint,
    )
    return plan, todo


def relabel_case(
    relabeler: Any,
    case_id: str,
    path: str | os.PathLike[str],
    outputs: Mapping[str, str | os.PathLike[str]],
    tally: CaseRecorder,
    channels: Sequence[str | os.PathLike[str]] = (),
    palette: np.ndarray | None = None,
) -> None:
    """Read, relabel and write one planned case in this thread (a Ray actor's unit of work).

    Same steps, error messages and write order as the threaded pipeline; the outcome goes to
    ``tally.ok`` / ``tally.fail`` (``tally`` also needs ``lock`` and a float ``busy``).
    ``outputs`` maps ``"labels"`` (and optionally ``"confidence"``) to the planned files;
    ``channels`` lists a multi-channel case's files (``Case.channels``).
    """
    case = Case(
        case_id, Path(path), {k: Path(v) for k, v in outputs.items()}, channels=tuple(Path(c) for c in channels)
    )
    read: Future = Future()
    try:
        read.set_result(read_input(case.files, model_channels(relabeler)))
    except Exception as exc:  # reported by _take exactly as a reader thread's error
        read.set_exception(exc)
    loaded = _take(case, read, tally)
    if loaded is None:
        return
    result, seconds = _relabel(relabeler, case, loaded, tally)
    if result is not None:
        _write_case(case, loaded[1], result, seconds, tally, threading.Semaphore(0), loaded[0], palette)


def model_channels(relabeler: Any) -> int | None:
    """The input channels of the relabeler's model package, when it has one."""
    channels = getattr(getattr(relabeler, "package", None), "in_channels", None)
    return channels if isinstance(channels, int) else None


def write_probabilities(path: Path, probabilities: np.ndarray | None) -> Path:
    """``path`` (``.npz``) holding ``probabilities`` ``(C, Z, Y, X)`` float32 under the key
    ``probabilities`` (nnU-Net's file layout), written atomically."""
    if probabilities is None:
        raise ValueError("the relabeler returned no probabilities (build it with save_probabilities=True)")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, probabilities=np.asarray(probabilities, dtype=np.float32))
    return atomic_write_bytes(path, buffer.getbuffer())


def _check_options(relabeler: Any, **counts: int) -> None:
    if not callable(getattr(relabeler, "relabel_volume", None)):
        raise TypeError(f"relabeler must have a relabel_volume(array) method, got {type(relabeler).__name__}")
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _summary(tally: _Tally, *, total: int, skipped: int) -> dict[str, Any]:
    seconds = time.perf_counter() - tally.start
    return {
        "total": total,
        "done": tally.done,
        "skipped": skipped,
        "failed": tally.failed,
        "seconds": seconds,
        "cases_per_s": tally.done / seconds if seconds > 0 else 0.0,
        "voxels_per_s": tally.voxels / seconds if seconds > 0 else 0.0,
        "busy_fraction": min(tally.busy / seconds, 1.0) if seconds > 0 else 0.0,
        "failures": list(tally.failures),
    }


# -------------------------------------------------------------------------------- pipeline
def _pipeline(
    relabeler: VolumeRelabeler,
    cases: list[Case],
    tally: _Tally,
    *,
    readers: int,
    writers: int,
    queue_size: int,
    palette: np.ndarray | None = None,
) -> None:
    """Read ahead on ``readers`` threads, relabel here, write on ``writers`` threads."""
    slots = threading.BoundedSemaphore(writers + queue_size)
    feed = iter(cases)
    channels = model_channels(relabeler)
    pending: deque[tuple[Case, Future]] = deque()
    with ThreadPoolExecutor(readers, "atso-read") as read_pool, ThreadPoolExecutor(writers, "atso-write") as write_pool:
        try:
            _top_up(pending, feed, read_pool, readers + queue_size, channels)
            while pending:
                case, future = pending.popleft()
                _top_up(pending, feed, read_pool, readers + queue_size, channels)
                loaded = _take(case, future, tally)
                if loaded is None:
                    continue
                result, seconds = _relabel(relabeler, case, loaded, tally)
                if result is None:
                    continue
                slots.acquire()
                image = loaded[0] if "overlay" in case.outputs else None  # kept only for the picture
                write_pool.submit(_write_case, case, loaded[1], result, seconds, tally, slots, image, palette)
                del loaded, result
        except BaseException:
            for _, future in pending:
                future.cancel()
            raise


def _top_up(
    pending: deque, feed: Iterator[Case], pool: ThreadPoolExecutor, depth: int, in_channels: int | None
) -> None:
    while len(pending) < depth:
        case = next(feed, None)
        if case is None:
            return
        pending.append((case, pool.submit(read_input, case.files, in_channels)))


def read_input(files: Path | Sequence[Path], in_channels: int | None = None) -> tuple[np.ndarray, VolumeMeta]:
    """``read_volume`` for a regular file or a DICOM series folder only (a FIFO, socket, device
    or other folder is refused without being opened: opening a FIFO blocks until a writer comes,
    maybe never). Several files are the channels of one nnU-Net case (``CASE_0000``, ...): each is
    read, they must share one grid, and they are stacked as ``(M, Z, Y, X)``.

    Args:
        files: one path, or a case's channel files in channel order.
        in_channels: the model's input channels; nnU-Net channel files are checked against it
            before anything is read.

    Raises:
        InputError: naming the file and what is wrong with it.
    """
    files = (files,) if isinstance(files, (str, os.PathLike)) else tuple(files)
    _check_channel_files(files, in_channels)
    loaded = [_read_one(Path(f)) for f in files]
    if len(loaded) == 1:
        return loaded[0]
    first = loaded[0][1]
    for _, meta in loaded[1:]:
        if meta.spatial_shape != first.spatial_shape or not np.allclose(meta.affine, first.affine, atol=1e-3):
            raise InputError(
                f"{meta.path}: channel grid {meta.spatial_shape} differs from {first.path}'s "
                f"{first.spatial_shape} (shape or affine): the channels of a case must share one grid"
            )
    return np.stack([a.reshape(first.spatial_shape) for a, _ in loaded]), first


def _check_channel_files(files: Sequence[Path], in_channels: int | None) -> None:
    """An nnU-Net-named case must hold exactly channels ``_0000`` to ``_{in_channels - 1}``."""
    found = [channel_index(f) for f in files]
    have = [f[1] for f in found if f is not None]
    if in_channels is None or len(have) != len(found) or have[0] != 0:
        return  # not nnU-Net channel files (a numbered scan such as scan_0002 stands alone)
    if have != list(range(in_channels)):
        names = ", ".join(Path(f).name for f in files)
        need = ", ".join(f"_{k:04d}" for k in range(in_channels))
        raise InputError(
            f"{files[0]}: the model takes {in_channels} input channel(s) ({need}); this case has "
            f"{len(files)} channel file(s): {names}"
        )


def _read_one(path: Path) -> tuple[np.ndarray, VolumeMeta]:
    problem = not_regular_error(path)
    if problem and not (os.path.isdir(path) and is_dicom_folder(path)):
        raise InputError(problem)
    array, meta = read_volume(path)
    # a header can claim sizes its data cannot have (a negative NIfTI dim reads as data of
    # another shape): refused here, before the relabeler runs on it
    if min(meta.spatial_shape) < 1 or tuple(array.shape[-3:]) != tuple(meta.spatial_shape):
        raise InputError(
            f"{path}: invalid image shape {tuple(meta.shape)} in its header (a size is not "
            f"positive or disagrees with the data, {tuple(array.shape)})"
        )
    return array, meta


def _take(case: Case, future: Future, tally: CaseRecorder) -> tuple[np.ndarray, VolumeMeta] | None:
    try:
        return future.result()
    except InputError as exc:
        tally.fail(case, str(exc))
    except Exception as exc:  # anything else a reader can raise (MemoryError, ...)
        tally.fail(case, f"{case.path}: cannot read: {type(exc).__name__}: {exc}")
    return None


def _relabel(
    relabeler: VolumeRelabeler, case: Case, loaded: tuple[np.ndarray, VolumeMeta], tally: CaseRecorder
) -> tuple[Any, float]:
    array, meta = loaded
    start = time.perf_counter()
    try:
        result = relabeler.relabel_volume(array, **_geometry(relabeler, meta))
    except Exception as exc:  # one bad case must not stop the archive
        result = None
        tally.fail(case, f"{case.path}: relabel failed: {type(exc).__name__}: {exc}", list(array.shape))
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


def _write_case(
    case: Case,
    meta: VolumeMeta,
    result: Any,
    seconds: float,
    tally: CaseRecorder,
    slots: threading.Semaphore,
    image: np.ndarray | None = None,
    palette: np.ndarray | None = None,
) -> None:
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
            if "probabilities" in case.outputs:
                write_probabilities(case.outputs["probabilities"], getattr(result, "probabilities", None))
            if "overlay" in case.outputs and image is not None:
                write_overlay(
                    case.outputs["overlay"], image, result.labels, meta.spacing, _written_ignore(stats), palette
                )
        except Exception as exc:
            tally.fail(
                case, f"{case.path}: writing outputs failed: {type(exc).__name__}: {exc}", list(meta.spatial_shape)
            )
            return
        try:
            tally.ok(case, meta, stats, seconds)
        except Exception as exc:  # e.g. disk full while appending the row
            tally.fail(case, f"{case.path}: manifest append failed: {type(exc).__name__}: {exc}")
    finally:
        slots.release()


def _written_ignore(stats: Mapping[str, Any]) -> int:
    """The value ignored voxels have in the written labels: ``stats["ignore_index"]``, through the
    relabeler's ``stats["label_map"]`` pairs when it has them (Cityscapes labelIds: 255 -> 0)."""
    ignore = int(stats.get("ignore_index", 255))
    return next((int(value) for key, value in stats.get("label_map") or () if key == ignore), ignore)


@contextmanager
def _progress_bar(progress: bool | None, total: int, initial: int) -> Iterator[Any]:
    """A tqdm bar on stderr (cases, cases/s, ETA; Mvox/s as postfix), or ``None``."""
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not progress:
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(
        total=total, initial=initial, unit="case", file=sys.stderr, dynamic_ncols=True, desc="relabel", smoothing=0.1
    )
    try:
        yield bar
    finally:
        bar.close()
