"""The engine: window maths, the slab merger and the relabeler that composes runtime, plan and merger."""

from __future__ import annotations

from atso_fast.engine.relabeler import NonFiniteInputError, Relabeler, RelabelResult

__all__ = ["NonFiniteInputError", "RelabelResult", "Relabeler"]
