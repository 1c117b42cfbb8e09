"""The bulk relabel engine on a Ray cluster, with Ray Data (``atso-fast relabel --engine ray``).

Data flow::

    driver: plan, part split, resume, stale temps      (atso_fast.archive.run_archive)
      -> ray.data.from_items: one row (one block) per case: paths only, never voxels
      -> map_batches(_CaseWorker, compute=ActorPoolStrategy(size=workers), batch_size=1)
           __init__: build the relabeler once per actor (the model is loaded once)
           __call__: read -> relabel -> atomic write inside the actor
                     (atso_fast.archive.relabel_case) -> a small JSON outcome
      -> driver, iter_rows(): one manifest row per outcome as it streams back (single writer),
         progress bar, summary

Semantics are the local engine's because the same functions plan the run, process a case and
write the manifest rows: identical outputs and rows, ``resume``, parts, per-case failures.
Memory stays bounded: rows are paths and small outcomes, and Ray Data streams them.

Fault tolerance: Ray Data restarts a dead actor and resubmits its task (its actor pools default
to ``max_restarts=-1`` and ``max_task_retries=-1``). A tiny ledger actor counts how often each
case was started, so a case that kills its worker every time (segfault, out-of-memory kill)
becomes a ``failed`` row after ``max_attempts`` instead of being retried for ever. A case's row
is appended as soon as its outcome streams back; if the run stops (driver killed, cluster
lost), ``resume`` redoes exactly the cases without an ``ok`` row.

Inputs, the output folder and the model package must be visible to every node under the same
path (a shared file system); paths are made absolute before they are shipped to the actors.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from atso_fast.archive import Case, CaseRecorder, relabel_case, run_archive
from atso_fast.engine.relabeler import Relabeler, relabeler_options, run_fingerprint
from atso_fast.package import load_package

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "RAY_INSTALL_HINT",
    "RayRunError",
    "ray_runner",
    "relabel_archive_ray",
    "require_ray",
]

RAY_INSTALL_HINT = 'pip install "atso-fast[ray]"'
"""How to install the optional Ray dependency."""
DEFAULT_MAX_ATTEMPTS = 3
"""Starts of one case (each one that kills its worker counts) before it becomes a failed row."""


class RayRunError(RuntimeError):
    """The Ray run stopped early; finished cases are in the manifest (rerun with ``resume``)."""


def require_ray() -> ModuleType:
    """Import Ray (with Ray Data) and return the ``ray`` module.

    Raises:
        ModuleNotFoundError: Ray Data cannot be imported; the message names the extra to install.
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ModuleNotFoundError(
            f"the Ray engine needs Ray Data, which cannot be imported ({exc}); install it with: {RAY_INSTALL_HINT}"
        ) from None
    return ray


