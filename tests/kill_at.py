"""Run ``atso-fast train`` and SIGKILL it at one point (the kill -9 resume tests).

``python tests/kill_at.py POINT ARGS...``: POINT is ``train:K:S`` (after step S of round K),
``export:K`` (after round K's package is written, before the phase is recorded) or
``relabel:K:N`` (before the N-th case of round K is relabelled, once N - 1 cases are in the
manifest). The points are reached through seams of ``atso_fast.train.disk_store`` (monkeypatched
here: ``CacheStore._on_step``, ``CacheStore.export`` and the module's ``local_engine``), so the
package carries no test hook.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_rows(path: Path, rows: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and len(path.read_text().splitlines()) >= rows:
            return
        time.sleep(0.01)


def install(point: str) -> None:
    from atso_fast.archive import relabel_archive
    from atso_fast.engine.relabeler import Relabeler
    from atso_fast.train import disk_store

    name, *numbers = point.split(":")
    k = int(numbers[0])
    if name == "train":
        on_step_factory = disk_store.CacheStore._on_step

        def _on_step(self, kk, steps, *args):
            inner = on_step_factory(self, kk, steps, *args)

            def on_step(step, run):
                inner(step, run)  # the checkpoint of this step (checkpoint_every=1) is written first
                if kk == k and step == int(numbers[1]):
                    _die()

            return on_step

        disk_store.CacheStore._on_step = _on_step
    elif name == "export":
        export = disk_store.CacheStore.export

        def _export(self, model, kk):
            out = export(self, model, kk)
            if kk == k:
                _die()
            return out

        disk_store.CacheStore.export = _export
    elif name == "relabel":

        def local_engine(package_dir, inputs, output_dir, *, options, **kw):
            relabeler = Relabeler(package_dir, **{"runtime": "auto", **options})
            if output_dir.parent.name == f"round_{k}":
                inner, calls = relabeler.relabel_volume, [0]

                def relabel_volume(array, **geometry):
                    calls[0] += 1
                    if calls[0] == int(numbers[1]):
                        _wait_rows(output_dir / "manifest.jsonl", int(numbers[1]) - 1)
                        _die()
                    return inner(array, **geometry)

                relabeler.relabel_volume = relabel_volume
            return relabel_archive(relabeler, [str(p) for p in inputs], output_dir, **kw)

        disk_store.local_engine = local_engine
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from atso_fast.cli import main

    sys.exit(main(["train", *sys.argv[2:]]))
