"""The runtime interface: everything the engine reads from a runtime is declared here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from atso_fast.io.files import read_regular_file

__all__ = [
    "FixedRuntime",
    "PRECISIONS",
    "Pending",
    "Ready",
    "Runtime",
    "RuntimeUnavailable",
    "check_device",
    "check_precision",
    "model_bytes",
]

PRECISIONS = ("float32", "float16", "bfloat16")


class RuntimeUnavailable(RuntimeError):
    """The runtime (or its GPU flavour) is not installed; the message names what to install."""


@runtime_checkable
class Pending(Protocol):
    """A submitted batch (:meth:`Runtime.submit`); ``result()`` blocks until its outputs are ready."""

    def result(self) -> Any: ...


class Ready:
    """A batch that has already run: what :meth:`FixedRuntime.submit` hands back."""

    __slots__ = ("_out",)

    def __init__(self, out: Any):
        self._out = out

    def result(self) -> Any:
        return self._out


@runtime_checkable
class Runtime(Protocol):
    """A callable ``runtime(batch) -> outputs`` and what the engine may ask of it.

    ``batch`` is ``(B, M, *window)`` float32 (a NumPy array for ``device="cpu"``, a CUDA torch
    tensor for ``device="cuda"``); outputs are ``(B, C, *window)`` float32/float16 on the same side,
    C-contiguous.

    Attributes:
        name: the runtime's name (``"openvino"``, ``"onnxruntime"``, ``"torch"``, ``"tensorrt"``).
        device: ``"cpu"`` or ``"cuda[:N]"``.
        precision: network precision.
        reuse_output: when set True by the caller, outputs may live in one buffer reused by the
            next call (the engine consumes each batch before the next one); False: fresh arrays.
        settled: True once the runtime's one-off costs are behind it (first call, layout probe),
            so that timing a call measures its steady speed.
        in_flight: how many submitted batches may be pending at once (:meth:`submit`); 1 means
            ``submit`` runs the batch before it returns.
        streams: how many batches the runtime computes side by side (OpenVINO's CPU streams,
            the threads split between them); 1 for every other runtime. Pending batches beyond
            ``streams`` wait for a free stream.
        dynamic_batch: True when a batch shorter than the relabeler's ``batch_size`` runs at
            its own size (cheaper than a full one); the engine then splits a volume's windows
            into near-equal batches. False: a short batch costs a full one (padded, or a fixed
            compiled shape), so the engine keeps MONAI's full batches.

    Pipelining (``submit``): the engine submits batch k+1 before it stitches batch k, so the
    network and the stitching kernels overlap. The caller keeps at most ``in_flight`` batches
    pending (submitted, ``result()`` not yet returned), leaves each submitted input array
    unchanged until its ``result()`` has returned, and with ``reuse_output`` uses a result only
    until the next ``in_flight`` submits (each request in flight has its own output buffer).
    ``runtime(batch)`` is ``runtime.submit(batch).result()``.
    """

    name: str
    device: str
    precision: str
    reuse_output: bool
    in_flight: int
    streams: int
    dynamic_batch: bool

    @property
    def settled(self) -> bool: ...

    def __call__(self, batch: Any) -> Any:
        """``(B, M, *window)`` -> ``(B, C, *window)`` on the runtime's device."""

    def submit(self, batch: Any) -> Pending:
        """Start ``batch``; its ``result()`` is what ``runtime(batch)`` returns."""


class FixedRuntime:
    """What every runtime shares unless it overrides it: settled after one call, synchronous
    (``in_flight = 1``: ``submit`` runs the batch, then returns it done; one stream), and runs
    MONAI's full batches (``dynamic_batch = False``).

    Subclasses set ``name`` and call :meth:`_called` after each run (or override ``settled``).
    """

    name = "fixed"
    reuse_output = False
    in_flight = 1
    streams = 1
    dynamic_batch = False
    _calls = 0

    if TYPE_CHECKING:  # every subclass defines it; declared here only for the type checker

        def __call__(self, batch: Any) -> Any: ...

    def submit(self, batch: Any) -> Pending:
        return Ready(self(batch))

    @property
    def settled(self) -> bool:
        return self._calls > 0

    def _called(self) -> None:
        self._calls += 1


def check_device(device: str) -> str:
    """``device`` if it is ``"cpu"``, ``"cuda"`` or ``"cuda:N"``, else ``ValueError``."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def model_bytes(
    model: str | os.PathLike[str] | bytes, source: str | os.PathLike[str] | None = None
) -> tuple[bytes, Path]:
    """``(bytes, path for messages)`` of a serialised model given as bytes (a package's verified
    ``model.onnx``: the runtime loads exactly the bytes that were checked, never the file again)
    or as a path (read once, without blocking)."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model), Path(source if source is not None else "model.onnx")
    return read_regular_file(model), Path(model)
