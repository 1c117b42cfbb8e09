"""Deep convolutions in bfloat16, the rest of the network in float32 (issue 25, fourth pass).

OpenVINO runs a convolution in bfloat16 inside a float32 model when the graph converts its input
and weights to bfloat16 and its output back. This runs the package's network (norms rewritten
as the OpenVINO runtime does) with the convolutions whose input has at most 1/D of the window's
voxels in bfloat16, for each D given, against the float32 graph on real windows of the work
folder's scans: label agreement per window, max logit error, and time per window (runs
alternating in one process). The protocol and decision rule are in RESULTS.md.

    python benchmarks/exp_openvino_deep_bf16.py --work /tmp/bench_nnunet_cmd_XXXX --divisors 8,64,512
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def build(core: Any, data: bytes, window: tuple[int, ...], divisor: int | None) -> tuple[Any, int, float]:
    """The model with deep convolutions in bfloat16: (model, how many, their share of conv FLOPs)."""
    import openvino as ov
    import openvino.opset13 as ops

    model = core.read_model(data)
    model.reshape({model.inputs[0].get_any_name(): ov.PartialShape([1, 1, *window])})
    full, count, share, total = int(np.prod(window)), 0, 0.0, 0.0
    for op in list(model.get_ordered_ops()):
        if op.get_type_name() != "Convolution":
            continue
        x_shape = list(op.get_input_partial_shape(0).to_shape())
        w_shape = list(op.get_input_partial_shape(1).to_shape())
        flops = 2.0 * np.prod(list(op.get_output_partial_shape(0).to_shape())) * np.prod(w_shape[1:])
        total += flops
        if divisor is None or np.prod(x_shape[2:]) > full / divisor:
            continue
        a = op.get_attributes()
        x16, w16 = ops.convert(op.input_value(0), "bf16"), ops.convert(op.input_value(1), "bf16")
        conv = ops.convolution(
            x16, w16, a["strides"], a["pads_begin"], a["pads_end"], a["dilations"], a["auto_pad"].lower()
        )
        back = ops.convert(conv, "f32")
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(back.output(0))
        count, share = count + 1, share + flops
    return model, count, share / total


def sample(pkg: Any, images: Path) -> list[tuple[str, np.ndarray]]:
    """3 windows of ct_abdomen and 2 of tumour_lung1, as ``atso-fast measure`` picks them."""
    import SimpleITK as sitk

    from atso_fast.engine import agreement

    out = []
    for name, count in (("ct_abdomen", 3), ("tumour_lung1", 2)):
        img = sitk.ReadImage(str(images / f"{name}_0000.nii.gz"))
        vol = sitk.GetArrayFromImage(img)
        windows, _ = agreement.sample_windows(pkg, vol, spacing=img.GetSpacing()[::-1], count=count)
        out += [(f"{name}[{i}]", windows[i : i + 1]) for i in range(len(windows))]
    return out


def main() -> None:
    import openvino as ov

    from atso_fast.package.model import load_package
    from atso_fast.runtimes.onnx_norm import precise_instance_norms

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="a bench_nnunet.py command work folder")
    parser.add_argument("--divisors", default="8,64,512")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pkg = load_package(args.work / "package")
    data, _ = precise_instance_norms(pkg.onnx_bytes(), (1, 1, *pkg.window))
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 2}
    windows = sample(pkg, args.work / "images")
    variants: list[int | None] = [None, *(int(d) for d in args.divisors.split(","))]
    requests, info = {}, {}
    for d in variants:
        model, count, share = build(core, data, pkg.window, d)
        requests[d] = core.compile_model(model, "CPU", config).create_infer_request()
        info[d] = {"convs_bf16": count, "flop_share_bf16": round(share, 4)}
    outs: dict[Any, list[np.ndarray]] = {d: [] for d in variants}
    times: dict[Any, list[float]] = {d: [] for d in variants}
    for rep in range(args.repeats):
        for _, x in windows:
            for d in variants:
                start = time.perf_counter()
                requests[d].infer({0: x})
                times[d].append(time.perf_counter() - start)
                if rep == 0:
                    outs[d].append(requests[d].get_output_tensor(0).data.copy())
    results = {}
    for d in variants:
        pairs = list(zip(outs[d], outs[None]))
        ratio = np.array(times[d]) / np.array(times[None])
        results[str(d)] = {
            **info[d],
            "agreement_per_window": [float((o.argmax(1) == b.argmax(1)).mean()) for o, b in pairs],
            "max_abs_logit_error": max(float(np.abs(o - b).max()) for o, b in pairs),
            "median_s": float(np.median(times[d])),
            "paired_time_ratio_median": float(np.median(ratio)),
        }
        print(d, json.dumps(results[str(d)]), flush=True)
    report = {"windows": [n for n, _ in windows], "results": results, "times": {str(k): v for k, v in times.items()}}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
