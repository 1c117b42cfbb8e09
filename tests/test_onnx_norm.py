"""InstanceNormalization rewritten in plain ops (atso_fast.runtimes.onnx_norm): the same function
as the ONNX operator, exact where OpenVINO's fused MVN is not, and left alone where it cannot be
sized."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from atso_fast.runtimes.onnx_norm import precise_instance_norms


def _norm_model(
    shape: tuple[int, ...],
    *,
    opset: int = 18,
    conv: bool = False,
    dtype: int = TensorProto.FLOAT,
    symbolic_spatial: bool = False,
    seed: int = 0,
) -> bytes:
    """x -> [Conv 3^d ->] InstanceNormalization -> LeakyRelu -> y, batch axis symbolic."""
    rng = np.random.default_rng(seed)
    channels, dims = shape[1], len(shape) - 2
    np_type = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    inits = [
        numpy_helper.from_array((rng.standard_normal(channels) + 1).astype(np_type), "scale"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np_type), "bias"),
    ]
    nodes, src = [], "x"
    if conv:
        weight = rng.standard_normal((channels, channels, *(3,) * dims)) / np.sqrt(channels * 3**dims)
        inits += [
            numpy_helper.from_array(weight.astype(np_type), "w"),
            numpy_helper.from_array(rng.standard_normal(channels).astype(np_type), "wb"),
        ]
        nodes.append(helper.make_node("Conv", ["x", "w", "wb"], ["c"], pads=[1] * (2 * dims)))
        src = "c"
    nodes.append(helper.make_node("InstanceNormalization", [src, "scale", "bias"], ["n"], epsilon=1e-5))
    nodes.append(helper.make_node("LeakyRelu", ["n"], ["y"], alpha=0.01))
    spatial = [f"s{i}" for i in range(dims)] if symbolic_spatial else list(shape[2:])
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, ["batch", channels, *spatial])],
        [helper.make_tensor_value_info("y", dtype, ["batch", channels, *spatial])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def count_instance_norms(model: bytes) -> int:
    return sum(node.op_type == "InstanceNormalization" for node in onnx.load_from_string(model).graph.node)


def _ort(model: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _float64_norm(x: np.ndarray, model: bytes) -> np.ndarray:
    """The network of :func:`_norm_model` (without conv) in float64."""
    graph = onnx.load_from_string(model).graph
    inits = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in graph.initializer}
    axes = tuple(range(2, x.ndim))
    xd = x.astype(np.float64)
    bc = (1, -1) + (1,) * (x.ndim - 2)
    y = (xd - xd.mean(axis=axes, keepdims=True)) / np.sqrt(xd.var(axis=axes, keepdims=True) + 1e-5)
    y = y * inits["scale"].reshape(bc) + inits["bias"].reshape(bc)
    return np.where(y > 0, y, 0.01 * y)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 9), (1, 4, 1, 1, 6), (3, 2, 11, 13), (2, 5, 17)])
@pytest.mark.parametrize("opset", [11, 13, 18])
def test_rewrite_computes_the_operator(shape, opset):
    model = _norm_model(shape, opset=opset)
    rewritten, count = precise_instance_norms(model, (1, *shape[1:]))
    assert count == 1 and count_instance_norms(rewritten) == 0 and count_instance_norms(model) == 1
    rng = np.random.default_rng(1)
    # channel means up to ~3 standard deviations from 0 (real CT windows through a planner
    # network: mean^2 / var at most 7)
    offsets = 3 * rng.standard_normal((1, shape[1]) + (1,) * (len(shape) - 2))
    x = (rng.standard_normal(shape) * 3 + 3 * offsets).astype(np.float32)
    ref = _float64_norm(x, model)
    assert np.abs(_ort(rewritten, x) - ref).max() < 1e-5
    np.testing.assert_allclose(_ort(rewritten, x), _ort(model, x), atol=2e-5)


@pytest.mark.parametrize("offset", [30.0, 300.0])
def test_far_off_zero_channels_lose_the_documented_digits(offset):
    """The one-pass variance loses log10(1 + mean^2 / var) digits: bounded by it, no worse."""
    shape = (2, 3, 8, 16, 16)
    model = _norm_model(shape)
    rewritten, _ = precise_instance_norms(model, (1, *shape[1:]))
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    ratio = float((x.astype(np.float64).mean(axis=(2, 3, 4)) ** 2 / x.astype(np.float64).var(axis=(2, 3, 4))).max())
    err = np.abs(_ort(rewritten, x) - _float64_norm(x, model)).max()
    assert err < 1e-6 * (1 + ratio)


def _conv_norm_model(shape: tuple[int, ...], bias: float, *, second_reader: bool = False) -> bytes:
    """x -> Conv (bias ``bias`` on every channel) -> InstanceNormalization -> y [, and the conv
    output as a second graph output]."""
    rng = np.random.default_rng(6)
    c, dims = shape[1], len(shape) - 2
    inits = [
        numpy_helper.from_array((rng.standard_normal((c, c, *(3,) * dims)) / np.sqrt(c * 27)).astype(np.float32), "w"),
        numpy_helper.from_array(np.full(c, bias, np.float32), "wb"),
        numpy_helper.from_array(np.ones(c, np.float32), "scale"),
        numpy_helper.from_array(np.zeros(c, np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "wb"], ["c"], pads=[1] * (2 * dims)),
        helper.make_node("InstanceNormalization", ["c", "scale", "bias"], ["y"], epsilon=1e-5),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if second_reader:
        outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_conv_bias_before_a_norm_is_dropped_and_costs_nothing():
    """A bias of 1000 on a unit-spread conv output would cost the one-pass variance 6 digits; the
    norm removes it exactly, so the rewrite drops it and stays within float32 of float64."""
    shape = (1, 4, 8, 16, 16)
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32)
    rewritten, count = precise_instance_norms(_conv_norm_model(shape, 1000.0), shape)
    conv = next(n for n in onnx.load_from_string(rewritten).graph.node if n.op_type == "Conv")
    assert count == 1 and list(conv.input) == ["x", "w"]
    unbiased = _ort(_conv_norm_model(shape, 0.0), x).astype(np.float64)  # ORT's own norm, bias-free
    session = ort.InferenceSession(_conv_norm_model(shape, 0.0, second_reader=True), providers=["CPUExecutionProvider"])
    conv_out = session.run(["c"], {"x": x})[0].astype(np.float64)
    ref = (conv_out - conv_out.mean(axis=(2, 3, 4), keepdims=True)) / np.sqrt(
        conv_out.var(axis=(2, 3, 4), keepdims=True) + 1e-5
    )
    assert np.abs(_ort(rewritten, x) - ref).max() < 1e-5
    assert np.abs(unbiased - ref).max() < 1e-4


def test_a_conv_output_read_elsewhere_keeps_its_bias():
    shape = (1, 2, 4, 4, 4)
    rewritten, count = precise_instance_norms(_conv_norm_model(shape, 5.0, second_reader=True), shape)
    conv = next(n for n in onnx.load_from_string(rewritten).graph.node if n.op_type == "Conv")
    assert count == 1 and list(conv.input) == ["x", "w", "wb"]


def test_rewrite_keeps_the_interface_and_drops_the_old_weights():
    model = _norm_model((1, 4, 6, 8, 8), conv=True)
    rewritten, _ = precise_instance_norms(model, (1, 4, 6, 8, 8))
    old, new = onnx.load_from_string(model), onnx.load_from_string(rewritten)
    assert new.graph.input == old.graph.input and new.graph.output == old.graph.output
    names = {i.name for i in new.graph.initializer}
    # the conv's bias goes too: only the norm reads the conv, and its mean removes the bias
    assert "w" in names and not {"scale", "bias", "wb"} & names
    onnx.checker.check_model(new)


def test_rewrite_is_exact_on_a_long_channel_sum():
    """A conv then a norm over 32 x 64 x 64 voxels per channel (the shape where OpenVINO's MVN
    drifts) through every installed runtime: within 1e-4 of float64 once rewritten."""
    shape = (1, 8, 32, 64, 64)
    model = _norm_model(shape, conv=True)
    rewritten, count = precise_instance_norms(model, shape)
    assert count == 1
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32) - 3
    reference = _ort(model, x)  # the conv is exact enough in ORT; compare the rewrite to it
    assert np.abs(_ort(rewritten, x) - reference).max() < 1e-3
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(rewritten), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    out = compiled(x)[0]
    assert np.abs(out - reference).max() < 1e-3


@pytest.mark.parametrize(
    "kwargs",
    [{"symbolic_spatial": True}, {"dtype": TensorProto.FLOAT16}],
    ids=["sizes unknown", "float16"],
)
def test_norms_it_cannot_size_or_type_stay(kwargs):
    model = _norm_model((1, 3, 4, 5, 6), **kwargs)
    # symbolic spatial sizes are set from the window, so only a window of other rank leaves them open
    window = (1, 3) if kwargs.get("symbolic_spatial") else (1, 3, 4, 5, 6)
    rewritten, count = precise_instance_norms(model, window)
    assert count == 0 and rewritten is model


def test_symbolic_sizes_are_taken_from_the_window():
    shape = (1, 3, 4, 5, 6)
    model = _norm_model(shape, symbolic_spatial=True)
    rewritten, count = precise_instance_norms(model, shape)
    assert count == 1
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(_ort(rewritten, x), _ort(model, x), atol=1e-5)


def relu_model() -> bytes:
    """x (1, 2, 3) -> Relu -> y: a model no rewrite applies to."""
    return helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        )
    ).SerializeToString()


def test_a_model_without_norms_is_returned_as_it_is():
    model = relu_model()
    assert precise_instance_norms(model, (1, 2, 3)) == (model, 0)


def check_openvino_rewrite(model: bytes, shape: tuple[int, ...], option: str, count: str, tmp_path) -> None:
    """OpenVinoRuntime rewrites ``model`` by default (its attribute ``count`` is 1) and not with
    ``option=False`` (None), gives ONNX Runtime's outputs either way, keys its cache on the
    option, and rewrites nothing when the compiled model comes from the cache."""
    pytest.importorskip("openvino")
    from atso_fast.runtimes.openvino_rt import OpenVinoRuntime

    x = np.random.default_rng(4).standard_normal((2, *shape[1:])).astype(np.float32)
    common = {"batch_size": 2, "window": shape[2:], "in_channels": shape[1], "cache_dir": tmp_path}
    rewritten = OpenVinoRuntime(model, **common)
    kept = OpenVinoRuntime(model, **{option: False}, **common)
    assert (getattr(rewritten, count), getattr(kept, count)) == (1, None)
    np.testing.assert_allclose(rewritten(x), _ort(model, x), atol=1e-4)
    np.testing.assert_allclose(kept(x), _ort(model, x), atol=1e-4)
    cached = OpenVinoRuntime(model, **common)  # from the cache: nothing read or rewritten
    assert getattr(cached, count) is None and getattr(cached, option)
    np.testing.assert_array_equal(cached(x), rewritten(x))
    assert len(list(tmp_path.rglob("*.blob"))) == 2  # two cache keys


def test_openvino_runtime_rewrites_by_default_and_keys_its_cache(tmp_path):
    shape = (1, 4, 6, 8, 8)
    check_openvino_rewrite(_norm_model(shape, conv=True), shape, "precise_norms", "norms_rewritten", tmp_path)


def test_bytes_that_are_no_model_are_left_to_the_runtime():
    assert precise_instance_norms(b"\x00garbage\xff" * 10, (1, 1, 4, 4, 4)) == (b"\x00garbage\xff" * 10, 0)
