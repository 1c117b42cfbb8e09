"""A channel Concat read only by a Conv, rewritten as per-input convolutions plus their sum
(atso_fast.runtimes.onnx_concat): the same function, and left alone wherever it would not be."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_onnx_norm import check_openvino_rewrite, relu_model

from atso_fast.runtimes.onnx_concat import split_concat_convs


def _concat_model(
    shape: tuple[int, ...],
    branches: tuple[int, ...] = (3, 5),
    *,
    axis: int = 1,
    group: int = 1,
    also_output: bool = False,
    weight_input: bool = False,
    bias: bool = True,
    clash: bool = False,
) -> bytes:
    """x -> one 1^d Conv per branch -> Concat(axis) -> Conv 3^d (the one split) -> y."""
    rng = np.random.default_rng(0)
    channels, dims = shape[1], len(shape) - 2
    inits, nodes, names = [], [], []
    for k, out_ch in enumerate(branches):
        w = rng.standard_normal((out_ch, channels, *(1,) * dims)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"bw{k}"))
        nodes.append(helper.make_node("Conv", ["x", f"bw{k}"], [f"b{k}"]))
        names.append(f"b{k}")
    nodes.append(helper.make_node("Concat", names, ["cat"], axis=axis))
    total = sum(branches) if axis % len(shape) == 1 else branches[0]
    weight = (rng.standard_normal((4, total // group, *(3,) * dims)) / np.sqrt(total * 3**dims)).astype(np.float32)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape[1:]])]
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, list(weight.shape)))
    else:
        inits.append(numpy_helper.from_array(weight, "w"))
    conv_in = ["cat", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "wb"))
        conv_in.append("wb")
    nodes.append(helper.make_node("Conv", conv_in, ["y"], pads=[1] * (2 * dims), group=group))
    if clash:  # a value already named as the rewrite's first choice for a weight slice
        nodes.append(helper.make_node("Relu", ["y"], ["w_in0"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, *shape[2:]])]
    if also_output:
        outputs.append(helper.make_tensor_value_info("cat", TensorProto.FLOAT, ["batch", total, *shape[2:]]))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _ort(model: bytes, x: np.ndarray, **extra: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x, **extra})[0]


def _ops(model: bytes) -> list[str]:
    return [node.op_type for node in onnx.load_from_string(model).graph.node]


@pytest.mark.parametrize(
    ("shape", "branches", "axis"),
    [
        ((1, 2, 4, 6, 5), (3, 5), 1),
        ((2, 2, 4, 6, 5), (3, 5, 2), 1),
        ((1, 3, 7, 9), (4, 1), -3),
        ((1, 2, 3, 4, 5), (1, 1), -4),
    ],
)
def test_the_split_graph_computes_the_same_function(shape, branches, axis):
    model = _concat_model(shape, branches, axis=axis)
    split, count = split_concat_convs(model, shape)
    assert count == 1
    assert "Concat" not in _ops(split) and _ops(split).count("Add") == len(branches) - 1
    onnx.checker.check_model(onnx.load_from_string(split))
    assert "w" not in {init.name for init in onnx.load_from_string(split).graph.initializer}  # slices replace it
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(_ort(split, x), _ort(model, x), rtol=1e-5, atol=1e-5)


def test_a_conv_without_bias_splits_too():
    shape = (1, 2, 4, 5, 6)
    model = _concat_model(shape, bias=False)
    split, count = split_concat_convs(model, shape)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    assert count == 1
    np.testing.assert_allclose(_ort(split, x), _ort(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "why",
    [
        {"also_output": True},  # the concat is read elsewhere (a graph output)
        {"axis": 2, "branches": (3, 3)},  # not the channel axis
        {"group": 2, "branches": (2, 2)},  # a grouped convolution mixes no channels across groups
        {"weight_input": True},  # weights not an initialiser
    ],
)
def test_what_would_not_be_the_same_function_is_left_alone(why):
    shape = (1, 2, 4, 6, 6)
    model = _concat_model(shape, **why)
    assert split_concat_convs(model, shape) == (model, 0)


def test_new_names_never_clash_with_the_graphs_own():
    shape = (1, 2, 4, 5, 6)
    model = _concat_model(shape, clash=True)
    split, count = split_concat_convs(model, shape)
    assert count == 1
    onnx.checker.check_model(onnx.load_from_string(split))  # SSA: every value written once
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(_ort(split, x), _ort(model, x), rtol=1e-5, atol=1e-5)


def test_bytes_that_are_no_model_or_have_no_concat_are_returned_as_they_are():
    assert split_concat_convs(b"\x00garbage\xff" * 10, (1, 1, 4, 4, 4)) == (b"\x00garbage\xff" * 10, 0)
    relu = relu_model()
    assert split_concat_convs(relu, (1, 2, 3)) == (relu, 0)


def test_openvino_runtime_splits_by_default_and_keys_its_cache(tmp_path):
    shape = (1, 2, 4, 6, 6)
    check_openvino_rewrite(_concat_model(shape), shape, "split_concats", "concats_split", tmp_path)
