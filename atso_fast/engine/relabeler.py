"""The relabel engine: a runtime, the window plan and a slab merger, composed per volume.

Windows run in MONAI's z-major order and batches (a batch may span two rows of windows); the
:class:`~atso_fast.engine.merger.SlabMerger` blends them into a slab of ``min(pz, Z)`` rows and
finishes rows as soon as no later window covers them, so peak accumulator memory is
``C x pz x Y x X`` instead of MONAI's ``C x Z x Y x X`` (plus its output copy); with
``accumulate_dtype="float16"`` it halves again.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import time
import warnings
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from atso_fast.archive import read_input, relabel_archive
from atso_fast.engine.agreement import choose_runtime, recorded_torch_layout
from atso_fast.engine.merger import ArrayBackend, LabelSink, SlabMerger
from atso_fast.engine.preprocess import Geometry, prepare
from atso_fast.engine.resample import ResampleSink, TimedSink, restore
from atso_fast.engine.windows import (
    batch_bounds,
    check_overlap,
    grid_importance,
    grid_origins,
)
from atso_fast.io import write_confidence, write_labels
from atso_fast.io.limits import check_bytes
from atso_fast.kernels import native
from atso_fast.package import ModelPackage, load_package, validate_meta
from atso_fast.package.check_cache import remembered
from atso_fast.package.trust import largest_tensor
from atso_fast.runtimes import RUNTIMES, load_runtime
from atso_fast.runtimes.base import Pending, Ready, check_device, check_precision

__all__ = [
    "Relabeler",
    "RelabelResult",
    "NonFiniteInputError",
    "check_label_map",
    "relabeler_options",
    "run_fingerprint",
]

_LABEL_OPTIONS = ("runtime", "overlap", "threshold", "ignore_index", "mirror", "precision", "accumulate_dtype")
"""The Relabeler options that change the labels (the fingerprint's settings)."""


class NonFiniteInputError(ValueError):
    """The input volume has NaN/inf voxels and ``nonfinite="fail"``."""


@dataclass
class RelabelResult:
    """Pseudo labels for one volume.

    Attributes:
        labels: ``(Z, Y, X)`` uint8 (uint16 beyond 255 classes); ``ignore_index`` where unsure.
        confidence: ``(Z, Y, X)`` uint8, max probability x 255.
        probabilities: ``(C, Z, Y, X)`` float32 when asked for, else None.
        stats: shape, seconds, windows, label_counts, ignored_voxels, invalid_voxels,
            ignored_fraction, mean_confidence, nonfinite_input_voxels, runtime, device,
            network_shape (the grid the network ran on), ignore_index, label_map (the
            relabeler's, or None), timings (seconds: preprocess, network, stitch, export).
    """

    labels: np.ndarray
    confidence: np.ndarray
    probabilities: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def relabeler_options(options: Mapping[str, Any], *, ignore: Collection[str] = ()) -> dict[str, Any]:
    """The :class:`Relabeler` keyword options among ``options``, checked by name (one rule for
    every caller: the Ray engine's workers and the trainer's relabel passes).

    Args:
        ignore: other keys the caller takes itself (a Ray pool's ``workers``, say): left out.

    Raises:
        TypeError: a key that is neither a Relabeler option nor in ``ignore``, with the known ones.
    """
    params = inspect.signature(Relabeler.__init__).parameters
    known = {n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and not n.startswith("_")}
    unknown = sorted(set(options) - known - set(ignore))
    if unknown:
        raise TypeError(f"unknown Relabeler option(s) {unknown}; known: {sorted(known)}")
    return {k: v for k, v in options.items() if k in known}


def run_fingerprint(package: ModelPackage, options: dict[str, Any]) -> str | None:
    """What decides a run's labels, hashed: the package's verified network, its ``model.json``
    fields and the label-changing options (:data:`_LABEL_OPTIONS`, defaults filled in). The
    archive records it in every ``ok`` row and refuses to resume a folder that another model or
    other settings finished (mixed outputs). ``None`` for a live module (nothing verified)."""
    onnx = package.verified.get("onnx")
    if onnx is None:
        return None
    defaults = inspect.signature(Relabeler.__init__).parameters
    settings = {k: options.get(k, defaults[k].default) for k in _LABEL_OPTIONS}
    settings["overlap"] = list(check_overlap(settings["overlap"]))
    label_map = check_label_map(options.get("label_map"))
    if label_map is not None:  # only then: fingerprints of runs without a map stay as they were
        settings["label_map"] = label_map
    digest = package.onnx_sha256()  # sha256(onnx bytes + settings), the ONNX part hashed once
    digest.update(json.dumps({"package": package.to_json(), **settings}, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def check_label_map(label_map: Any) -> list[list[int]] | None:
    """A label map as sorted ``[[from, to], ...]`` pairs (JSON-friendly), or None.

    Args:
        label_map: ``{label: written label}`` or ``(label, written label)`` pairs; labels not in
            it are written as they are.

    Raises:
        ValueError: a value that is not an int in [0, 65535], or a label mapped twice.
    """
    if label_map is None:
        return None
    pairs = list(label_map.items()) if isinstance(label_map, Mapping) else list(label_map)
    out: dict[int, int] = {}
    for pair in pairs:
        try:
            key, value = pair
        except (TypeError, ValueError):
            raise ValueError(
                f"label_map must be {{label: written label}} or (label, written label) pairs, got {pair!r}"
            ) from None
        if not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 65535 for v in (key, value)
        ):
            raise ValueError(f"label_map entries must be ints in [0, 65535], got {key!r}: {value!r}")
        if int(key) in out:
            raise ValueError(f"label_map maps label {key} twice")
        out[int(key)] = int(value)
    return [[k, out[k]] for k in sorted(out)]


def _apply_label_map(labels: np.ndarray, pairs: list[list[int]]) -> np.ndarray:
    """``labels`` (uint8/uint16) through the map; uint8 unless the labels are uint16 or the map holds a
    value above 255 (decided by the package and the map, never by a case, so a run's files share one dtype)."""
    wide = labels.dtype != np.uint8 or any(v > 255 for _, v in pairs) or any(k > 255 for k, _ in pairs)
    lut = np.arange(65536 if wide else 256, dtype=np.uint16 if wide else np.uint8)
    for key, value in pairs:
        if key < len(lut):
            lut[key] = value
    return lut[labels]


def _mirror_axes(spatial_dims: int, allowed: list[int] | None = None) -> list[tuple[int, ...]]:
    """nnU-Net's test-time mirroring: every non-empty subset of the allowed spatial axes (all by
    default), in nnU-Net's order."""
    axes = [2 + a for a in (range(spatial_dims) if allowed is None else allowed)]
    return [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]


def _package_or_load(package: ModelPackage | None, model_dir: str | Path | None) -> ModelPackage:
    """``package`` when given, else the package in ``model_dir``."""
    if package is not None:
        return package
    if model_dir is None:
        raise TypeError(
            "Relabeler needs model_dir, a model package folder, got None (a live torch module: Relabeler.from_module)"
        )
    return load_package(model_dir)


class Relabeler:
    """Pseudo-label volumes with a model package (or a live torch module).

    ``takes_geometry``: the archive pipeline passes each scan's ``spacing`` and ``affine``.

    Args:
        model_dir: folder with ``model.json`` + ``model.onnx`` (``atso_fast.export_model``).
        runtime: ``"auto"``, ``"openvino"``, ``"onnxruntime"``, ``"tensorrt"`` or ``"torch"``.
            ``auto`` runs the fastest runtime whose label agreement, measured for this network
            and recorded in ``model.json`` (:mod:`atso_fast.engine.agreement`), meets the
            tolerance; without a record, the rule of ``atso_fast.runtimes``. A first choice that
            cannot load the model is skipped with a warning. ``runtime_name`` says which runs,
            ``runtime_reason`` why.
        device: ``"cpu"`` or ``"cuda[:N]"``.
        overlap: window overlap in ``[0, 1)``, scalar or per axis (MONAI's meaning).
        batch_size: windows per runtime call.
        threshold: max probability below which a voxel gets ``ignore_index``.
        ignore_index: label for ignored/invalid voxels (must not be a class index).
        mirror: nnU-Net test-time mirroring over the package's ``mirror_axes`` (all spatial axes
            by default; 2^D - 1 extra passes).
        precision: network precision, ``"float32"``, ``"float16"`` (CUDA) or ``"bfloat16"``.
        accumulate_dtype: ``"float32"`` or ``"float16"`` accumulator (halves slab memory).
        save_probabilities: also return ``(C, Z, Y, X)`` float32 probabilities.
        nonfinite: ``"fail"`` (NaN/inf input voxels raise) or ``"ignore"`` (they are set to 0
            for the network and labelled ``ignore_index``).
        compile: ``torch.compile`` the torch runtime (implies ``runtime="torch"``). The first
            batch compiles (tens of seconds on CPU); worth it for archives, not single volumes.
        threads: CPU threads of the runtime (OpenVINO's inference threads, ONNX Runtime's
            session, torch's intra-op threads during each call; default: all cores); set it
            when several relabelers share a machine (Ray actors do).
        label_map: ``{class: written label}`` applied to the labels last (ignored voxels are
            ``ignore_index`` before it, so map that too if it should change): a network trained on
            Cityscapes trainIds writes labelIds with ``cityscapes.train_to_label_map()``. Labels
            not in the map are kept; ``stats["label_counts"]`` still counts the network's classes.
        kernel_threads: OpenMP threads of our CPU stitching kernels (default: 1 with ONNX
            Runtime on CPU for up to 8 classes, so ORT's own pool keeps the cores, and 1 beside
            a pipelined OpenVINO, whose threads run the next batch meanwhile; else the OpenMP
            default).
    """

    takes_geometry = True

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        runtime: str = "auto",
        device: str = "cpu",
        overlap: float = 0.5,
        batch_size: int = 4,
        threshold: float = 0.0,
        ignore_index: int = 255,
        mirror: bool = False,
        precision: str = "float32",
        accumulate_dtype: str = "float32",
        save_probabilities: bool = False,
        nonfinite: str = "fail",
        compile: bool = False,
        threads: int | None = None,
        kernel_threads: int | None = None,
        label_map: Any = None,
        _package: ModelPackage | None = None,
        _module: Any = None,
    ):
        self.package = _package_or_load(_package, model_dir)
        self._options = {
            "runtime": runtime,
            "overlap": overlap,
            "threshold": threshold,
            "ignore_index": ignore_index,
            "mirror": mirror,
            "precision": precision,
            "accumulate_dtype": accumulate_dtype,
        }
        self.label_map = check_label_map(label_map)
        if self.label_map is not None:
            self._options["label_map"] = self.label_map
        self.device = check_device(device)
        self.overlap = check_overlap(overlap)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        native._check_finalize_args(self.package.num_classes, threshold, ignore_index, "logits")
        self.threshold, self.ignore_index = float(threshold), int(ignore_index)
        self.mirror = bool(mirror)
        self.precision = check_precision(precision)
        if accumulate_dtype not in ("float32", "float16"):
            raise ValueError(f"accumulate_dtype must be 'float32' or 'float16', got {accumulate_dtype!r}")
        self.accumulate_dtype = accumulate_dtype
        self.save_probabilities = bool(save_probabilities)
        if nonfinite not in ("fail", "ignore"):
            raise ValueError(f"nonfinite must be 'fail' or 'ignore', got {nonfinite!r}")
        self.nonfinite = nonfinite
        if self.device.startswith("cuda") and not native.has_cuda():
            raise RuntimeError(
                f"device {device!r} needs a CUDA GPU and a CUDA build of atso_fast._C; "
                f"build_info: {native.build_info()}"
            )
        if compile and runtime not in ("auto", "torch"):
            raise ValueError(f"compile=True compiles the torch runtime; runtime {runtime!r} cannot be compiled")
        if runtime != "auto" or compile:
            candidates = [self._check_runtime("torch" if compile else runtime)]
            self.runtime_reason = f"{candidates[0]}: asked for"
        else:  # the package's measured agreement, else the rule (atso_fast.engine.agreement)
            candidates, self.runtime_reason = choose_runtime(
                self.package,
                device=self.device,
                precision=self.precision,
                has_module=_module is not None,
                has_program=self._has_program(),
            )
        self._check_graph_memory()
        self.runtime = load_runtime(
            candidates,
            device=self.device,
            package=self.package,
            module=_module,
            precision=precision,
            batch_size=self.batch_size,
            compile=compile,
            threads=threads,
            channels_last=None if _module is not None else recorded_torch_layout(self.package, self.device, precision),
        )
        self._kernel_threads = kernel_threads
        self.runtime.reuse_output = True  # _stream takes each result before its buffer is reused
        self._backend = ArrayBackend(self.device)
        self._windows = 0  # windows run for the last volume (mirrored passes included)
        self._grid = self.package.preprocessing["grid"]
        self._geometry: Geometry | None = None  # of the volume being relabelled
        self._net_seconds = 0.0
        self._warned: set[str] = set()
        self._first_spacing: tuple[float | None, ...] | None = None  # z is None for a 2D image

    @cached_property
    def _importance(self) -> Any:
        """The windows' blending weights, built at the first merge: the first batches are
        running by then, so nnU-Net's gaussian (and its scipy import) is not in the time before
        the first window. A writable copy: the cached map is read-only, and torch warns on
        read-only arrays."""
        return self._backend.upload(grid_importance(self._grid, self.package.window).copy())

    @property
    def runtime_name(self) -> str:
        """The runtime that runs the windows (what ``auto`` chose)."""
        return self.runtime.name

    @property
    def runtime_label(self) -> str:
        """``runtime_name`` for reports (the archive summary's ``runtime``)."""
        return self.runtime_name

    @property
    def fingerprint(self) -> str | None:
        """:func:`run_fingerprint` of this relabeler's package and options."""
        return run_fingerprint(self.package, self._options)

    @staticmethod
    def _check_runtime(name: str) -> str:
        if name not in RUNTIMES:
            raise ValueError(f"runtime must be one of {RUNTIMES}, got {name!r}")
        return name

    @property
    def kernel_threads(self) -> int | None:
        """OpenMP threads of the stitching kernels for the next volume (None: OpenMP default)."""
        if self._kernel_threads is not None:
            return self._kernel_threads
        active = self.runtime.name
        if self.device != "cpu":
            return None
        if active == "onnxruntime" and self.package.num_classes <= 8:
            # ORT has its own thread pool: our OpenMP workers, spin-waiting after each kernel,
            # take cores from ORT's next run. One kernel thread: 3-class UNet overhead 1.6-5.3%
            # -> -0.1-3.4%; but at 105 classes the kernels' own work wins (2.4% -> 6.8%).
            return 1
        if active == "openvino" and self.runtime.in_flight > 1:
            # pipelined: the kernels run while OpenVINO's threads run the next batch, so one
            # kernel thread beside them (benchmarks/RESULTS.md, OpenVINO section)
            return 1
        return None

    def _has_program(self) -> bool:
        pkg = self.package
        if pkg.root is None or not pkg.torch_file:
            return False
        return (pkg.root / pkg.torch_file).is_file()

    @classmethod
    def from_module(
        cls,
        module: Any,
        *,
        window,
        num_classes: int,
        kind: str = "logits",
        normalization: dict | None = None,
        in_channels: int = 1,
        **kw,
    ) -> Relabeler:
        """A relabeler around a live torch module (torch runtime, nothing exported)."""
        win, norm = validate_meta(window, in_channels, num_classes, kind, normalization, "Relabeler.from_module")
        package = ModelPackage(None, win, in_channels, num_classes, kind, norm, onnx_file=None)
        kw.setdefault("runtime", "torch")
        return cls(None, _package=package, _module=module, **kw)

    def relabel_archive(
        self, inputs, output_dir, *, resume: bool = False, num_parts: int = 1, part_id: int = 0, **kw
    ) -> dict[str, Any]:
        """Relabel every volume under ``inputs`` into ``output_dir`` (see ``atso_fast.archive``)."""
        return relabel_archive(self, inputs, output_dir, resume=resume, num_parts=num_parts, part_id=part_id, **kw)

    def relabel_file(
        self, image: str | Path | list[str | Path], output: str | Path, *, confidence: str | Path | None = None
    ) -> RelabelResult:
        """Relabel one scan file and write its label map on the scan's own grid and header.

        Args:
            image: the scan (any format ``atso_fast.io`` reads, a DICOM series folder), or an
                nnU-Net case's channel files ``[CASE_0000, CASE_0001, ...]``.
            output: the label map; its suffix picks the format (``.nii.gz``, ``.nrrd``, ...).
            confidence: also write the uint8 confidence map here.

        Returns:
            the :class:`RelabelResult` (labels, confidence, stats).

        Raises:
            InputError: an unreadable scan (naming it); ValueError: see :meth:`relabel_volume`.
        """
        files = [Path(p) for p in image] if isinstance(image, (list, tuple)) else [Path(image)]
        array, meta = read_input(files, self.package.in_channels)
        result = self.relabel_volume(array, spacing=meta.spacing, affine=meta.affine)
        write_labels(output, result.labels, meta)
        if confidence is not None:
            write_confidence(confidence, result.confidence, meta)
        return result

    # ------------------------------------------------------------------ one volume
    def relabel_volume(
        self, array: Any, *, spacing: Any = None, affine: Any = None, normalized: bool = False
    ) -> RelabelResult:
        """Pseudo labels for one volume, on its own grid.

        With a package that has a spacing (and the scan's ``spacing``), the scan is brought to
        the network's grid as the package says (reorient, transpose, crop, normalise, resample;
        ``atso_fast.engine.preprocess``) and the blended output goes back row by row
        (``atso_fast.engine.resample``): labels, confidence and probabilities always come out on
        the input's grid.

        Args:
            array: ``(Z, Y, X)``, ``(M, Z, Y, X)`` or a 2D ``(Y, X)`` image; any real dtype
                (a NumPy array or a CPU torch tensor).
            spacing: the scan's voxel size in mm along ``(Z, Y, X)`` (``VolumeMeta.spacing``);
                None: unknown (the scan is taken to be at the model's spacing, with a warning).
            affine: the scan's RAS voxel-to-world affine (``VolumeMeta.affine``), used when the
                package reorients to RAS.
            normalized: skip the package's intensity normalisation.

        Raises:
            ValueError: wrong rank, channel count, dtype or spacing, or an empty volume.
            NonFiniteInputError: NaN/inf voxels while ``nonfinite="fail"``.
            ValueError: the network's output holds NaN/inf (a broken model or package).
        """
        start = time.perf_counter()
        arr, bad = self._prepare(array)
        spacing = self._check_spacing(spacing, arr.shape[1])
        vol, geom = prepare(
            arr, self.package, spacing=spacing, affine=affine, normalized=normalized, invalid=bad, device=self.device
        )
        del arr
        for note in geom.notes:
            self._warn_once(note)
        self._geometry, self._net_seconds = geom, 0.0
        prepared = time.perf_counter()
        with native.kernel_threads(self.kernel_threads):
            sink = self._stream(vol)
        streamed = time.perf_counter()
        out = self._finish(sink, geom)
        if out.totals.invalid:  # before the input's own NaN voxels are marked
            raise ValueError(
                f"the network's output holds NaN/inf for {out.totals.invalid} of "
                f"{out.labels.size} voxels; no labels are written for a broken output"
            )
        if bad is not None:
            out.mark_invalid(bad)
        labels = out.labels if self.label_map is None else _apply_label_map(out.labels, self.label_map)
        end = time.perf_counter()
        sink_seconds = sink.seconds
        timings = {
            "preprocess": prepared - start,
            "network": self._net_seconds,
            "stitch": max(streamed - prepared - self._net_seconds - sink_seconds, 0.0),
            "export": sink_seconds + end - streamed,
        }
        return RelabelResult(
            labels, out.confidence, out.probabilities, self._stats(out, geom, bad, end - start, timings)
        )

    def _stats(
        self, out: LabelSink, geom: Geometry, bad: np.ndarray | None, seconds: float, timings: dict[str, float]
    ) -> dict[str, Any]:
        totals, conf = out.totals, out.confidence
        n = int(np.prod(conf.shape))
        return {
            "shape": list(conf.shape),
            "seconds": seconds,
            "windows": self._windows,
            "label_counts": totals.counts.tolist(),
            "ignored_voxels": totals.ignored,
            "invalid_voxels": totals.invalid,
            "ignored_fraction": (totals.ignored + totals.invalid) / n,
            "mean_confidence": float(conf.mean(dtype=np.float64)) / 255.0,
            "nonfinite_input_voxels": 0 if bad is None else int(bad.sum()),
            "runtime": self.runtime_name,
            "device": self.device,
            "network_shape": list(geom.target),
            "ignore_index": self.ignore_index,
            "label_map": self.label_map,
            "spacing": None if geom.spacing is None else [geom.spacing[geom.perm.index(a)] for a in range(3)],
            "timings": timings,  # spacing: the scan's own (z, y, x), undoing the network axes' order
        }

    def _warn_once(self, message: str, key: str | None = None) -> None:
        """One warning per relabeler per kind (``key``, default the message): a note that names
        each scan's values must not repeat for every scan of an archive."""
        key = message if key is None else key
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message + " (said once per run)", RuntimeWarning, stacklevel=3)

    def _check_spacing(self, spacing: Any, depth: int) -> tuple[float, float, float] | None:
        """Validate a scan's spacing; for a package without one, warn once when scans' spacings
        differ by more than 20% (a model trained at one resolution sees the others at another
        scale; the distance between slices of a single 2D image, ``depth`` 1, does not count)."""
        if spacing is None:
            return None
        try:
            sp = tuple(float(s) for s in spacing)
        except (TypeError, ValueError):
            raise ValueError(f"spacing must be 3 positive numbers (mm, z y x), got {spacing!r}") from None
        if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
            raise ValueError(f"spacing must be 3 positive numbers (mm, z y x), got {spacing!r}")
        if self.package.spacing is None:
            seen = sp if depth > 1 else (None, *sp[1:])
            if self._first_spacing is None:
                self._first_spacing = seen
            elif any(
                a is not None and b is not None and max(a, b) / min(a, b) > 1.2
                for a, b in zip(seen, self._first_spacing)
            ):
                self._warn_once(
                    f"scans' spacings differ by more than 20% ({list(self._first_spacing)} vs "
                    f"{list(sp)} mm) but the model package records no spacing, so every scan runs "
                    "at its own resolution; export the package with --spacing (export_model(spacing=...)) "
                    "to resample",
                    key="spacings differ",
                )
        return sp

    def _make_sink(self, shape: tuple[int, int, int]) -> Any:
        """The row sink of the network's grid ``(Z, Y, X)``: labels directly, or resampling back first."""
        pkg, geom = self.package, self._geometry
        native_shape = shape if geom is None or geom.back is None else geom.cropped
        inner = LabelSink(
            native_shape,
            pkg.num_classes,
            kind=pkg.kind,
            threshold=self.threshold,
            ignore_index=self.ignore_index,
            backend=self._backend,
            save_probabilities=self.save_probabilities,
        )
        if geom is None or geom.back is None:
            return TimedSink(inner)
        return ResampleSink(inner, geom.back, cuda=self._backend.cuda)

    def _finish(self, sink: Any, geom: Geometry) -> LabelSink:
        inner = sink.finalize() if isinstance(sink, ResampleSink) else sink.sink
        pkg = self.package
        return restore(
            inner,
            geom,
            num_classes=pkg.num_classes,
            kind=pkg.kind,
            threshold=self.threshold,
            ignore_index=self.ignore_index,
            backend=ArrayBackend("cpu"),
        )

    def _prepare(self, array: Any) -> tuple[np.ndarray, np.ndarray | None]:
        if type(array).__module__.split(".")[0] == "torch":
            array = array.detach().cpu().numpy()
        arr = np.asarray(array)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"volume must have a real numeric dtype, got {arr.dtype}")
        if arr.ndim in (2, 3):
            arr = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
        m = self.package.in_channels
        if arr.ndim != 4 or arr.shape[0] != m:
            raise ValueError(
                f"volume must be (Z, Y, X) or ({m}, Z, Y, X) for a model with {m} input "
                f"channel(s), got shape {np.shape(array)}"
            )
        if arr.size == 0:
            raise ValueError(f"volume is empty (shape {np.shape(array)})")
        arr = arr.astype(np.float32, copy=False)
        finite = np.isfinite(arr)
        bad = None
        if not finite.all():
            bad = ~finite.all(axis=0)
            if self.nonfinite == "fail":
                raise NonFiniteInputError(
                    f"volume has {int(bad.sum())} NaN/inf voxels; use nonfinite='ignore' "
                    "(--nonfinite ignore) to label them ignore_index"
                )
            arr = np.where(finite, arr, np.float32(arr[finite].mean() if finite.any() else 0.0))
        return arr, bad

    def _check_graph_memory(self) -> None:
        """Refuse a package whose ONNX graph computes a tensor the memory cannot hold at this
        batch size (found by shape inference, before any runtime allocates it)."""
        onnx = self.package.verified.get("onnx")
        if onnx is None:
            return
        name, nbytes = remembered(
            "largest-tensor",
            [self.package.onnx_sha256().hexdigest(), self.batch_size],
            lambda: list(largest_tensor(onnx, self.batch_size)),
        )
        check_bytes(self.package.onnx_path, nbytes, f"its graph's tensor {name!r} (batch {self.batch_size})", share=2)

    def _check_memory(self, shape: tuple[int, ...]) -> None:
        """Refuse a volume whose accumulator slab and window outputs cannot fit (a package with
        60,000 classes, say) before allocating them, with the numbers."""
        if self.device != "cpu":
            return  # GPU memory is the runtime's to report
        classes, win = self.package.num_classes, self.package.window3d
        slab = classes * min(win[0], shape[0]) * shape[1] * shape[2] * (2 if self.accumulate_dtype == "float16" else 4)
        outputs = self.batch_size * max(self.runtime.in_flight, 1) * classes * math.prod(win) * 4
        probabilities = classes * math.prod(shape) * 4 if self.save_probabilities else 0
        check_bytes(
            None,
            slab + outputs + probabilities,
            f"relabelling a {'x'.join(map(str, shape))} grid with "
            f"{classes} classes (accumulator slab, window outputs{', probabilities' if probabilities else ''})",
            share=2,
        )

    def _stream(self, vol: np.ndarray) -> Any:
        """Sliding window over ``vol (M, Z, Y, X)`` in the grid profile's order and :meth:`_batches`,
        blended by a :class:`~atso_fast.engine.merger.SlabMerger` into the row sink of
        :meth:`_make_sink` (returned).

        Pipelined: up to ``runtime.in_flight`` batches are on the network while the oldest one
        is stitched, so with an asynchronous runtime (OpenVINO) blending batch k overlaps the
        network on batch k+1. Batches are merged in submit order, so the labels are the same
        (bit for bit) at any depth.
        """
        be, pkg = self._backend, self.package
        shape = vol.shape[1:]
        win = pkg.window3d
        self._check_memory(shape)
        sink = self._make_sink(shape)
        merger = SlabMerger(shape, pkg.num_classes, win[0], sink, backend=be, accumulate_dtype=self.accumulate_dtype)
        origins = grid_origins(self._grid, shape, win, self.overlap)
        vol_d = be.upload(vol)
        # window buffers, one per batch in flight: a runtime reads its input until the result is taken
        free: list[Any] = []
        pending: deque[tuple[Pending, np.ndarray, Any]] = deque()
        depth = 1 if self.mirror else self.runtime.in_flight  # mirrored batches run at once
        for lo, hi in self._batches(len(origins)):
            while len(pending) >= depth:
                free.append(self._merge(merger, *pending.popleft()))
            chunk = origins[lo:hi]
            buf = free.pop() if free else be.zeros((self.batch_size, pkg.in_channels, *win), "float32")
            patches = native.extract_patches(vol_d, chunk, win, out=buf[: len(chunk)])
            pending.append((self._submit(patches), chunk, buf))
        while pending:
            self._merge(merger, *pending.popleft())
        merger.finalize()
        passes = 1 + (len(_mirror_axes(pkg.spatial_dims, pkg.mirror_axes)) if self.mirror else 0)
        self._windows = len(origins) * passes
        return sink

    def _batches(self, n: int) -> list[tuple[int, int]]:
        """``[start, stop)`` of each batch of the ``n`` windows, in the grid's order.

        Batches span rows of windows. With fixed-size runtimes they are MONAI's (full, then the
        rest): a short batch costs about as much as a full one there (it is padded, or runs a
        fixed compiled shape), so fewer batches is all that counts. A runtime with a dynamic
        batch runs a short batch at its size, so the windows are spread evenly (10 at 4: 4, 3, 3
        rather than 4, 4, 2): batches side by side on two streams finish together, and no tiny
        batch runs alone at the end. The windows' order, and so the blending, is the same.
        """
        return batch_bounds(n, self.batch_size, even=self.runtime.dynamic_batch)

    def _submit(self, patches: Any) -> Pending:
        """Windows ``(B, M, pz, py, px)`` on their way through the runtime (mirrored: at once)."""
        x = patches.reshape(patches.shape[0], self.package.in_channels, *self.package.window)  # 2D: no unit z
        start = time.perf_counter()
        pending = Ready(self._mirrored(x)) if self.mirror else self.runtime.submit(x)
        self._net_seconds += time.perf_counter() - start
        return pending

    def _merge(self, merger: SlabMerger, pending: Pending, chunk: np.ndarray, buf: Any) -> Any:
        """Blend a submitted batch's outputs into the slab; returns its window buffer, free again."""
        start = time.perf_counter()
        out = pending.result()  # waiting for the network: what of it the pipeline did not hide
        self._net_seconds += time.perf_counter() - start
        merger.aggregate(self._checked(out, len(chunk)), chunk, self._importance)
        return buf  # the output is dropped here, before the next network call

    def _mirrored(self, x: Any) -> Any:
        """Mean of the runtime over ``x`` and its mirror images (nnU-Net's test-time mirroring)."""
        out = self.runtime(x)
        total = out.astype(np.float32) if isinstance(out, np.ndarray) else out.float()
        axes_list = _mirror_axes(self.package.spatial_dims, self.package.mirror_axes)
        for axes in axes_list:
            total += self._backend.flip(self.runtime(self._backend.flip(x, axes)), axes)
        return total / (len(axes_list) + 1)

    def _checked(self, out: Any, b: int) -> Any:
        """Runtime outputs ``(B, C, *window)`` as ``(B, C, pz, py, px)``, or a clear error."""
        pkg = self.package
        want = (b, pkg.num_classes, *pkg.window)
        if tuple(out.shape) != want:
            raise ValueError(
                f"runtime {self.runtime_name!r} returned windows of shape {tuple(out.shape)}, "
                f"expected {want} (check the package's num_classes/window)"
            )
        return out.reshape(b, pkg.num_classes, *pkg.window3d)