# ------------------------------------------------------------------------------ public API
def relabel_archive_ray(
    model_dir_or_relabeler_kwargs: str | os.PathLike[str] | Mapping[str, Any],
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    *,
    address: str | None = None,
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    resume: bool = False,
    overwrite: bool = False,
    num_parts: int = 1,
    part_id: int = 0,
    recursive: bool = False,
    save_confidence: bool = False,
    save_probabilities: bool = False,
    save_overlay: bool = False,
    progress: bool | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    relabeler_factory: Callable[..., Any] | None = None,
    **relabeler_kwargs: Any,
) -> dict[str, Any]:
    """Relabel an archive like :func:`atso_fast.archive.relabel_archive`, on a pool of Ray actors.

    Each actor builds ``Relabeler(model_dir, **relabeler_kwargs)`` once and then reads,
    relabels and writes one case at a time; the driver appends the manifest rows as outcomes
    stream back. Outputs, manifest rows, ``resume`` and part semantics equal the local engine's.

    Args:
        model_dir_or_relabeler_kwargs: the model package folder, or a dict of
            :class:`~atso_fast.engine.Relabeler` arguments that includes ``model_dir``.
        inputs: a folder, a list file, one image or a sequence of images (as the local engine).
        output_dir: output folder, shared by every node.
        address: Ray cluster address (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``);
            ``None`` connects to a running local cluster, else starts a local instance. A Ray
            already initialised in this process is used as it is.
        workers: actors (model copies) in the pool.
        gpus_per_worker: GPUs reserved per actor (``1``: one actor per GPU; ``0.5``: two per
            GPU); must be > 0 exactly when ``device`` is CUDA.
        cpus_per_worker: CPUs reserved per actor.
        resume: skip cases already finished in ``output_dir/manifest.jsonl``.
        num_parts: split the sorted inputs round robin into this many parts ...
        part_id: ... and process only this one.
        recursive: descend into sub-folders of a folder input.
        save_confidence: also write the uint8 confidence map.
        progress: tqdm bar on stderr; ``None`` means only when stderr is a terminal.
        max_attempts: starts of a case before a case that keeps killing its worker is
            recorded as failed.
        relabeler_factory: ``factory(model_dir, **relabeler_kwargs)`` builds each actor's
            relabeler (default :class:`~atso_fast.engine.Relabeler`); must be importable or
            picklable on the workers. The package and options are then not checked up front.
        **relabeler_kwargs: more :class:`~atso_fast.engine.Relabeler` arguments (``runtime``,
            ``device``, ``overlap``, ``batch_size``, ...).

    Returns:
        The summary dict of :func:`atso_fast.archive.relabel_archive`; ``busy_fraction`` is
        the mean over the workers.

    Raises:
        ModuleNotFoundError: Ray is not installed (the message names ``atso-fast[ray]``).
        PackageError: the model package is invalid (a ``ValueError``).
        ValueError: invalid worker resources, device, ``num_parts``/``part_id``.
        TypeError: unknown relabeler options or a model argument of the wrong type.
        InputError: ``inputs`` does not exist or cannot be listed.
        ConnectionError: no Ray cluster at ``address``.
        RayRunError: the Ray run stopped early (finished cases are kept in the manifest).
    """
    if save_probabilities and relabeler_factory is None:
        relabeler_kwargs.setdefault("save_probabilities", True)
    run = ray_runner(
        model_dir_or_relabeler_kwargs,
        address=address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
        max_attempts=max_attempts,
        relabeler_factory=relabeler_factory,
        **relabeler_kwargs,
    )
    return run(
        inputs,
        output_dir,
        recursive=recursive,
        resume=resume,
        overwrite=overwrite,
        num_parts=num_parts,
        part_id=part_id,
        save_confidence=save_confidence,
        progress=progress,
        save_probabilities=save_probabilities,
        save_overlay=save_overlay,
    )


def ray_runner(
    model_dir_or_relabeler_kwargs: str | os.PathLike[str] | Mapping[str, Any],
    *,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    relabeler_factory: Callable[..., Any] | None = None,
    **relabeler_kwargs: Any,
) -> Callable[..., dict[str, Any]]:
    """Check the Ray options now and bind them (what ``atso-fast relabel --engine ray`` runs).

    ``None`` means the default: 1 worker, 1 CPU each, 1 GPU each with a CUDA ``device`` else 0.
    Nothing connects to Ray here; the returned runner connects only once there is work.

    Returns:
        ``run(inputs, output_dir, *, recursive, resume, overwrite, num_parts, part_id,
        save_confidence, progress) -> summary`` (see :func:`relabel_archive_ray`).

    Raises:
        ModuleNotFoundError, PackageError, ValueError, TypeError: as :func:`relabel_archive_ray`.
    """
    require_ray()
    spec = _worker_spec(model_dir_or_relabeler_kwargs, relabeler_kwargs, relabeler_factory)
    device = str(spec.kwargs.get("device", "cpu"))
    if gpus_per_worker is None:
        gpus_per_worker = 1 if device.startswith("cuda") else 0
    cpus = 1 if cpus_per_worker is None else cpus_per_worker
    if spec.factory is None and spec.kwargs.get("threads") is None:
        spec.kwargs["threads"] = max(1, int(cpus))  # an actor's runtime stays in its CPU share
    pool = _pool(1 if workers is None else workers, cpus, gpus_per_worker, max_attempts, device)
    fingerprint = None if spec.factory is not None else run_fingerprint(load_package(spec.model_dir), spec.kwargs)
    return partial(
        run_archive, partial(_process_on_ray, spec=spec, pool=pool, address=address), fingerprint=fingerprint
    )


