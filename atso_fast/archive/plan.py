"""Planning a bulk run before any case is read: inputs, names, outputs, what is already done.

Everything that can be known without reading a scan is checked here, up front, so a run that
cannot go well stops before the model loads (``check_archive``) and a run that starts records
every case exactly once:

- the input is listed without opening anything (:func:`atso_fast.io.scan_inputs`); what cannot
  be listed becomes a failed entry, hidden image files are reported as skipped;
- an output folder inside a folder input, or list entries inside the output folder, are
  refused: earlier outputs would be read as inputs;
- two inputs with one case id (``a.nii.gz`` and ``a.npy``, or ``a.nii.gz`` and
  ``a_0000.nii.gz``) are refused with both names (see :func:`case_ids`);
- a folder that already holds finished cases is refused unless the run resumes (skips them) or
  overwrites (redoes them): ``manifest.jsonl`` keeps exactly one row per case; a resume over
  cases another model or other settings made is refused (each row records the run's fingerprint);
- an input with nothing to relabel, an output folder that cannot be written and a manifest that
  is a link are refused; one run at a time writes each part of a folder (:func:`run_lock`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atso_fast.io import (
    InputError,
    Listing,
    Manifest,
    format_for,
    is_stale_temp,
    output_path,
    scan_inputs,
    select_part,
    supported_suffixes,
)
from atso_fast.io import case_id as make_case_id
from atso_fast.io.naming import channel_groups

_EXTRA_SUFFIXES = {"probabilities": "_probabilities.npz", "overlay": "_overlay.png"}
"""Outputs written on request, and their name endings after the case id."""

try:  # POSIX advisory locks; elsewhere concurrent runs on one folder are not detected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]  # a module name rebound to None: no annotation can say so

__all__ = [
    "Case",
    "Plan",
    "case_ids",
    "check_output_folder",
    "check_resume",
    "plan_archive",
    "remove_stale_temps",
    "report_skipped",
    "run_lock",
]


@dataclass
class Case:
    """One input and the outputs planned for it (``error`` set when planning refused it).

    ``channels``: every file of a multi-channel nnU-Net case (``CASE_0000``, ``CASE_0001``, ...;
    ``path`` is the first), empty for a one-file case."""

    case_id: str
    path: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None
    channels: tuple[Path, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """The input files of the case (its channel files, or its one path)."""
        return self.channels or (self.path,)


@dataclass
class Plan:
    """This part's cases (failed entries included) and the inputs left out on purpose."""

    cases: list[Case]
    skipped: list[tuple[Path, str]]


def plan_archive(
    inputs: Any,
    output_dir: Path,
    *,
    recursive: bool,
    num_parts: int,
    part_id: int,
    save_confidence: bool,
    save_probabilities: bool = False,
    save_overlay: bool = False,
) -> Plan:
    """The cases of part ``part_id`` with their output paths.

    Listing failures (unreadable sub-folders, bad list lines) are recorded by part 0 only, so
    every entry has one row whatever the number of parts.

    Raises:
        InputError: the input cannot be listed, the output folder lies inside the input folder,
            an input lies inside the output folder, or two inputs share a case id.
        ValueError: bad ``num_parts`` / ``part_id``.
    """
    select_part([], num_parts, part_id)
    listing = _collect(inputs, output_dir, recursive)
    if not listing.paths and not listing.failed:
        left = f"; left out: {', '.join(f'{p} ({why})' for p, why in listing.skipped[:3])}" if listing.skipped else ""
        raise InputError(
            f"{inputs}: nothing to relabel: no file with a supported suffix "
            f"({', '.join(supported_suffixes())}) and no DICOM series folder"
            f"{'' if recursive else ' (sub-folders are read with --recursive)'}{left}"
        )
    ids = case_ids(listing.paths, listing.root)
    all_inputs = frozenset(os.path.realpath(p) for p in listing.paths)
    owners: dict[str, str] = {}
    cases = []
    groups = {group[0]: group for group in channel_groups(listing.paths)}
    extras = {"probabilities": save_probabilities, "overlay": save_overlay}
    for path in select_part(list(groups), num_parts, part_id):
        case = _plan_case(path, ids.get(path), listing.root, output_dir, save_confidence, all_inputs, extras)
        if len(groups[path]) > 1 and case.error is None:
            case.channels = groups[path]
        clash = next(
            (owners[os.path.realpath(p)] for p in case.outputs.values() if os.path.realpath(p) in owners), None
        )
        if clash is not None:  # report under the input path so the owner's rows stay clean
            case = Case(str(path), path, error=f"{path}: output name clashes with case {clash}")
        for out in case.outputs.values():
            owners[os.path.realpath(out)] = case.case_id
        cases.append(case)
    if part_id == 0:
        cases += [Case(entry, path, error=message) for entry, path, message in listing.failed]
    return Plan(cases, listing.skipped)


