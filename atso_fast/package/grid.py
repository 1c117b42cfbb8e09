"""A derived model package for volumes already on the network's grid.

Training on disk (:mod:`atso_fast.train.disk_store`) preprocesses every case once into a cache on
the network's grid (oriented, cropped, normalised, resampled). Relabelling those cached volumes
with the round's exported package would preprocess them a second time; the derived package runs
the same network with every preprocessing step switched off and keeps only the window grid.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from atso_fast.io import atomic_write_bytes
from atso_fast.package.spec import default_preprocessing

__all__ = ["grid_package"]


def grid_package(package_dir: str | os.PathLike[str], folder: str | os.PathLike[str]) -> Path:
    """Write the network of ``package_dir`` as a package for volumes already on its grid.

    The new ``model.json`` is the source's with no normalisation (``scheme: none``), no target
    spacing, the default preprocessing (as stored: no orientation change, transpose, crop or
    resampling) except the source's window ``grid``, and no torch file. The ONNX file is
    hard-linked (copied where links fail); every file is replaced atomically, so rewriting the
    same folder is safe.

    Args:
        package_dir: an exported package (``model.json`` and its ONNX file).
        folder: where the derived package goes (created).

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        OSError: unreadable source files or an unwritable folder.
        ValueError: a ``model.json`` that is not JSON.
    """
    package, folder = Path(package_dir), Path(folder)
    meta = json.loads((package / "model.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / meta["onnx_file"]
    tmp = folder / f".{meta['onnx_file']}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(package / meta["onnx_file"], tmp)
    except OSError:
        shutil.copyfile(package / meta["onnx_file"], tmp)
    os.replace(tmp, target)
    spec = default_preprocessing()
    spec["grid"] = meta["preprocessing"]["grid"]
    meta.update(normalization={"scheme": "none"}, spacing=None, preprocessing=spec, torch_file=None)
    meta.pop("torch_sha256", None)
    atomic_write_bytes(folder / "model.json", (json.dumps(meta, indent=2) + "\n").encode())
    return folder
