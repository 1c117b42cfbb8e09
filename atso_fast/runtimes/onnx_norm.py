"""InstanceNormalization rewritten so that a float32 runtime computes it as exactly as the network.

OpenVINO's CPU plugin runs an ONNX ``InstanceNormalization`` as one fused MVN on its blocked
channel layout, where each SIMD lane holds one channel and adds up all of that channel's voxels
in a single float32 accumulator: for the 16 x 48 x 96 x 96 output of an nnU-Net's first stage
that is 442,368 terms per sum. The normalised activations then differ from float64 by ~1e-4
relative (against ~1e-5 for the same norm fed with a contiguous tensor), and through 36 norms a
planner-sized U-Net's logits by up to 0.05: 99.948% of labels equal to the float64 network on
real CT windows (benchmarks/RESULTS.md, issue 25). That is the gap issue 25 measured on
abdominal CT.

:func:`precise_instance_norms` replaces each ``InstanceNormalization`` by the same function in
plain ops: the mean and then the variance of ``x - mean`` (two passes, as the definition reads),
each as nested per-axis means, the last axis first, so no float32 sum runs over more than one
axis' length. Each per-axis mean is a ``ReduceSum`` times ``1 / n``: a chain of ``ReduceMean``
would be merged back by OpenVINO's ``ReduceMerge`` and then ``MVNFusion`` passes into the very
MVN this avoids (measured: the same 0.053 error). The rewrite needs the spatial sizes of each
norm's input, from ONNX shape inference on the runtime's window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from atso_fast.io.onnx_shapes import inferred_shapes

__all__ = ["precise_instance_norms"]


def _parse(onnx_bytes: bytes) -> Any:
    """The ModelProto, or None when the bytes are not one (the runtime then says what is wrong)."""
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(onnx_bytes)
    except DecodeError:
        return None
    return model


def precise_instance_norms(onnx_bytes: bytes, input_shape: Sequence[int]) -> tuple[bytes, int]:
    """``(model bytes, norms rewritten)``: ``onnx_bytes`` with every ``InstanceNormalization``
    of the main graph whose input sizes shape inference fixes for an input of ``input_shape``
    ``(batch, channels, *window)`` rewritten as the module docstring says; the input bytes
    themselves when there is none (or the bytes are no ONNX model). The model's inputs and
    outputs are unchanged."""
    model = _parse(onnx_bytes)
    if model is None or not any(node.op_type == "InstanceNormalization" for node in model.graph.node):
        return onnx_bytes, 0
    shapes = inferred_shapes(model, dict(enumerate(int(d) for d in input_shape)))
    graph = model.graph
    first = graph.input[0]  # the window batch: its sizes are input_shape's
    inputs: dict[str, tuple[Any, list[int | None]]] = {
        first.name: (first.type.tensor_type.elem_type, [int(d) for d in input_shape])
    }
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    rewrite = _Rewrite(graph, shapes, inputs, axes_as_input=opset >= 13)
    nodes = []
    for index, node in enumerate(graph.node):
        nodes.extend(rewrite.node(node, index))
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph, rewrite.replaced_weights)
    return (model.SerializeToString(), rewrite.count) if rewrite.count else (onnx_bytes, 0)


def _drop_unused(graph: Any, names: set[str]) -> None:
    """Remove the initialisers ``names`` no node reads any more (the norms' own scale and bias,
    now folded into broadcastable copies; runtimes warn about unused initialisers)."""
    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.input}
    keep = [init for init in graph.initializer if init.name not in names or init.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


class _Rewrite:
    """Builds the replacement nodes and their constants into ``graph``."""

    def __init__(
        self,
        graph: Any,
        shapes: dict[str, tuple[Any, list[int | None]]],
        inputs: dict[str, tuple[Any, list[int | None]]],
        *,
        axes_as_input: bool,
    ):
        self.graph = graph
        self.axes_as_input = axes_as_input  # ReduceSum's axes: an input from opset 13, before an attribute
        self.shapes = shapes
        self.inputs = inputs
        self.initializers = {init.name: init for init in graph.initializer}
        self.count = 0
        self.replaced_weights: set[str] = set()

    def _float32_dims(self, name: str) -> list[int | None] | None:
        """Sizes of the float32 value ``name``; None when unknown or of another type."""
        from onnx import TensorProto

        known = self.shapes.get(name) or self.inputs.get(name)
        if known is None:
            return None
        elem_type, dims = known
        return dims if elem_type == TensorProto.FLOAT else None

    def _const(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def node(self, node: Any, index: int) -> list[Any]:
        """``node`` itself, or its replacement when it is an InstanceNormalization we can size."""
        if node.op_type != "InstanceNormalization" or node.domain not in ("", "ai.onnx"):
            return [node]
        x, scale, bias = node.input
        dims = self._float32_dims(x)
        if dims is None or len(dims) < 3 or any(d is None or d < 1 for d in dims[2:]):
            return [node]  # sizes unknown, or not float32: the runtime's own norm
        if scale not in self.initializers or bias not in self.initializers:
            return [node]
        self.count += 1
        self.replaced_weights.update((scale, bias))
        return self._replacement(node, index, [int(d) for d in dims[2:] if d is not None])

    def _replacement(self, node: Any, index: int, spatial: list[int]) -> list[Any]:
        from onnx import helper, numpy_helper

        x, scale, bias = node.input
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = f"atso_precise_in{index}_"
        broadcast = (-1,) + (1,) * len(spatial)
        s = numpy_helper.to_array(self.initializers[scale]).astype(np.float32).reshape(broadcast)
        b = numpy_helper.to_array(self.initializers[bias]).astype(np.float32).reshape(broadcast)
        out: list[Any] = []

        def nested_mean(src: str, tag: str) -> str:
            cur = src
            for axis in reversed(range(2, 2 + len(spatial))):
                name = f"{p}{tag}{axis}"
                inv = self._const(f"{name}_inv", np.array(1.0 / spatial[axis - 2], np.float32))
                if self.axes_as_input:
                    axes = self._const(f"{name}_axes", np.array([axis], np.int64))
                    out.append(helper.make_node("ReduceSum", [cur, axes], [f"{name}_sum"], keepdims=1))
                else:
                    out.append(helper.make_node("ReduceSum", [cur], [f"{name}_sum"], axes=[axis], keepdims=1))
                out.append(helper.make_node("Mul", [f"{name}_sum", inv], [name]))
                cur = name
            return cur

        mean = nested_mean(x, "mean")
        out.append(helper.make_node("Sub", [x, mean], [p + "centred"]))
        out.append(helper.make_node("Mul", [p + "centred", p + "centred"], [p + "squared"]))
        var = nested_mean(p + "squared", "var")
        out.append(helper.make_node("Add", [var, self._const(p + "eps", np.array(eps, np.float32))], [p + "var_eps"]))
        out.append(helper.make_node("Sqrt", [p + "var_eps"], [p + "std"]))
        out.append(helper.make_node("Div", [self._const(p + "scale", s), p + "std"], [p + "gain"]))
        out.append(helper.make_node("Mul", [p + "centred", p + "gain"], [p + "scaled"]))
        out.append(helper.make_node("Add", [p + "scaled", self._const(p + "bias", b)], [node.output[0]]))
        return out
