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
  overwrites (redoes them): ``manifest.jsonl`` keeps exactly one row per case.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
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
)
from atso_fast.io import case_id as make_case_id

__all__ = ["Case", "Plan", "case_ids", "check_resume", "plan_archive", "remove_stale_temps", "report_skipped"]


@dataclass
class Case:
    """One input and the outputs planned for it (``error`` set when planning refused it)."""

    case_id: str
    path: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Plan:
    """This part's cases (failed entries included) and the inputs left out on purpose."""

    cases: list[Case]
    skipped: list[tuple[Path, str]]


def plan_archive(inputs: Any, output_dir: Path, *, recursive: bool, num_parts: int, part_id: int,
                 save_confidence: bool) -> Plan:
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
    ids = case_ids(listing.paths, listing.root)
    all_inputs = frozenset(os.path.realpath(p) for p in listing.paths)
    owners: dict[str, str] = {}
    cases = []
    for path in select_part(listing.paths, num_parts, part_id):
        case = _plan_case(path, ids.get(path), listing.root, output_dir, save_confidence, all_inputs)
        clash = next((owners[os.path.realpath(p)] for p in case.outputs.values()
                      if os.path.realpath(p) in owners), None)
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
        raise InputError(f"{inside[0]} lies inside the output folder {output_dir} ({len(inside)} such "
                         "inputs): outputs of a run would be read as inputs; list inputs from elsewhere")
    return listing


def _refuse_nested_output(folder: Path, output_dir: Path) -> None:
    real_in, real_out = os.path.realpath(folder), os.path.realpath(output_dir)
    if _within(real_out, real_in):
        raise InputError(f"output folder {output_dir} is inside the input folder {folder}"
                         + (" (it is the input folder)" if real_out == real_in else "")
                         + ": outputs would be read as inputs on the next run; choose an output folder "
                         "outside the input folder")


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
        raise InputError("; ".join(clashes[:3]) + more + ": case ids are file names without the image suffix "
                         "and nnU-Net's _0000, so each case needs its own name; rename or move one of each pair")
    return ids


def _plan_case(path: Path, cid: str | None, root: Path | None, output_dir: Path, save_confidence: bool,
               all_inputs: frozenset[str]) -> Case:
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
    except InputError as exc:
        return Case(cid, path, error=str(exc))
    except ValueError as exc:
        return Case(cid, path, error=f"{path}: {exc}")
    return Case(cid, path, outputs)


def check_resume(cases: list[Case], manifest: Manifest, output_dir: Path, *, resume: bool,
                 overwrite: bool) -> list[Case]:
    """The cases to do. Finished cases (``ok`` row, the same output files present) are
    skipped with ``resume``, redone with ``overwrite``, and refused otherwise.

    Raises:
        InputError: finished cases found and neither ``resume`` nor ``overwrite``.
    """
    finished = manifest.completed()
    done = [case for case in cases if case.error is None and _finished(case, finished, output_dir)]
    if done and not (resume or overwrite):
        raise InputError(f"{output_dir}: {len(done)} case{'s' if len(done) != 1 else ''} already done here "
                         f"(of {len(cases)} planned; "
                         f"{manifest.path.name} names them); use --resume (resume=True) to skip them or "
                         "--overwrite (overwrite=True) to redo them")
    skip = {id(case) for case in done}
    return [case for case in cases if id(case) not in skip] if resume else list(cases)


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
            if is_stale_temp(name) and name[1:name.rindex(".atso-")] in names:
                (folder / name).unlink(missing_ok=True)


def report_skipped(skipped: list[tuple[Path, str]], *, limit: int = 5) -> None:
    """One stderr line per input left out on purpose (the first ``limit``, then a count)."""
    for path, why in skipped[:limit]:
        print(f"atso-fast relabel: skipped {path}: {why}", file=sys.stderr, flush=True)
    if len(skipped) > limit:
        print(f"atso-fast relabel: skipped {len(skipped) - limit} more inputs (see the summary's "
              "skipped_inputs)", file=sys.stderr, flush=True)