def _collect(inputs: Any, output_dir: Path, recursive: bool) -> Listing:
    """The listing of ``inputs``, refused when inputs and outputs overlap."""
    if isinstance(inputs, (str, os.PathLike)):
        listing = scan_inputs(inputs, recursive=recursive)
        if Path(inputs).is_dir():
            _refuse_nested_output(Path(inputs), output_dir)
    else:
        paths = [Path(p) for p in inputs]
        parents = [os.path.abspath(p.parent) for p in paths]
        listing = Listing(paths, Path(os.path.commonpath(parents)) if parents else Path.cwd())
    real_out = os.path.realpath(output_dir)
    inside = [p for p in listing.paths if _within(os.path.realpath(p), real_out)]
    if inside:
        raise InputError(
            f"{inside[0]} lies inside the output folder {output_dir} ({len(inside)} such "
            "inputs): outputs of a run would be read as inputs; list inputs from elsewhere"
        )
    return listing


def _refuse_nested_output(folder: Path, output_dir: Path) -> None:
    real_in, real_out = os.path.realpath(folder), os.path.realpath(output_dir)
    if _within(real_out, real_in):
        raise InputError(
            f"output folder {output_dir} is inside the input folder {folder}"
            + (" (it is the input folder)" if real_out == real_in else "")
            + ": outputs would be read as inputs on the next run; choose an output folder "
            "outside the input folder"
        )


def _within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def case_ids(paths: Sequence[Path], root: Path | None) -> dict[Path, str]:
    """``{path: case id}`` for every path with a valid name; refuses two inputs with one id.

    Case ids are file names without the image suffix and nnU-Net's ``_0000`` (relative to
    ``root``): what nnU-Net users expect, and the names of the outputs. Keeping the suffix in
    the id instead would rename every output and break resuming existing folders, and nnU-Net
    itself requires one file ending per dataset, so a clash is a setup error, refused up front
    for every part (ids are checked over all inputs, not just this part's).

    Raises:
        InputError: naming the clashing files (up to three clashes).
    """
    ids: dict[Path, str] = {}
    owners: dict[str, Path] = {}
    clashes = []
    for path in paths:
        try:
            cid = make_case_id(path, root)
        except InputError:
            continue  # planned as a failed case
        if cid in owners:
            clashes.append(f"{owners[cid]} and {path} are both case {cid!r}")
        owners.setdefault(cid, path)
        ids[path] = cid
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise InputError(
            "; ".join(clashes[:3]) + more + ": case ids are file names without the image suffix "
            "and nnU-Net's _0000, so each case needs its own name; rename or move one of each pair"
        )
    return ids


def _plan_case(
    path: Path,
    cid: str | None,
    root: Path | None,
    output_dir: Path,
    save_confidence: bool,
    all_inputs: frozenset[str],
    extras: dict[str, bool] | None = None,
) -> Case:
    if cid is None:
        try:
            cid = make_case_id(path, root)
        except InputError as exc:
            return Case(path.name, path, error=str(exc))
    try:
        suffix = format_for(path).output_suffix  # confidence maps add _confidence before it
        outputs = {"labels": output_path(output_dir, cid, suffix, inputs=all_inputs)}
        if save_confidence:
            outputs["confidence"] = output_path(output_dir, cid, "_confidence" + suffix, inputs=all_inputs)
        for name, suffix in _EXTRA_SUFFIXES.items():  # on request: nnU-Net's probabilities, QC pictures
            if (extras or {}).get(name):
                outputs[name] = output_path(output_dir, cid, suffix, inputs=all_inputs)
    except InputError as exc:
        return Case(cid, path, error=str(exc))
    except ValueError as exc:
        return Case(cid, path, error=f"{path}: {exc}")
    return Case(cid, path, outputs)


