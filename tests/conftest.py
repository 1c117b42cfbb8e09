"""Shared fixtures: seeded RNG, device parametrisation, real-data folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from atso_fast.kernels import native

# compiled models and remembered checks go to a folder of this session, not the user's own
# ~/.cache/atso_fast (every suite run compiled ~200 MB more into it). Worker processes that import
# this file inherit the session's folder (and leave its removal to the session).
_OWN_CACHE = "ATSO_FAST_TEST_CACHE" not in os.environ
if _OWN_CACHE:
    os.environ["ATSO_FAST_TEST_CACHE"] = tempfile.mkdtemp(prefix="atso-fast-test-cache-")
_TEST_CACHE = os.environ["ATSO_FAST_TEST_CACHE"]
os.environ["XDG_CACHE_HOME"] = _TEST_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(_TEST_CACHE, ignore_errors=True)


REAL_DATA = Path(
    os.environ.get("ATSO_FAST_REAL_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
)
REAL_DATA_MISSING = (
    f"real scans not found at {REAL_DATA}: rebuild them from public packages as the README's "
    "'Real-scan tests' section says, and point ATSO_FAST_REAL_DATA at the folder"
)


def pytest_collection_modifyitems(config, items):
    if native.has_cuda():
        return
    info = native.build_info()
    reason = f"needs a CUDA GPU (visible: {info['cuda_devices']}; _C built with CUDA: {info['cuda']})"
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def real_data() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip(REAL_DATA_MISSING)
    return REAL_DATA


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def to_device(array: np.ndarray, device: str):
    """numpy on cpu, a torch CUDA tensor on cuda."""
    if device == "cpu":
        return np.ascontiguousarray(array)
    import torch

    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def to_numpy(array) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.cpu().numpy()


@pytest.fixture
def torch_one_thread():
    """Tiny models run fastest (and least disturbed by busy neighbours) on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def deny_open(monkeypatch):
    """``deny_open(name)``: opening a file of that name raises EACCES, as the kernel does for a
    file without read permission (root, which runs CI, ignores chmod 000)."""
    import os

    real_open = os.open
    denied: set[str] = set()

    def fake_open(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    return denied.add
