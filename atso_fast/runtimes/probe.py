"""``auto`` on CPU by measurement: time the candidate runtimes on the first real batches.

Which runtime is fastest on a CPU depends on the model, not on a rule: for the MONAI UNet with
3 classes eager torch (channels-last) was 1.17-1.45x MONAI where ONNX Runtime was 0.95-0.99x,
while with a 105-class head ONNX Runtime led (1.53x vs 1.12x; benchmarks/RESULTS.md). So when a
package carries both ``model.onnx`` and ``model.pt2`` (and has few classes, see
``PROBE_MAX_CLASSES``), ``auto`` runs its first full batches on each candidate in turn and keeps
the faster, like torch's own channels-last probe (which it
contains). Every probe batch is a real batch whose output is used: nothing is computed twice,
the cost is only the slower candidate's extra time on its few batches. The candidates agree to
float32 rounding (label agreement 0.999999 on the UNet), so the first volume may mix their
outputs at that level.
"""
from __future__ import annotations

import time
import warnings
from typing import Any

__all__ = ["ProbeRuntime"]


class ProbeRuntime:
    """Runs the first full batches on each candidate, then only on the fastest.

    A candidate is probed in a run of consecutive calls (so no other runtime's threads are
    winding down during its timings): calls until it has settled (its first call, or for torch
    until its layout probe is done), then ``timed`` calls whose best time is its score. Short
    batches (a volume's last) run on the candidate under probe and are not timed.

    Args:
        candidates: ``{name: runtime}`` in probe order; all take the same batches.
        batch_size: the relabeler's full batch size.
        timed: timed calls per candidate after it has settled.
    """

    name = "auto"

    def __init__(self, candidates: dict[str, Any], *, batch_size: int, timed: int = 3):
        if not candidates:
            raise ValueError("ProbeRuntime needs at least one candidate runtime")
        self._candidates = dict(candidates)
        first = next(iter(self._candidates.values()))
        self.device, self.precision = first.device, first.precision
        self.batch_size, self.timed = int(batch_size), int(timed)
        self.scores: dict[str, list[float]] = {name: [] for name in self._candidates}
        self.choice: str | None = None if len(self._candidates) > 1 else next(iter(self._candidates))
        self._calls = 0  # calls of the candidate under probe

    @property
    def reuse_output(self) -> bool:
        return any(rt.reuse_output for rt in self._candidates.values())

    @reuse_output.setter
    def reuse_output(self, value: bool) -> None:
        for rt in self._candidates.values():
            rt.reuse_output = value

    @property
    def settled(self) -> bool:
        """True once the choice is made (the chosen runtime has run by then)."""
        return self.choice is not None and self._candidates[self.choice].settled

    @property
    def active(self) -> str:
        """The runtime the next batch runs on: the choice, or the candidate under probe."""
        if self.choice is not None:
            return self.choice
        return next(name for name, times in self.scores.items() if len(times) < self.timed)

    def __call__(self, batch: Any) -> Any:
        if self.choice is not None:
            return self._candidates[self.choice](batch)
        name = self.active
        try:
            return self._probe_call(name, batch)
        except Exception as exc:  # noqa: BLE001 - a candidate that fails leaves the others
            if len(self._candidates) == 1:
                raise
            self._drop(name, exc, len(batch))
            return self(batch)

    def _drop(self, name: str, exc: Exception, windows: int) -> None:
        """A candidate failed on a batch (say a ``model.pt2`` exported with a fixed batch size):
        the others go on, the batch is rerun on the next one."""
        warnings.warn(f"runtime auto: {name} failed on a batch of {windows} windows ({exc}); "
                      "dropped from the probe", RuntimeWarning, stacklevel=4)
        del self._candidates[name], self.scores[name]
        self._calls = 0
        if len(self._candidates) == 1:
            self.choice = next(iter(self._candidates))
        else:
            self._decide()

    def _probe_call(self, name: str, batch: Any) -> Any:
        runtime = self._candidates[name]
        if batch.shape[0] < self.batch_size:
            return runtime(batch)
        settled = self._calls > 0 and runtime.settled  # its first full batch is never timed
        self._calls += 1
        t0 = time.perf_counter()
        out = runtime(batch)
        if settled:
            self.scores[name].append(time.perf_counter() - t0)
            if len(self.scores[name]) == self.timed:
                self._calls = 0
                self._decide()
        return out

    def _decide(self) -> None:
        if any(len(times) < self.timed for times in self.scores.values()):
            return
        self.choice = min(self.scores, key=lambda name: min(self.scores[name]))
        # the losers' sessions and weights are freed; the scores stay for reports
        self._candidates = {self.choice: self._candidates[self.choice]}
