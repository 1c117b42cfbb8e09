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
plain ops whose float32 sums never run over more than one axis' length: the mean and the mean
of squares as nested per-axis means, the last axis first. The mean is ``ReduceSum`` times
``1 / n`` per axis (a chain of ``ReduceMean`` would be merged back by OpenVINO's
``ReduceMerge`` and ``MVNFusion`` passes into the very MVN this avoids: measured, the same 0.053
error). The mean of squares starts with ``ReduceL2`` over the last axis, squared: it reads the
tensor once and writes nothing (an explicit ``x * x`` would write a full-size tensor first).
Then ``var = max(E[x^2] - mean^2, 0)`` and ``y = x * gain + (bias - mean * gain)`` with
``gain = scale / sqrt(var + eps)``: two reads and one read-write of each norm's input, where
the two-pass form (``x - mean`` kept, squared, summed, scaled, shifted) took two reads and
three read-writes (timings: benchmarks/RESULTS.md, issue 25, third pass).

The one-pass variance loses ``log10(1 + mean^2 / var)`` decimal digits to cancellation. On real
CT windows through that network the largest ``mean^2 / var`` of any channel of any norm was 7
(under one digit of float32's seven). What makes it large is a channel whose values sit far from
zero with little spread, above all a constant added after the data: a ``Conv``'s bias. A
per-channel bias right before an instance norm is removed by the norm's mean exactly, so the
rewrite drops the bias of each ``Conv`` whose output only that norm reads; the cancellation left
is the data's own. The agreement record (:mod:`atso_fast.engine.agreement`) measures the
rewritten graph, so a network where it still matters fails its tolerance there.

The rewrite needs the spatial sizes of each norm's input, from ONNX shape inference on the
runtime's window. :data:`REWRITE` names this form (the compiled-model cache keys on it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from atso_fast.io.onnx_shapes import inferred_shapes

__all__ = [
    "REWRITE",
    "drop_unread_initializers",
    "parse_model",
    "precise_instance_norms",
    "readers_of",
    "rewrite_instance_norms",
]

REWRITE = "onepass-nobias-1"
"""Names the rewrite's form: a compiled model built from another form is not reused."""


def parse_model(onnx_bytes: bytes) -> Any:
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
    """``(model bytes, norms rewritten)``: ``onnx_bytes`` with :func:`rewrite_instance_norms`
    applied; the input bytes themselves when there is nothing to rewrite (or the bytes are no
    ONNX model)."""
    model = parse_model(onnx_bytes)
    count = 0 if model is None else rewrite_instance_norms(model, input_shape)
    return (model.SerializeToString(), count) if count else (onnx_bytes, 0)


def rewrite_instance_norms(model: Any, input_shape: Sequence[int]) -> int:
    """Rewrite, in the ``ModelProto`` ``model``, every ``InstanceNormalization`` of the main
    graph whose input sizes shape inference fixes for an input of ``input_shape`` ``(batch,
    channels, *window)`` as the module docstring says; returns how many (0: nothing changed).
    The model's inputs and outputs are unchanged."""
    if not any(node.op_type == "InstanceNormalization" for node in model.graph.node):
        return 0
    shapes = inferred_shapes(model, dict(enumerate(int(d) for d in input_shape)))
    graph = model.graph
    first = graph.input[0]  # the window batch: its sizes are input_shape's
    inputs: dict[str, tuple[Any, list[int | None]]] = {
        first.name: (first.type.tensor_type.elem_type, [int(d) for d in input_shape])
    }
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    rewrite = _Rewrite(graph, shapes, inputs, opset=opset)
    readers = readers_of(graph)  # before the rewrite, whose nodes read each norm's input thrice
    nodes = []
    for index, node in enumerate(graph.node):
        nodes.extend(rewrite.node(node, index))
    del graph.node[:]
    graph.node.extend(nodes)
    dropped = _drop_biases_before(graph, rewrite.normalised, readers)
    drop_unread_initializers(graph, rewrite.replaced_weights | dropped)
    return rewrite.count


def readers_of(graph: Any) -> dict[str, int]:
    """How many node inputs read each value."""
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return readers


def _drop_biases_before(graph: Any, normalised: set[str], readers: dict[str, int]) -> set[str]:
    """Drop the bias input of each ``Conv`` whose output only a rewritten norm read (the norm's
    mean removes a per-channel constant exactly; see the module docstring). ``readers``: counts
    of the graph before the rewrite. Returns the names of the dropped bias initialisers."""
    outputs = {value.name for value in graph.output}
    dropped = set()
    for node in graph.node:
        out = node.output[0] if node.output else ""
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) != 3:
            continue
        if out in normalised and readers.get(out) == 1 and out not in outputs and node.input[2]:
            dropped.add(node.input[2])
            del node.input[2]
    return dropped