# ------------------------------------------------------------------------------ validation
@dataclass(frozen=True)
class _WorkerSpec:
    """What an actor needs to build its relabeler (picklable; shipped once per actor)."""

    model_dir: str
    kwargs: dict[str, Any]
    factory: Callable[..., Any] | None = None

    def build(self) -> Any:
        factory = self.factory
        if factory is None:
            factory = Relabeler
        return factory(self.model_dir, **self.kwargs)


@dataclass(frozen=True)
class _Pool:
    """Actor pool shape: size, resources per actor, starts allowed per case."""

    workers: int
    cpus: float
    gpus: float
    max_attempts: int


def _worker_spec(model: Any, kwargs: dict[str, Any], factory: Callable[..., Any] | None) -> _WorkerSpec:
    """Split the model argument into a folder and options; check both unless ``factory``."""
    if isinstance(model, Mapping):
        options = dict(model)
        if "model_dir" not in options:
            raise TypeError(f"relabeler arguments must include 'model_dir', got keys {sorted(options)}")
        twice = sorted(set(options) & set(kwargs))
        if twice:
            raise TypeError(f"relabeler argument(s) {twice} given both in the dict and as keywords")
        model_dir = options.pop("model_dir")
        kwargs = {**options, **kwargs}
    else:
        model_dir = model
    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(
            "the model must be a package folder or a dict of Relabeler arguments with "
            "'model_dir' (each Ray worker builds its own relabeler), got "
            f"{type(model_dir).__name__}"
        )
    if factory is None:
        load_package(model_dir)  # PackageError naming the file, before any Ray work
        relabeler_options(kwargs)
    return _WorkerSpec(os.path.abspath(model_dir), kwargs, factory)


def _pool(workers: Any, cpus: Any, gpus: Any, max_attempts: Any, device: str) -> _Pool:
    for name, value in (("workers", workers), ("max_attempts", max_attempts)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if not (_is_number(cpus) and cpus > 0):
        raise ValueError(f"cpus_per_worker must be a number > 0, got {cpus!r}")
    if not (_is_number(gpus) and gpus >= 0):
        raise ValueError(f"gpus_per_worker must be a number >= 0, got {gpus!r}")
    _check_device(device, gpus)
    return _Pool(int(workers), float(cpus), float(gpus), int(max_attempts))


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.number)) and bool(np.isfinite(value))


def _check_device(device: str, gpus: float) -> None:
    cuda = device.startswith("cuda")
    if gpus > 0 and not cuda:
        raise ValueError(
            f"gpus_per_worker={gpus:g} reserves GPUs that device {device!r} would not use; pass device='cuda'"
        )
    if cuda and gpus == 0:
        raise ValueError(
            f"device {device!r} needs gpus_per_worker > 0 (1: one worker per GPU), "
            "got 0: Ray would not reserve the GPU the workers use"
        )
    if cuda and device not in ("cuda", "cuda:0"):
        raise ValueError(
            f"device {device!r} names a GPU, but Ray gives each worker its own GPUs (as cuda:0); use device='cuda'"
        )


# --------------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class _Grid:
    """The part of a ``VolumeMeta`` that ``tally.ok`` reads."""

    spatial_shape: tuple[int, ...]


