"""OpenVINO runtime: the package's ONNX file compiled for window batches of 1..B, cached on disk.

OpenVINO reads ``model.onnx`` directly. The model is reshaped to the relabeler's batch
``(1..B, M, *window)``: a dynamic batch axis bounded by ``B`` (``dynamic_batch=True``, the
default), so a volume's last, shorter batch runs at its own size instead of being zero-padded,
from the one compiled model; ``dynamic_batch=False`` compiles the static ``(B, M, *window)``
and pads short batches with zero windows. It is compiled once for ``target`` (``"CPU"``; an
Intel ``"GPU"`` is accepted but not verified here). ``precision`` maps to OpenVINO's inference
precision hint: ``float32`` is set explicitly (``f32``), because on CPUs with bfloat16 units
(AVX512-BF16, AMX) OpenVINO's default hint is ``bf16``; ``bfloat16``/``float16`` are accepted
only where the device lists that capability. With ``bfloat16`` the model's output is declared
bfloat16 too and handed to the stitching kernels as it is (``ml_dtypes.bfloat16``): OpenVINO's
CPU plugin keeps in float32 every node between an output it returns as float32 and the nearest
convolution, and transposed convolutions do not stop that walk, so a U-Net's whole decoder
(its transposed convolutions and instance norms) ran in float32 (benchmarks/RESULTS.md, issue
13 on the AMX machine: the network 1.7x faster per batch with the bfloat16 output). Compiled
models are cached under ``cache_dir`` (default ``$XDG_CACHE_HOME/atso_fast/openvino``,
``~/.cache/...`` without it), keyed like the TensorRT engine cache: the ONNX file's SHA-256, the
OpenVINO version, the device name, precision, streams, output type and the input shape
(``1..B x M x ...`` when the batch is dynamic).

Pipelining: ``in_flight`` asynchronous infer requests, each with its own output buffer, so the
engine can submit batch k+1 and stitch batch k while it runs
(:meth:`~atso_fast.runtimes.base.Runtime.submit`). ``streams=1`` runs the requests one after
the other on all ``threads`` (latency hint; they share its intermediate buffers), so the
overlap is network vs stitching; ``streams=2`` runs two requests side by side, the threads
split between them, each stream with its own intermediate buffers. Defaults: one stream, and
two batches in flight while one batch's output is at most :data:`PIPELINE_MAX_OUTPUT_BYTES`,
else one (each batch in flight holds its own output buffer: that is what the overlap costs in
memory); ``streams=2`` defaults to three in flight (two on the network while the engine
stitches a third). Two streams were the default for small outputs until they measured 3-7%
slower than one on an AMX machine, within noise on an AVX2 one, at +60-70% memory
(benchmarks/RESULTS.md, issue 13 third pass).
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from atso_fast.io.blob_cache import BlobCache, cache_root
from atso_fast.runtimes.base import (
    FixedRuntime,
    RuntimeUnavailable,
    check_device,
    check_precision,
    model_bytes,
)
from atso_fast.runtimes.onnx_concat import REWRITE as CONCAT_REWRITE
from atso_fast.runtimes.onnx_concat import split_concats
from atso_fast.runtimes.onnx_norm import REWRITE as NORM_REWRITE
from atso_fast.runtimes.onnx_norm import parse_model, rewrite_instance_norms

__all__ = [
    "MAX_IN_FLIGHT",
    "PIPELINE_MAX_OUTPUT_BYTES",
    "OpenVinoRuntime",
    "compiled_cache_key",
    "openvino_available",
    "openvino_supports",
]

PIPELINE_MAX_OUTPUT_BYTES = 256 * 2**20
"""Largest batch output (bytes) for which the default keeps two batches in flight."""

MAX_IN_FLIGHT = 3
"""Most batches that may be pending at once (two streams busy, one being stitched)."""

_HINTS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
_CAPABILITY = {"float32": "FP32", "bfloat16": "BF16", "float16": "FP16"}


def _ov() -> Any:
    try:
        import openvino
    except ImportError:
        raise RuntimeUnavailable("runtime 'openvino' needs the openvino package: pip install openvino") from None
    return openvino


@lru_cache(maxsize=1)
def _core() -> Any:
    """One ``openvino.Core`` per process: it holds the loaded device plugins."""
    return _ov().Core()


def openvino_available() -> bool:
    """True when ``openvino`` imports and offers a CPU device."""
    try:
        return "CPU" in _core().available_devices
    except Exception:  # noqa: BLE001 - not installed, or a broken install: either way unusable
        return False


def openvino_supports(precision: str, target: str = "CPU") -> bool:
    """True when ``target`` runs ``precision`` natively (its ``OPTIMIZATION_CAPABILITIES``)."""
    check_precision(precision)
    try:
        caps = _core().get_property(target, "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - no such device, or openvino missing
        return False
    return _CAPABILITY[precision] in caps


def compiled_cache_key(
    onnx: bytes | Any, ov_version: str, device_name: str, precision: str, input_shape: tuple[int | str, ...]
) -> str:
    """Cache key of a compiled model: ONNX hash + OpenVINO version + device + precision + shape
    (a dynamic batch axis as its bounds, ``"1..4"``). ``onnx``: the ONNX bytes, or a
    ``hashlib.sha256`` object that has consumed them (a package's, so large files are hashed once)."""
    h = hashlib.sha256(onnx) if isinstance(onnx, (bytes, bytearray, memoryview)) else onnx.copy()
    h.update(f"|{ov_version}|{device_name}|{precision}|{'x'.join(map(str, input_shape))}".encode())
    return h.hexdigest()[:32]


class _Request:
    """One infer request and the batch it reads (kept alive and unchanged until it is done)."""

    def __init__(self, request: Any):
        self.request, self.batch, self.busy = request, None, False


class _OvPending:
    """A batch on an infer request; ``result()`` waits for it and frees the request."""

    def __init__(self, runtime: OpenVinoRuntime, slot: _Request, windows: int):
        self._runtime, self._slot, self._windows = runtime, slot, windows
        self._out: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self._out is None:
            slot = self._slot
            try:
                slot.request.wait()
                out = self._runtime._output(slot.request)[: self._windows]  # padded windows dropped
            finally:  # a failed run frees its request too
                slot.busy, slot.batch = False, None
            self._out = out if self._runtime.reuse_output else out.copy()
            self._runtime._called()
        return self._out


class OpenVinoRuntime(FixedRuntime):
    """Runs ``model.onnx`` with OpenVINO (see the module docstring).

    Args:
        onnx_path: the package's ONNX file (one input, one output).
        device: ``"cpu"``: arrays are NumPy on the host (whatever ``target`` computes on).
        precision: ``float32``, or ``bfloat16``/``float16`` where ``target`` supports it.
        batch_size: the largest batch the model is compiled for.
        window, in_channels: the static input shape ``(in_channels, *window)``.
        threads: inference threads (default: OpenVINO's, all cores).
        target: OpenVINO device, ``"CPU"`` (``"GPU"``: an Intel GPU, not verified here).
        cache_dir: compiled-model cache (None: the default above; False: off).
        in_flight: batches that may be pending at once, 1 to :data:`MAX_IN_FLIGHT` (None: see
            the module docstring); settable between volumes (with two streams, one in flight
            runs on one stream's share of the threads).
        streams: OpenVINO CPU streams: 1 (the default) runs one request at a time on all
            threads (latency hint); 2 runs two requests side by side, the threads split between
            them.
        dynamic_batch: compile a batch axis of 1..``batch_size`` (short batches run at their
            size); False: the static ``batch_size``, short batches zero-padded.
        precise_norms: rewrite the model's float32 InstanceNormalization nodes into nested
            per-axis means (:mod:`atso_fast.runtimes.onnx_norm`: OpenVINO's fused MVN sums a
            whole channel in one float32 lane); :attr:`norms_rewritten` then holds how many were
            rewritten (None when the compiled model came from the cache). False: OpenVINO's own
            MVN.
        split_concats: rewrite each channel ``Concat`` read only by a ``Conv`` into one
            convolution per concatenated input plus their sum
            (:mod:`atso_fast.runtimes.onnx_concat`: the decoders' concat copies are never
            written); :attr:`concats_split` then holds how many (None from the cache).
        onnx_sha256: a ``hashlib.sha256`` object that has consumed the ONNX bytes (a package's
            :meth:`~atso_fast.package.ModelPackage.onnx_sha256`), for the cache key; None: hashed here.

    Raises:
        RuntimeUnavailable: openvino is not installed.
        ValueError: a precision the device lacks, or a model OpenVINO cannot read or compile.
    """

    name = "openvino"

    def __init__(
        self,
        onnx: str | os.PathLike | bytes,
        *,
        device: str = "cpu",
        precision: str = "float32",
        batch_size: int = 4,
        window: tuple[int, ...] = (),
        in_channels: int = 1,
        threads: int | None = None,
        target: str = "CPU",
        cache_dir: str | os.PathLike | bool | None = None,
        in_flight: int | None = None,
        streams: int | None = None,
        dynamic_batch: bool = True,
        source: str | os.PathLike | None = None,
        precise_norms: bool = True,
        split_concats: bool = True,
        onnx_sha256: Any = None,
    ):
        self.ov = _ov()
        self.device, self.precision = check_device(device), check_precision(precision)
        if device != "cpu":
            raise ValueError(
                f"runtime 'openvino' takes host arrays (device 'cpu'), got device {device!r}; "
                "use target='GPU' for an Intel GPU"
            )
        if not openvino_supports(precision, target):
            raise ValueError(
                f"runtime 'openvino': {target} does not support {precision} "
                f"(its capabilities: {self._capabilities(target)}); use float32"
            )
        self.onnx_bytes, self.onnx_path = model_bytes(onnx, source)
        self._onnx_sha256 = onnx_sha256  # the package's hash of these bytes, when it has one
        self.target = str(target)
        self.batch_size = max(1, int(batch_size))
        self._sample = (int(in_channels), *(int(w) for w in window))
        self.threads = None if threads is None else max(int(threads), 1)
        if streams is not None and int(streams) not in (1, 2):
            raise ValueError(f"streams must be 1 or 2, got {streams}")
        self.dynamic_batch = bool(dynamic_batch)
        self.cache_dir = self._cache_dir(cache_dir)
        self.reuse_output = False
        self.precise_norms = bool(precise_norms)
        self.norms_rewritten: int | None = None  # None: the compiled model came from the cache
        self.split_concats = bool(split_concats)
        self.concats_split: int | None = None
        self.streams = 1 if streams is None else int(streams)
        self.compiled = self._load()
        self._out_type = self.compiled.output(0).get_element_type().get_type_name()  # f32, or bf16 (see _read)
        out_bytes = self._output_bytes(self.compiled)
        self._slots: list[_Request] = []
        self._next = 0
        self.in_flight = self._default_in_flight(out_bytes) if in_flight is None else in_flight

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        if not 1 <= int(value) <= MAX_IN_FLIGHT:
            raise ValueError(f"in_flight must be 1 to {MAX_IN_FLIGHT}, got {value}")
        if any(slot.busy for slot in getattr(self, "_slots", [])):
            raise RuntimeError("runtime 'openvino': in_flight changed while batches are pending")
        self._in_flight = int(value)

    def _default_in_flight(self, out_bytes: int) -> int:
        """One per stream plus the one being stitched, while the outputs are small enough."""
        if out_bytes > PIPELINE_MAX_OUTPUT_BYTES:
            return 1
        return MAX_IN_FLIGHT if self.streams == 2 else 2

    @property
    def input_shape(self) -> tuple[int | str, ...]:
        """The compiled input shape, the batch axis as ``"1..B"`` when it is dynamic."""
        batch = f"1..{self.batch_size}" if self.dynamic_batch else self.batch_size
        return (batch, *self._sample)

    @staticmethod
    def _capabilities(target: str) -> list[str]:
        try:
            return list(_core().get_property(target, "OPTIMIZATION_CAPABILITIES"))
        except Exception:  # noqa: BLE001 - no such device
            return []

    @staticmethod
    def _cache_dir(cache_dir: str | os.PathLike | bool | None) -> Path | None:
        if cache_dir is False:
            return None
        if cache_dir is None or cache_dir is True:  # the XDG convention, read when the runtime is built
            return cache_root() / "openvino"
        return Path(cache_dir)

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINTS[self.precision]}
        if self.streams == 1:
            config["PERFORMANCE_HINT"] = "LATENCY"
        else:
            config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=self.streams)
        if self.threads is not None and self.target == "CPU":
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config

    def _read(self) -> Any:
        """The ONNX model (its norms and concats rewritten when asked) reshaped to
        :attr:`input_shape` (not compiled)."""
        data = self.onnx_bytes
        # both rewrites on one parse (250 MB for a planner network); bytes that are no ONNX
        # model are left for OpenVINO to report
        proto = parse_model(data) if self.precise_norms or self.split_concats else None
        if self.precise_norms:
            self.norms_rewritten = 0 if proto is None else rewrite_instance_norms(proto, (1, *self._sample))
        if self.split_concats:
            self.concats_split = 0 if proto is None else split_concats(proto, (1, *self._sample))
        if proto is not None and (self.norms_rewritten or self.concats_split):
            data = proto.SerializeToString()
        del proto  # its 250 MB, before OpenVINO reads its own copy
        try:
            model = _core().read_model(data)
            if len(model.inputs) != 1 or len(model.outputs) != 1:
                raise ValueError(f"expected one input and one output, got {len(model.inputs)} and {len(model.outputs)}")
            batch = self.ov.Dimension(1, self.batch_size) if self.dynamic_batch else self.batch_size
            model.reshape({model.inputs[0].get_any_name(): self.ov.PartialShape([batch, *self._sample])})
            if self.precision == "bfloat16":  # the decoder runs in bf16 only with a bf16 output (module docstring)
                ppp = self.ov.preprocess.PrePostProcessor(model)
                ppp.output(0).tensor().set_element_type(self.ov.Type.bf16)
                model = ppp.build()
            return model
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError for everything
            raise self._cannot_compile(exc) from None

    def _output_bytes(self, model: Any) -> int:
        """Bytes of one full batch's output (the dynamic axis at its bound)."""
        dims = [d.get_max_length() for d in model.output(0).get_partial_shape()]
        if any(d < 0 for d in dims):
            raise ValueError(
                f"{self.onnx_path}: the output shape {model.output(0).get_partial_shape()} "
                f"is not bounded for input {'x'.join(map(str, self.input_shape))}"
            )
        return model.output(0).get_element_type().size * int(np.prod(dims))

    def _output(self, request: Any) -> np.ndarray:
        """A finished request's output array; a bfloat16 output as ``ml_dtypes.bfloat16`` (OpenVINO
        hands its bits over as float16)."""
        tensor = request.get_output_tensor(0)
        if tensor.get_element_type() == self.ov.Type.bf16:
            import ml_dtypes  # here: a ~0.5 s import that float32 runs never need

            return tensor.data.view(ml_dtypes.bfloat16)
        return tensor.data

    def _load(self) -> Any:
        """The compiled model: from the disk cache (nothing read, rewritten or reshaped), else
        read and built (and cached). The key holds what the compiled model depends on: the ONNX
        bytes, the OpenVINO version, device, precision (which sets the output type), streams,
        the graph rewrites and the input shape."""
        norms = f"precise-{NORM_REWRITE}" if self.precise_norms else "plain"
        concats = CONCAT_REWRITE if self.split_concats else "kept"
        key = compiled_cache_key(
            self.onnx_bytes if self._onnx_sha256 is None else self._onnx_sha256,
            self.ov.__version__,
            self._device_name(),
            f"{self.precision}/streams{self.streams}/norms-{norms}/{concats}",
            self.input_shape,
        )
        cache = None if self.cache_dir is None else BlobCache(self.cache_dir, f"runtime {self.name}")
        compiled = None if cache is None else cache.load_with(key, self._import)
        if compiled is None:
            compiled = self._build(_core(), self._read())
            if cache is not None:
                self._store(compiled, cache, key)
        return compiled

    def _device_name(self) -> str:
        try:
            return str(_core().get_property(self.target, "FULL_DEVICE_NAME"))
        except Exception:  # noqa: BLE001 - the name only refines the cache key
            return self.target

    def _build(self, core: Any, model: Any) -> Any:
        try:
            return core.compile_model(model, self.target, self._config())
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError for everything
            raise self._cannot_compile(exc) from None

    def _cannot_compile(self, exc: Exception) -> ValueError:
        """The error for a model OpenVINO cannot read, reshape or compile: file, input shape, cause."""
        return ValueError(
            f"{self.onnx_path}: OpenVINO cannot compile the model for input "
            f"{'x'.join(map(str, self.input_shape))} ({' '.join(str(exc).split())[:500]})"
        )

    def _import(self, blob: bytes) -> Any:
        """A cached compiled model (checked by :class:`BlobCache`), or None when OpenVINO cannot
        import it (another build: it is compiled again and overwritten)."""
        try:
            return _core().import_model(blob, self.target, self._config())
        except Exception:  # noqa: BLE001 - a stale blob: rebuild and overwrite it
            return None

    def _store(self, compiled: Any, cache: BlobCache, key: str) -> None:
        """Write the compiled model to the cache; a cache we cannot write only costs a rebuild."""
        try:
            buf = io.BytesIO()
            compiled.export_model(buf)
        except Exception as exc:  # noqa: BLE001 - export is an optimisation; the run goes on
            warnings.warn(
                f"runtime openvino: compiled model not exported for the cache ({exc})", RuntimeWarning, stacklevel=3
            )
            return
        cache.store(key, buf.getbuffer())

    # ------------------------------------------------------------------ running
    def submit(self, batch: Any) -> _OvPending:
        """Start ``batch (b, M, *window)``, b <= ``batch_size``, on the next infer request (at its
        own size with a dynamic batch, else padded to ``batch_size``)."""
        if not isinstance(batch, np.ndarray):
            raise TypeError(f"runtime 'openvino' takes NumPy arrays, got {type(batch).__name__}")
        n = int(batch.shape[0])
        if tuple(batch.shape[1:]) != self._sample or not 1 <= n <= self.batch_size:
            raise ValueError(
                f"runtime 'openvino' was compiled for batches (<= {self.batch_size}, "
                f"{', '.join(map(str, self._sample))}), got {tuple(batch.shape)}"
            )
        slot = self._slot()
        if n < self.batch_size and not self.dynamic_batch:  # zero windows pad; their outputs are dropped
            padded = np.zeros((self.batch_size, *self._sample), np.float32)
            padded[:n] = batch
            batch = padded
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        slot.busy, slot.batch = True, batch  # OpenVINO reads this memory (no copy) until done
        slot.request.start_async({0: batch}, share_inputs=True)
        return _OvPending(self, slot, n)

    def _slot(self) -> _Request:
        """The next request of the ring (``in_flight`` long), created on first use."""
        i = self._next % self.in_flight
        while len(self._slots) <= i:
            self._slots.append(_Request(self.compiled.create_infer_request()))
        slot = self._slots[i]
        if slot.busy:
            raise RuntimeError(
                f"runtime 'openvino': more than in_flight={self.in_flight} batches pending; "
                "take a result before submitting another"
            )
        self._next = i + 1
        return slot

    def __call__(self, batch: Any) -> np.ndarray:
        return self.submit(batch).result()