def check_resume(
    cases: list[Case],
    manifest: Manifest,
    output_dir: Path,
    *,
    resume: bool,
    overwrite: bool,
    fingerprint: str | None = None,
) -> list[Case]:
    """The cases to do. Finished cases (``ok`` row, the same output files present) are
    skipped with ``resume``, redone with ``overwrite``, and refused otherwise.

    Raises:
        InputError: finished cases found and neither ``resume`` nor ``overwrite``; or ``resume``
            over cases whose rows record another ``fingerprint`` (another model or settings).
    """
    finished = manifest.completed()
    done = [case for case in cases if case.error is None and _finished(case, finished, output_dir)]
    if resume and fingerprint is not None:
        _refuse_other_runs(done, finished, fingerprint, manifest.path)
    if done and not (resume or overwrite):
        raise InputError(
            f"{output_dir}: {len(done)} case{'s' if len(done) != 1 else ''} already done here "
            f"(of {len(cases)} planned; "
            f"{manifest.path.name} names them); use --resume (resume=True) to skip them or "
            "--overwrite (overwrite=True) to redo them"
        )
    skip = {id(case) for case in done}
    return [case for case in cases if id(case) not in skip] if resume else list(cases)


def _refuse_other_runs(done: list[Case], finished: dict[str, dict[str, Any]], fingerprint: str, manifest: Path) -> None:
    other = [c.case_id for c in done if finished[c.case_id].get("run") not in (None, fingerprint)]
    if other:
        runs = sorted({str(finished[c]["run"]) for c in other})
        plural = "s" if len(other) != 1 else ""
        raise InputError(
            f"{manifest}: {len(other)} finished case{plural} ({', '.join(other[:3])}"
            f"{', ...' if len(other) > 3 else ''}) were made by another model or settings (run "
            f"{', '.join(runs[:2])}; this run is {fingerprint}); resuming would mix outputs: use "
            "--overwrite to redo them, or another output folder"
        )


def check_output_folder(output_dir: Path) -> None:
    """Refuse an output folder that cannot be written (found before any case is computed) or
    whose manifest is a link (rows would land wherever it points)."""
    manifest = output_dir / "manifest.jsonl"
    if manifest.is_symlink():
        raise InputError(f"{manifest}: is a symbolic link; refused (rows are never written through a link)")
    probe = output_dir if output_dir.is_dir() else next((p for p in output_dir.parents if p.is_dir()), Path("."))
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise InputError(f"{output_dir}: output folder cannot be written ({exc.strerror or exc})") from None


@contextmanager
def run_lock(output_dir: Path, part_id: int, num_parts: int) -> Iterator[None]:
    """Hold an exclusive lock on part ``part_id`` of ``num_parts`` of ``output_dir`` for a run:
    a second run on the same part (two ``--resume`` at once) is refused, not interleaved."""
    path = output_dir / f".atso-fast-part-{part_id}-of-{num_parts}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise InputError(f"{path}: cannot open the run lock ({exc.strerror or exc})") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(
                    f"{output_dir}: another atso-fast run is writing part {part_id} of {num_parts} "
                    "here; wait for it to end (or use another output folder)"
                ) from None
        yield
    finally:
        try:  # no clutter left in the output folder (a run starting right now takes a new file)
            path.unlink()
        except OSError:
            pass
        os.close(fd)


def _finished(case: Case, finished: dict[str, dict[str, Any]], output_dir: Path) -> bool:
    row = finished.get(case.case_id)
    if not row:
        return False
    recorded = row.get("outputs", {})
    wanted = {k: Path(os.path.relpath(p, output_dir)).as_posix() for k, p in case.outputs.items()}
    return all(recorded.get(k) == v for k, v in wanted.items())


def remove_stale_temps(cases: list[Case], also: Sequence[Path] = ()) -> None:
    """Delete temp files a killed run left for outputs this run is about to write (and for the
    files in ``also``, e.g. the manifest); temp files of a writer that is still running (a
    concurrent part) are left alone."""
    targets: dict[Path, set[str]] = {}
    for out in [*(o for case in cases for o in case.outputs.values()), *also]:
        targets.setdefault(out.parent, set()).add(out.name)
    for folder, names in targets.items():
        try:
            entries = [e.name for e in os.scandir(folder)]
        except OSError:
            continue
        for name in entries:
            if is_stale_temp(name) and name[1 : name.rindex(".atso-")] in names:
                stale = folder / name
                if stale.is_dir() and not stale.is_symlink():  # a killed SimpleITK writer's folder
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)


def report_skipped(skipped: list[tuple[Path, str]], *, limit: int = 5) -> None:
    """One stderr line per input left out on purpose (the first ``limit``, then a count)."""
    for path, why in skipped[:limit]:
        print(f"atso-fast relabel: skipped {path}: {why}", file=sys.stderr, flush=True)
    if len(skipped) > limit:
        print(
            f"atso-fast relabel: skipped {len(skipped) - limit} more inputs (see the summary's skipped_inputs)",
            file=sys.stderr,
            flush=True,
        )
