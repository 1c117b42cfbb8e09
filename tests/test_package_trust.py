"""A model package is untrusted input: nothing in it may run code, and nothing it names may lie
outside its folder (issue 14, items 1-3).

The malicious archives here are real exploits against ``torch.export.load`` (a pickled weight
runs ``open(marker, "w")`` when unpickled); each test checks both that the package is refused
with a clear error and that the marker file was never created.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from atso_fast.engine import Relabeler
from atso_fast.package import PackageError, export_model, load_package

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


class _Evil:
    """Unpickling this creates the file ``marker`` (stands in for any code an attacker runs)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def clean_package(tmp_path_factory) -> Path:
    import torch

    conv = torch.nn.Conv3d(1, 3, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1, 1))
        conv.bias.zero_()
    out = export_model(conv.eval(), tmp_path_factory.mktemp("pkg") / "model", window=(4, 4, 4), num_classes=3)
    assert (out / "model.pt2").is_file(), "export must write a torch program for these tests"
    return out


@pytest.fixture
def package(clean_package, tmp_path) -> Path:
    dest = tmp_path / "model"
    shutil.copytree(clean_package, dest)
    return dest


def _rewrite_pt2(path: Path, edit) -> None:
    """Rewrite the zip ``path`` member by member: ``edit(name, bytes) -> bytes | None`` (None drops
    the member); ``edit("", None)`` may return ``{name: bytes}`` of members to add."""
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    root = src.namelist()[0].split("/")[0]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = edit(info.filename.split("/", 1)[1], src.read(info.filename))
            if data is not None:
                dst.writestr(info.filename, data)
        for name, data in (edit("", None) or {}).items():
            dst.writestr(f"{root}/{name}", data)
    path.write_bytes(buf.getvalue())
    _fix_hashes(path.parent)


def _fix_hashes(folder: Path) -> None:
    """Record the tampered files' hashes, as an attacker writing model.json would."""
    meta = json.loads((folder / "model.json").read_text())
    for key, name in (("onnx_sha256", meta.get("onnx_file")), ("torch_sha256", meta.get("torch_file"))):
        if name and (folder / name).is_file() and key in meta:
            meta[key] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    (folder / "model.json").write_text(json.dumps(meta))


def _edit_program_json(package: Path, edit) -> None:
    def member(name, data):
        if name == "models/model.json":
            program = json.loads(data)
            edit(program)
            return json.dumps(program).encode()
        return None if data is None else data

    _rewrite_pt2(package / "model.pt2", member)


def _refused(package: Path, word: str) -> None:
    with pytest.raises(PackageError, match=word) as info:
        load_package(package)
    assert "model.pt2" in str(info.value)
    for runtime in ("torch", "auto"):
        with pytest.raises(PackageError, match=word):
            Relabeler(package, runtime=runtime)


# ----------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("runtime", ["torch", "auto"])
def test_a_pickled_weight_never_runs_and_is_a_hard_error(package, tmp_path, runtime):
    marker = tmp_path / "PWNED"

    def member(name, data):
        if name == "data/weights/model_weights_config.json":
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config).encode()
        if name == "data/weights/weight_0":
            return pickle.dumps(_Evil(marker))
        return data

    _rewrite_pt2(package / "model.pt2", member)
    with pytest.raises(PackageError, match="pickle"):
        Relabeler(package, runtime=runtime)
    assert not marker.exists(), "unpickling ran the attacker's code"


def test_a_pickled_constant_or_custom_object_is_refused(package, tmp_path):
    marker = tmp_path / "PWNED"

    def member(name, data):
        if name == "data/constants/model_constants_config.json":
            return json.dumps(
                {
                    "config": {
                        "c": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
                    }
                }
            ).encode()
        if name == "":
            return {"data/constants/opaque_obj_0": pickle.dumps(_Evil(marker))}
        return data

    _rewrite_pt2(package / "model.pt2", member)
    _refused(package, "pickle|opaque_obj_0")
    assert not marker.exists()


def test_sample_inputs_that_need_a_full_unpickle_are_refused(package, tmp_path):
    marker = tmp_path / "PWNED"
    import torch

    evil = io.BytesIO()
    torch.save((_Evil(marker),), evil)  # torch.export retries such a file with weights_only=False
    _rewrite_pt2(
        package / "model.pt2", lambda name, data: evil.getvalue() if name == "data/sample_inputs/model.pt" else data
    )
    _refused(package, "sample_inputs")
    assert not marker.exists()


def test_guards_code_is_refused(package, tmp_path):
    marker = tmp_path / "PWNED"
    _edit_program_json(package, lambda p: p.__setitem__("guards_code", [f"open({str(marker)!r}, 'w') is not None"]))
    _refused(package, "guards_code")
    assert not marker.exists()


