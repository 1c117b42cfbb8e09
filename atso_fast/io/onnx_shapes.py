"""Shapes of every tensor an ONNX graph computes, from ONNX shape inference, without copying its
weights: the trust checks size the graph's buffers before a runtime runs it, and the runtimes'
graph rewrites need each node's sizes."""

from __future__ import annotations

from typing import Any

__all__ = ["inferred_shapes"]

_KEEP_BYTES = 4096
"""Initialisers up to this size keep their data (shape values that constant propagation reads)."""


def inferred_shapes(data: bytes | Any, input_dims: dict[int, int]) -> dict[str, tuple[Any, list[int | None]]]:
    """``{name: (elem_type, dims)}`` of the graph's computed values and outputs (``None`` for a
    size inference cannot fix), the first input's symbolic axes set as ``input_dims`` says
    (``{0: batch}`` or ``{0: 1, 2: 48, ...}``; fixed sizes stay). ``data``: serialised bytes or a ``ModelProto``
    (not changed). Empty when inference fails (a check of its own; the runtime reports errors)."""
    import onnx

    model = onnx.ModelProto()
    if isinstance(data, (bytes, bytearray, memoryview)):
        model.ParseFromString(bytes(data))
    else:
        model.CopyFrom(data)
    for weight in model.graph.initializer:  # shapes need dims only: skip the weights' bytes
        if len(weight.raw_data) > _KEEP_BYTES:
            weight.ClearField("raw_data")
    for value in model.graph.input[:1]:
        dims = value.type.tensor_type.shape.dim
        for axis, size in input_dims.items():
            if axis < len(dims) and not dims[axis].HasField("dim_value"):
                dims[axis].ClearField("dim_param")
                dims[axis].dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001
        return {}
    shapes: dict[str, tuple[Any, list[int | None]]] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            shapes[value.name] = (tensor.elem_type, dims)
    return shapes