def drop_unread_initializers(graph: Any, names: set[str]) -> None:
    """Remove the initialisers ``names`` no node reads any more (here the norms' own scale and
    bias, now folded into broadcastable copies; runtimes warn about unused initialisers)."""
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
        opset: int,
    ):
        self.graph = graph
        self.opset = opset
        self.shapes = shapes
        self.inputs = inputs
        self.initializers = {init.name: init for init in graph.initializer}
        self.count = 0
        self.replaced_weights: set[str] = set()
        self.normalised: set[str] = set()  # the rewritten norms' inputs

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
        self.normalised.add(x)
        return self._replacement(node, index, [int(d) for d in dims[2:] if d is not None])

    def _reduce(self, out: list[Any], op: str, src: str, axis: int, name: str) -> str:
        """``op`` (ReduceSum or ReduceL2) of ``src`` over ``axis``, kept: its axes are an input
        from opset 13 (ReduceSum) or 18 (ReduceL2), an attribute before."""
        from onnx import helper

        if self.opset >= (13 if op == "ReduceSum" else 18):
            axes = self._const(f"{name}_axes", np.array([axis], np.int64))
            out.append(helper.make_node(op, [src, axes], [name], keepdims=1))
        else:
            out.append(helper.make_node(op, [src], [name], axes=[axis], keepdims=1))
        return name

    def _nested_mean(self, out: list[Any], src: str, axes: list[int], spatial: list[int], tag: str) -> str:
        """Mean of ``src`` over ``axes`` (last first), one per-axis ``ReduceSum * 1/n`` each."""
        from onnx import helper

        cur = src
        for axis in axes:
            name = f"{tag}{axis}"
            inv = self._const(f"{name}_inv", np.array(1.0 / spatial[axis - 2], np.float32))
            out.append(helper.make_node("Mul", [self._reduce(out, "ReduceSum", cur, axis, f"{name}_sum"), inv], [name]))
            cur = name
        return cur

    def _replacement(self, node: Any, index: int, spatial: list[int]) -> list[Any]:
        from onnx import helper, numpy_helper

        x, scale, bias = node.input
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        p = f"atso_precise_in{index}_"
        broadcast = (-1,) + (1,) * len(spatial)
        s = numpy_helper.to_array(self.initializers[scale]).astype(np.float32).reshape(broadcast)
        b = numpy_helper.to_array(self.initializers[bias]).astype(np.float32).reshape(broadcast)
        axes = list(reversed(range(2, 2 + len(spatial))))
        out: list[Any] = []

        def op(kind: str, inputs: list[str], name: str) -> str:
            out.append(helper.make_node(kind, inputs, [p + name]))
            return p + name

        mean = self._nested_mean(out, x, axes, spatial, p + "mean")
        l2 = self._reduce(out, "ReduceL2", x, axes[0], p + "l2")  # sqrt of the last axis' sum of squares
        inv_last = self._const(p + "inv_last", np.array(1.0 / spatial[-1], np.float32))
        last_msq = op("Mul", [op("Mul", [l2, l2], "sumsq"), inv_last], "msq_last")
        msq = self._nested_mean(out, last_msq, axes[1:], spatial, p + "msq")
        diff = op("Sub", [msq, op("Mul", [mean, mean], "mean_sq")], "var_raw")
        var = op("Max", [diff, self._const(p + "zero", np.array(0.0, np.float32))], "var")  # rounding below 0
        std = op("Sqrt", [op("Add", [var, self._const(p + "eps", np.array(eps, np.float32))], "var_eps")], "std")
        gain = op("Div", [self._const(p + "scale", s), std], "gain")
        shift = op("Sub", [self._const(p + "bias", b), op("Mul", [mean, gain], "mean_gain")], "shift")
        out.append(helper.make_node("Add", [op("Mul", [x, gain], "scaled"), shift], [node.output[0]]))
        return out