def _process_on_ray(
    cases: list[Case], tally: CaseRecorder, *, spec: _WorkerSpec, pool: _Pool, address: str | None
) -> None:
    """``run_archive``'s ``process``: relabel ``cases`` on Ray and record each outcome."""
    if not cases:
        return  # nothing to do (e.g. everything resumed): do not even start Ray
    ray = require_ray()
    with _connected(ray, address), _quiet_data_context(ray):
        _refuse_if_unplaceable(ray, pool)
        ledger = ray.remote(num_cpus=0)(_AttemptLedger).remote()
        try:
            done = _stream(ray, cases, tally, spec, pool, ledger)
        finally:
            ray.kill(ledger)
    for index in sorted(set(range(len(cases))) - done):  # a Ray setting dropped a block
        tally.fail(cases[index], f"{cases[index].path}: no result came back from the Ray run")


@contextmanager
def _connected(ray: ModuleType, address: str | None) -> Iterator[None]:
    """Use the Ray of this process, or connect (and disconnect afterwards)."""
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address)
    except ConnectionError as exc:
        raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _quiet_data_context(ray: ModuleType) -> Iterator[None]:
    """Ray Data's own progress bars off (the driver shows one bar of cases), then restored."""
    context = ray.data.DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = False
    try:
        yield
    finally:
        context.enable_progress_bars = saved


def _refuse_if_unplaceable(ray: ModuleType, pool: _Pool) -> None:
    """Refuse a worker no node of the cluster can host (Ray would wait for it forever): one
    worker's CPUs and GPUs must fit one alive node.

    Raises:
        ValueError: with what a worker needs and what the largest node has.
    """
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", n.get("alive", True))]
    if any(all(node.get(name, 0) >= need for name, need in (("CPU", pool.cpus), ("GPU", pool.gpus))) for node in nodes):
        return
    most = {name: max((node.get(name, 0) for node in nodes), default=0) for name in ("CPU", "GPU")}
    raise ValueError(
        f"no node of the Ray cluster can host a worker: each needs {pool.cpus:g} CPU and "
        f"{pool.gpus:g} GPU, the largest node has {most['CPU']:g} CPU and {most['GPU']:g} GPU "
        f"({len(nodes)} node(s)); lower --cpus-per-worker/--gpus-per-worker or add nodes"
    )


def _stream(
    ray: ModuleType, cases: list[Case], tally: CaseRecorder, spec: _WorkerSpec, pool: _Pool, ledger: Any
) -> set[int]:
    """Iterate outcomes as actors finish them; returns the indices of the recorded cases."""
    size = min(pool.workers, len(cases))
    rows = iter(_dataset(ray, cases, spec, pool, size, ledger).iter_rows())
    done: set[int] = set()
    while True:
        try:
            row = next(rows, None)
        except Exception as exc:  # actor start failed, cluster lost, ...: the run cannot go on
            raise RayRunError(
                f"the Ray run stopped after {len(done)} of {len(cases)} cases "
                f"({_root_cause(exc)}); finished cases are in the manifest; rerun "
                "with --resume (resume=True)"
            ) from exc
        if row is None:
            return done
        index = int(row["index"])
        if index not in done:  # at most one row per case, whatever Ray retried
            done.add(index)
            _record(cases[index], json.loads(row["outcome"]), tally, size)


def _dataset(ray: ModuleType, cases: list[Any], spec: _WorkerSpec, pool: _Pool, size: int, ledger: Any) -> Any:
    """One row and one block per case (a retry redoes one case), mapped by ``size`` actors."""
    items = [
        {
            "index": i,
            "case_id": case.case_id,
            "path": os.path.abspath(case.path),
            "outputs": json.dumps({k: os.path.abspath(p) for k, p in case.outputs.items()}),
            "channels": json.dumps([os.path.abspath(c) for c in case.channels]),
        }
        for i, case in enumerate(cases)
    ]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    return dataset.map_batches(
        _CaseWorker,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=size),
        num_cpus=pool.cpus,
        num_gpus=pool.gpus,
        fn_constructor_kwargs={"spec": spec, "ledger": ledger, "max_attempts": pool.max_attempts},
    )


