"""The runtime interface."""
from __future__ import annotations

from typing import Any, Protocol

__all__ = ["Runtime", "RuntimeUnavailable", "check_device", "check_precision"]

PRECISIONS = ("float32", "float16", "bfloat16")


class RuntimeUnavailable(RuntimeError):
    """The runtime (or its GPU flavour) is not installed; the message names what to install."""


class Runtime(Protocol):
    name: str
    device: str
    precision: str

    def __call__(self, batch: Any) -> Any:
        """``(B, M, *window)`` -> ``(B, C, *window)`` on the runtime's device."""


def check_device(device: str) -> str:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision
