"""A channel ``Concat`` read only by a ``Conv``, rewritten as one convolution per concatenated
input and their sum: the U-Net decoder's concat copy is never written.

Each decoder stage of an nnU-Net concatenates the upsampled features with the encoder's skip
features and convolves the result. OpenVINO's CPU plugin writes the concatenation out first (a
copy of both inputs: at the top stage of a planner-sized network, 64 channels of the whole
window). A convolution is linear in its input channels, so ``Conv(Concat(a, b), W) = Conv(a,
W[:, :Ca]) + Conv(b, W[:, Ca:])``; OpenVINO fuses the ``Add`` into the second convolution as a
sum post-op, so nothing is copied. The result is the same function; float32 sums run in another
order, the kind of difference OpenVINO's own kernel choice makes between CPUs, so the agreement
records (:mod:`atso_fast.engine.agreement`) do not name this form (timings and the measured
differences: benchmarks/RESULTS.md, issue 25, fourth pass). :data:`REWRITE` names it for the
compiled-model cache.

Rewritten only where it is the same function: a ``Concat`` along the channel axis, read by
nothing but one ``Conv`` (not a graph output), whose weights are an initialiser and whose
``group`` is 1, with every concatenated input's channel count fixed by shape inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from atso_fast.io.onnx_shapes import inferred_shapes
from atso_fast.runtimes.onnx_norm import drop_unread_initializers, parse_model, readers_of

__all__ = ["REWRITE", "split_concat_convs", "split_concats"]

REWRITE = "concat-conv-split-1"
"""Names the rewrite's form: a compiled model built from another form is not reused."""


def split_concat_convs(onnx_bytes: bytes, input_shape: Sequence[int]) -> tuple[bytes, int]:
    """``(model bytes, concats split)``: ``onnx_bytes`` with :func:`split_concats` applied; the
    input bytes themselves when there is nothing to split (or the bytes are no ONNX model)."""
    model = parse_model(onnx_bytes)
    count = 0 if model is None else split_concats(model, input_shape)
    return (model.SerializeToString(), count) if count else (onnx_bytes, 0)


def split_concats(model: Any, input_shape: Sequence[int]) -> int:
    """Rewrite, in the ``ModelProto`` ``model``, every ``Concat -> Conv`` pair of the main graph
    that the module docstring allows, for an input of ``input_shape`` ``(batch, channels,
    *window)``; returns how many (0: nothing changed)."""
    graph = model.graph
    if not any(node.op_type == "Concat" for node in graph.node):
        return 0
    shapes = inferred_shapes(model, dict(enumerate(int(d) for d in input_shape)))
    weights = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    readers = readers_of(graph)
    outputs = {value.name for value in graph.output}
    names = _Names(graph)
    nodes, split, dropped, replaced = [], 0, set(), set()
    for node in graph.node:
        concat = producer.get(node.input[0]) if node.op_type == "Conv" and node.input else None
        channels = _split_channels(node, concat, shapes, weights, readers, outputs)
        if concat is None or channels is None:
            nodes.append(node)
            continue
        nodes.extend(_per_input_convs(node, list(concat.input), channels, weights[node.input[1]], graph, names))
        dropped.add(concat.output[0])
        replaced.add(node.input[1])
        split += 1
    if split:
        del graph.node[:]
        graph.node.extend(n for n in nodes if not (n.op_type == "Concat" and n.output[0] in dropped))
        drop_unread_initializers(graph, replaced)  # each split conv's whole weights
    return split


def _split_channels(
    conv: Any,
    concat: Any,
    shapes: dict[str, tuple[Any, list[int | None]]],
    weights: dict[str, Any],
    readers: dict[str, int],
    outputs: set[str],
) -> list[int] | None:
    """The channel count of each of ``concat``'s inputs when the pair may be rewritten, else None."""
    if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx"):
        return None
    if conv.domain not in ("", "ai.onnx") or len(conv.input) < 2 or conv.input[1] not in weights:
        return None
    out = concat.output[0]
    if readers.get(out) != 1 or out in outputs or _attr(conv, "group", 1) != 1:
        return None
    dims = [shapes[name][1] if name in shapes else [] for name in concat.input]
    if any(len(d) < 3 or d[1] is None for d in dims):
        return None
    axis = _attr(concat, "axis", None)
    if axis is None or axis % len(dims[0]) != 1:
        return None
    channels = [int(d[1] or 0) for d in dims]
    return channels if sum(channels) == weights[conv.input[1]].dims[1] else None


def _per_input_convs(
    conv: Any, inputs: list[str], channels: list[int], weight: Any, graph: Any, names: _Names
) -> list[Any]:
    """One ``Conv`` per input over its slice of the weights (the bias on the first), summed."""
    from onnx import helper, numpy_helper

    full = numpy_helper.to_array(weight)
    parts, nodes, start = [], [], 0
    for k, (name, count) in enumerate(zip(inputs, channels)):
        w_name = names.new(f"{weight.name}_in{k}")
        graph.initializer.append(numpy_helper.from_array(full[:, start : start + count].copy(), w_name))
        start += count
        bias = [conv.input[2]] if k == 0 and len(conv.input) > 2 and conv.input[2] else []
        part = helper.make_node("Conv", [name, w_name, *bias], [names.new(f"{conv.output[0]}_in{k}")])
        part.attribute.extend(conv.attribute)
        nodes.append(part)
        parts.append(part.output[0])
    total = parts[0]
    for k, part_out in enumerate(parts[1:], 1):
        out = conv.output[0] if k == len(parts) - 1 else names.new(f"{conv.output[0]}_sum{k}")
        nodes.append(helper.make_node("Add", [total, part_out], [out]))
        total = out
    return nodes


def _attr(node: Any, name: str, default: Any) -> Any:
    return next((a.i for a in node.attribute if a.name == name), default)


class _Names:
    """Fresh value names: none the graph already uses."""

    def __init__(self, graph: Any):
        self.used = {name for node in graph.node for name in (*node.input, *node.output)}
        self.used |= {init.name for init in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}

    def new(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name