def test_symbolic_expressions_are_parsed_not_evaluated(package, tmp_path):
    marker = tmp_path / "PWNED"
    payload = f"(open({str(marker)!r}, 'w'), Symbol('s77'))[1]"

    def edit(program):
        for value in program["graph_module"]["graph"]["tensor_values"].values():
            for size in value["sizes"]:
                if "as_expr" in size:
                    size["as_expr"]["expr_str"] = payload

    _edit_program_json(package, edit)
    _refused(package, "expression")
    assert not marker.exists()


@pytest.mark.parametrize(
    "target",
    [
        "torch.serialization.os.system",
        "builtins.exec",
        "torch.ops.higher_order.invoke_subgraph",
        "torch.ops.aten.from_file.default",
    ],
)
def test_graph_calls_outside_aten_are_refused(package, target):
    _edit_program_json(package, lambda p: p["graph_module"]["graph"]["nodes"][0].__setitem__("target", target))
    _refused(package, "target")


@pytest.mark.parametrize(
    "where,value",
    [("stack_trace", 'File "x", line 1, in f\n    y\rimport os'), ("parameter_name", 'weight")); import os; (("')],
)
def test_strings_that_could_break_out_of_generated_code_are_refused(package, where, value):
    def edit(program):
        if where == "stack_trace":
            program["graph_module"]["graph"]["nodes"][0]["metadata"]["stack_trace"] = value
        else:
            spec = program["graph_module"]["signature"]["input_specs"][0]
            spec["parameter"]["parameter_name"] = value

    _edit_program_json(package, edit)
    _refused(package, "model.json")


def test_native_code_members_are_refused(package):
    _rewrite_pt2(
        package / "model.pt2",
        lambda name, data: {"data/aotinductor/model/model.so": b"\x7fELF"} if name == "" else data,
    )
    _refused(package, "aotinductor")


def test_a_clean_export_loads_and_runs_on_torch(package):
    relabeler = Relabeler(package, runtime="torch")
    result = relabeler.relabel_volume(np.linspace(-1, 1, 6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4))
    assert result.labels.shape == (6, 5, 4) and set(np.unique(result.labels)) <= {0, 1, 2}


def test_torch_load_of_the_archive_never_warns(package, recwarn):
    Relabeler(package, runtime="torch")
    assert not [(w.filename, w.lineno, str(w.message)) for w in recwarn if issubclass(w.category, FutureWarning)]