def _record(case: Case, outcome: dict[str, Any], tally: CaseRecorder, workers: int) -> None:
    """Append the case's manifest row through the run's tally, as the local engine does."""
    with tally.lock:
        tally.busy += float(outcome.get("busy") or 0.0) / workers
    if outcome["status"] != "ok":
        tally.fail(case, outcome.get("error") or "unknown error", outcome.get("shape"))
        return
    try:
        tally.ok(case, _Grid(tuple(outcome["shape"])), outcome["stats"], outcome["seconds"])
    except Exception as exc:  # e.g. disk full while appending the row
        tally.fail(case, f"{case.path}: manifest append failed: {type(exc).__name__}: {exc}")


def _root_cause(exc: BaseException) -> str:
    """One line naming what stopped a Ray run: the original error of a Ray task, else the
    last line of the message (Ray ends actor errors with the worker's ``Type: message``)."""
    cause = exc
    while isinstance(inner := getattr(cause, "cause", None), BaseException):
        cause = inner
    if cause is not exc:
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(exc).__name__


# ---------------------------------------------------------------------------------- actors
class _AttemptLedger:
    """Counts the starts of each case (one tiny actor per run)."""

    def __init__(self) -> None:
        self._starts: dict[int, int] = {}

    def begin(self, index: int) -> int:
        """Record one more start of case ``index``; returns how many there have been."""
        self._starts[index] = self._starts.get(index, 0) + 1
        return self._starts[index]


@dataclass
class _Outcome:
    """Actor-side :class:`~atso_fast.archive.CaseRecorder`: remembers what happened to one case."""

    status: str = "failed"
    shape: list[int] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = "no outcome was recorded"
    busy: float = 0.0
    lock: Any = field(default_factory=threading.Lock)

    def ok(self, case: Any, meta: Any, stats: Mapping[str, Any], seconds: float) -> None:
        self.status, self.error = "ok", None
        self.shape, self.stats, self.seconds = list(meta.spatial_shape), dict(stats), seconds

    def fail(self, case: Any, message: str, shape: Sequence[int] | None = None) -> None:
        self.status, self.error = "failed", str(message)
        self.shape = None if shape is None else [int(n) for n in shape]

    def to_json(self) -> str:
        return json.dumps(
            {
                "status": self.status,
                "shape": self.shape,
                "stats": self.stats,
                "seconds": self.seconds,
                "error": self.error,
                "busy": self.busy,
            },
            default=_plain,
        )


def _plain(value: Any) -> Any:
    """JSON fallback for NumPy values in a relabeler's stats."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)


class _CaseWorker:
    """Ray Data actor: builds the relabeler once, then relabels the case of each row."""

    def __init__(self, spec: _WorkerSpec, ledger: Any, max_attempts: int) -> None:
        self.relabeler = spec.build()
        self.ledger, self.max_attempts = ledger, max_attempts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outcomes = [
            self._relabel_row(int(i), str(c), str(p), str(o), str(ch))
            for i, c, p, o, ch in zip(
                batch["index"], batch["case_id"], batch["path"], batch["outputs"], batch["channels"], strict=True
            )
        ]
        return {"index": np.asarray(batch["index"], dtype=np.int64), "outcome": np.asarray(outcomes, dtype=object)}

    def _relabel_row(self, index: int, case_id: str, path: str, outputs: str, channels: str) -> str:
        import ray

        outcome = _Outcome()
        starts = ray.get(self.ledger.begin.remote(index))
        if starts > self.max_attempts:
            outcome.fail(
                None,
                f"{path}: the Ray worker died {starts - 1} times while relabelling "
                "this case (a crash or out of memory?); not retried again",
            )
            return outcome.to_json()
        try:
            relabel_case(self.relabeler, case_id, Path(path), json.loads(outputs), outcome, json.loads(channels))
        except Exception as exc:  # a bug here must cost one case, not the run
            outcome.fail(None, f"{path}: {type(exc).__name__}: {exc}")
        return outcome.to_json()