# ----------------------------------------------------------------------------- item 2
def _set_meta(package: Path, **fields) -> None:
    meta = json.loads((package / "model.json").read_text())
    meta.update(fields)
    (package / "model.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("field", ["onnx_file", "torch_file"])
def test_referenced_files_must_stay_inside_the_package(package, tmp_path, field):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(package / "model.onnx", other / "model.onnx")
    shutil.copy(package / "model.pt2", other / "model.pt2")
    name = "model.onnx" if field == "onnx_file" else "model.pt2"
    for value in (f"../other/{name}", str(other / name)):
        _set_meta(package, **{field: value})
        with pytest.raises(PackageError, match=f"{field}.*outside the package folder"):
            load_package(package)
    _set_meta(package, **{field: name})
    (package / "link").symlink_to(other / name)
    _set_meta(package, **{field: "link"})
    with pytest.raises(PackageError, match="outside the package folder"):
        load_package(package)


def test_a_link_inside_the_package_is_fine(package):
    (package / "sub").mkdir()
    os.replace(package / "model.onnx", package / "sub" / "real.onnx")
    (package / "model.onnx").symlink_to(Path("sub") / "real.onnx")
    assert load_package(package).onnx_file == "model.onnx"


def test_any_other_file_field_is_confined_too(package):
    _set_meta(package, plans_file="../../etc/passwd")
    with pytest.raises(PackageError, match="plans_file.*outside the package folder"):
        load_package(package)


def test_the_onnx_hash_is_checked(package):
    meta = json.loads((package / "model.json").read_text())
    data = bytearray((package / "model.onnx").read_bytes())
    data[-1] ^= 1
    (package / "model.onnx").write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(PackageError) as info:
        load_package(package)
    message = str(info.value)
    assert "model.onnx" in message and meta["onnx_sha256"] in message and actual in message


def test_the_torch_hash_is_recorded_and_checked(package):
    meta = json.loads((package / "model.json").read_text())
    assert meta["torch_sha256"] == hashlib.sha256((package / "model.pt2").read_bytes()).hexdigest()
    _set_meta(package, torch_sha256="0" * 64)
    pkg = load_package(package)  # screened only: a run on another runtime never reads the weights
    assert "torch" not in pkg.verified and pkg.torch_screened
    with pytest.raises(PackageError, match="model.pt2.*sha256"):
        pkg.torch_bytes()
    with pytest.raises(PackageError, match="model.pt2.*sha256"):
        Relabeler(package, runtime="torch")


def test_loading_a_package_for_another_runtime_imports_no_torch(package):
    """The screen of model.pt2 needs no torch: a start-up on ONNX Runtime/OpenVINO skips its import."""
    code = (
        "import sys; from atso_fast.package import load_package; "
        f"p = load_package({str(package)!r}); assert p.torch_screened; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_the_screen_refuses_what_the_full_check_refuses_in_sample_inputs():
    """Sample inputs naming anything beyond tensor rebuilders are refused without torch."""
    import torch

    from atso_fast.io.pt2 import UnsafeArchiveError, _screen_sample_inputs

    ok = io.BytesIO()
    torch.save((torch.zeros(2, 3), {"x": torch.ones(1)}), ok)
    _screen_sample_inputs(ok.getvalue(), "m.pt2")
    for bad, named in (((collections.Counter("ab"),), "Counter"), ((torch.zeros(1), slice(1)), "slice")):
        buf = io.BytesIO()
        torch.save(bad, buf)
        with pytest.raises(UnsafeArchiveError, match=f"sample_inputs.*{named}"):  # the global it names
            _screen_sample_inputs(buf.getvalue(), "m.pt2")
    with pytest.raises(UnsafeArchiveError, match="sample_inputs"):
        _screen_sample_inputs(b"not a zip", "m.pt2")


def _fifo_guard(path: Path):
    """Unblock anything stuck opening the FIFO ``path`` (a writer end gives readers EOF)."""

    def release():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass

    return release


@pytest.mark.parametrize("name", ["model.json", "model.onnx"])
def test_a_fifo_in_the_package_is_refused_without_hanging(package, name):
    (package / name).unlink()
    os.mkfifo(package / name)
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(_catch(load_package, package)), daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():
        _fifo_guard(package / name)()
        worker.join(5)
        pytest.fail(f"load_package hung on a FIFO {name}")
    assert isinstance(outcome[0], PackageError) and "not a regular file" in str(outcome[0])


def _catch(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # returned for the assertion
        return exc


# ----------------------------------------------------------------------------- item 3
@pytest.mark.parametrize(
    "fields,word",
    [
        ({"num_classes": 5}, "num_classes 5.*3"),
        ({"window": [8, 8, 8]}, "window"),
        ({"in_channels": 2}, "in_channels 2"),
    ],
)
def test_metadata_disagreeing_with_the_onnx_graph_is_refused_at_load(package, fields, word):
    _set_meta(package, **fields)
    with pytest.raises(PackageError, match=word):
        load_package(package)


def test_onnx_external_data_is_refused(package):
    import onnx
    from onnx.external_data_helper import convert_model_to_external_data

    model = onnx.load(package / "model.onnx")
    convert_model_to_external_data(model, all_tensors_to_one_file=True, location="../../weights.bin", size_threshold=0)
    data = model.SerializeToString()
    (package / "model.onnx").write_bytes(data)
    _set_meta(package, onnx_sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(PackageError, match="external data"):
        load_package(package)


def _external(name: str, location: str = "../../etc/passwd"):
    import onnx

    tensor = onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT, [1], [0.0])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("float_data")
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    return tensor


@pytest.mark.parametrize("where", ["function", "sparse_initializer", "sparse_attribute", "subgraph", "entry only"])
def test_external_data_hidden_anywhere_in_the_model_is_refused(package, where):
    """Tensors hide in model-local functions, sparse tensors, attributes and sub-graphs; a tensor
    with external_data entries but data_location DEFAULT is refused too."""
    import onnx

    model = onnx.load(package / "model.onnx")
    helper = onnx.helper
    if where == "function":
        const = helper.make_node("Constant", [], ["c"], value=_external("f"))
        model.functions.append(helper.make_function("local", "F", [], ["c"], [const], [helper.make_opsetid("", 17)]))
    elif where == "sparse_initializer":
        values, indices = _external("s_values"), helper.make_tensor("s_idx", onnx.TensorProto.INT64, [1], [0])
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [4]))
    elif where == "sparse_attribute":
        values, indices = _external("a_values"), helper.make_tensor("a_idx", onnx.TensorProto.INT64, [1], [0])
        sparse = helper.make_sparse_tensor(values, indices, [4])
        node = helper.make_node("Constant", [], ["unused"], sparse_value=sparse)
        model.graph.node.append(node)
    elif where == "subgraph":
        inner = helper.make_graph(
            [helper.make_node("Constant", [], ["y"], value=_external("g"))],
            "inner",
            [],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        )
        cond = helper.make_tensor("cond", onnx.TensorProto.BOOL, [], [True])
        model.graph.initializer.append(cond)
        model.graph.node.append(helper.make_node("If", ["cond"], ["unused2"], then_branch=inner, else_branch=inner))
    else:
        tensor = _external("e")
        tensor.data_location = onnx.TensorProto.DEFAULT
        model.graph.initializer.append(tensor)
    data = model.SerializeToString()
    (package / "model.onnx").write_bytes(data)
    _set_meta(package, onnx_sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(PackageError, match="external data"):
        load_package(package)


def test_runtimes_load_the_verified_bytes_not_the_file_again(package):
    """A model.onnx swapped after load_package checked it never runs: the runtimes get the bytes
    that were hashed."""
    from atso_fast.runtimes import create_runtime

    pkg = load_package(package)
    reference = create_runtime("onnxruntime", package=pkg)
    window = np.random.default_rng(0).normal(size=(1, pkg.in_channels, *pkg.window)).astype(np.float32)
    expected = np.array(reference(window))
    (package / "model.onnx").write_bytes(b"swapped after the check")
    for name in ("onnxruntime", "openvino"):
        runtime = create_runtime(name, package=pkg)
        np.testing.assert_allclose(np.array(runtime(window)), expected, rtol=1e-4, atol=1e-4)


def test_a_graph_that_allocates_gigabytes_inside_is_refused(package, monkeypatch):
    """A package whose graph builds a 6 GiB tensor (ConstantOfShape) is refused when the relabeler
    starts, with the tensor and the numbers, instead of being OOM-killed mid-run (here with 8 GiB
    free, as under the adversarial run's memory limit)."""
    import onnx
    from onnx import helper, numpy_helper

    from atso_fast.io import limits

    model = onnx.load(package / "model.onnx")
    graph = model.graph
    out = graph.output[0].name
    graph.node[-1].output[0] = "net_out"
    graph.initializer.append(numpy_helper.from_array(np.array([1536, 1024, 1024], np.int64), "big_shape"))
    graph.node.extend(
        [
            helper.make_node(
                "ConstantOfShape", ["big_shape"], ["big"], value=numpy_helper.from_array(np.zeros(1, np.float32))
            ),
            helper.make_node("ReduceSum", ["big"], ["big_sum"], keepdims=0),
            helper.make_node("Add", ["net_out", "big_sum"], [out]),
        ]
    )
    data = model.SerializeToString()
    (package / "model.onnx").write_bytes(data)
    (package / "model.pt2").unlink()
    _set_meta(package, onnx_sha256=hashlib.sha256(data).hexdigest(), torch_file=None)
    monkeypatch.setattr(limits, "memory_budget", lambda: 8 << 30)
    with pytest.raises(ValueError, match=r"its graph's tensor 'big' \(batch 4\) needs 6.00 GiB"):
        Relabeler(package, runtime="onnxruntime")
    monkeypatch.setattr(limits, "memory_budget", lambda: 64 << 30)
    assert Relabeler(package, runtime="onnxruntime").package.num_classes == 3


def _imports_after_load(package: Path, cache: Path, **env: str) -> list[str]:
    code = (
        "import sys; from atso_fast.engine import Relabeler; "
        f"Relabeler({str(package)!r}, runtime='onnxruntime'); "
        "print(','.join(m for m in ('onnx', 'torch') if m in sys.modules))"
    )
    run_env = {**os.environ, "XDG_CACHE_HOME": str(cache), **env}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=run_env)
    return [m for m in out.stdout.strip().split(",") if m]


def test_passed_onnx_checks_are_remembered_so_a_second_start_skips_onnx(package, tmp_path):
    first = _imports_after_load(package, tmp_path / "cache")
    assert "onnx" in first  # the graph checks ran and were stored
    assert list((tmp_path / "cache" / "atso_fast" / "checks").glob("*.blob"))
    assert _imports_after_load(package, tmp_path / "cache") == []  # neither onnx nor torch
    assert "onnx" in _imports_after_load(package, tmp_path / "cache", ATSO_FAST_CHECK_CACHE="0")


def test_a_remembered_check_does_not_cover_other_fields_or_bytes(package, tmp_path, monkeypatch):
    """The key holds the ONNX hash and the fields checked against it: a model.json that now
    disagrees with the graph is refused although the same graph passed before."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    load_package(package)
    meta = json.loads((package / "model.json").read_text())
    _set_meta(package, num_classes=meta["num_classes"] + 1)
    with pytest.raises(PackageError, match="num_classes"):
        load_package(package)
