"""``atso-fast bench --scenes``: three sides on tiny frames, known answers of the two baselines,
the table, and refused options. No timing assertions: speed claims never live in tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atso_fast import Relabeler, cli
from atso_fast.bench import memory, scenes
from atso_fast.cli import bench as bench_cli
from atso_fast.package.normalize import IMAGENET_RGB, normalize
from atso_fast.runtimes import RUNTIMES

pytest.importorskip("monai")

TINY = dict(frames=2, frame_size=(64, 128), window=(64, 64), batch=2, classes=4, repeats=1)
NARROW = (32, 16, 16, 8, 8)
"""A narrow decoder: the ResNet-18 encoder as it is, the decoder cheap at test sizes."""


@pytest.fixture(scope="module")
def report():
    cfg = scenes.SceneBenchConfig(**TINY, decoder_channels=NARROW)
    return scenes.run_scene_bench(cfg, bench_cli.scene_network)


def test_report_has_three_timed_sides_that_agree(report):
    assert [r["side"] for r in report["sides"]] == list(scenes.SIDES)
    assert report["correct"] is True and report["reason"] is None
    assert report["runtime"] in RUNTIMES and report["runtime_reason"]
    assert report["windows_per_frame"] == 3  # x: 0, 32, 64 at overlap 0.5
    for row in report["sides"]:
        assert row["frames_per_s"] == pytest.approx(2 / row["seconds"]) and len(row["seconds_all"]) == 1
    fps = {r["side"]: r["frames_per_s"] for r in report["sides"]}
    assert report["ratios"]["ours_vs_torch_loop"] == pytest.approx(fps["ours"] / fps["torch loop"])
    assert report["ratios"]["ours_vs_monai"] == pytest.approx(fps["ours"] / fps["monai"])
    # the same network and window maths (float32 on every side): only rounding differs
    for key in ("ours_vs_torch_loop", "ours_vs_monai", "torch_loop_vs_monai"):
        agreement = report["agreement"][key]
        assert len(agreement["per_frame"]) == 2 and agreement["min"] >= 0.999, (key, agreement)
    assert report["sides"][1]["agreement_with_ours"] == report["agreement"]["ours_vs_torch_loop"]
    assert report["machine"]["cpu_count"] >= 1 and len(report["machine"]["load_after"]) == 3
    json.dumps(report)  # --json prints it as it is


def test_peak_memory_per_side(report):
    peaks = [(r["peak_host_mib"], r["host_rise_mib"]) for r in report["sides"]]
    if not memory.reset_peak_rss():
        assert peaks == [(None, None)] * 3
    else:
        assert all(0 <= rise < peak for peak, rise in peaks)


@pytest.mark.parametrize("frame_size", [(64, 128), (70, 150)])
def test_baselines_with_an_identity_network_return_the_normalised_argmax(frame_size):
    """Blending an identity network's outputs gives back its input (the weights cancel), so both
    baselines and the engine must label each pixel with its largest normalised channel; at
    70 x 150 the last windows are shifted back to end at the border and overlap unevenly."""
    cfg = scenes.SceneBenchConfig(frames=1, frame_size=frame_size, window=(64, 64), classes=3)
    frame = scenes.make_frames(cfg)[0]
    assert frame.shape == (3, 1, *frame_size) and frame.dtype == np.uint8
    rel = Relabeler.from_module(
        torch.nn.Identity(), window=(64, 64), num_classes=3, normalization=IMAGENET_RGB, in_channels=3
    )
    expected = normalize(frame, IMAGENET_RGB)[:, 0].argmax(0)  # normalize takes (M, Z, Y, X)
    origins = scenes.frame_origins(rel.package, frame_size, 0.5)
    assert origins.min() >= 0 and (origins + 64 <= np.asarray(frame_size)).all()
    np.testing.assert_array_equal(
        scenes.torch_loop_labels(torch.nn.Identity(), frame[:, 0], origins, rel.package, 2), expected
    )
    np.testing.assert_array_equal(scenes.monai_labels(torch.nn.Identity(), frame[:, 0], rel.package, 2, 0.5), expected)
    np.testing.assert_array_equal(rel.relabel_volume(frame).labels[0], expected)


def test_frame_origins_follow_the_engine():
    rel = Relabeler.from_module(torch.nn.Identity(), window=(64, 64), num_classes=3, in_channels=3)
    origins = scenes.frame_origins(rel.package, (70, 150), 0.5)
    assert origins.tolist() == [[y, x] for y in (0, 6) for x in (0, 32, 64, 86)]
    frame = np.zeros((3, 1, 70, 150), np.uint8)
    assert rel.relabel_volume(frame).stats["windows"] == len(origins)


def test_incorrect_run_is_not_timed(monkeypatch, capsys):
    monkeypatch.setattr(scenes, "torch_loop_labels", lambda module, frame, *a: np.full(frame.shape[1:], 99))
    argv = ["bench", "--scenes", "--frames", "1", "--frame-size", "64", "64", "--window", "64", "64"]
    assert cli.main([*argv, "--classes", "2", "--repeats", "1"]) == 1
    out = capsys.readouterr().out
    assert "incorrect, not timed: per-frame label agreement below 0.999" in out and "ours_vs_torch_loop" in out
    ours = next(line.split() for line in out.splitlines() if line.split()[:1] == ["ours"])
    assert ours[1:5] == ["-", "-", "-", "-"]  # frames/s, s/run, peak, rise: not measured


def test_cli_prints_the_table(capsys):
    argv = ["bench", "--scenes", "--frames", "2", "--frame-size", "70", "150", "--window", "64", "64"]
    assert cli.main([*argv, "--classes", "3", "--repeats", "1", "--batch", "3", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "resnet18-unet (3 classes" in lines[0] and "8 windows/frame" in lines[0] and "threads 1" in lines[0]
    assert lines[1].startswith("ours: Relabeler, runtime ")
    head = ["side", "frames/s", "s/run", "peak", "RSS", "MiB", "+RSS", "MiB", "agree", "mean", "agree", "min"]
    assert lines[2].split() == head
    assert [line.split()[0] for line in lines[3:6]] == ["ours", "torch", "monai"]
    assert all(float(v) >= 0.999 for line in lines[4:6] for v in line.split()[-2:])
    assert lines[6].startswith("frames/s ratio (same run): ours / torch loop: ") and "ours / monai: " in lines[6]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--scenes", "--frames", "0"], "frames must be >= 1, got 0"),
        (["--scenes", "--frame-size", "64", "100", "--window", "64", "128"], "smaller than the window 64x128"),
        (["--scenes", "--frame-size", "64", "128", "--window", "64", "48"], "needs multiples of 32"),
        (["--scenes", "--window", "64", "64", "64"], "window must be 2 positive sizes (H, W), got [64, 64, 64]"),
        (["--scenes", "--frame-size", "0", "64"], "frame_size must be 2 positive sizes"),
        (["--scenes", "--overlap", "1.0"], "overlap must be in [0, 1), got 1.0"),
        (["--scenes", "--threads", "0"], "threads must be >= 1 or None, got 0"),
        (["--scenes", "--batch", "0"], "batch must be >= 1, got 0"),
        (["--scenes", "--runtime", "onnx"], "invalid choice: 'onnx'"),
        (["--scenes", "--shape", "8", "8", "8", "--compile"], "--shape, --compile: the volume benchmark's"),
        (["--scenes", "--device", "cuda"], "--scenes runs on the CPU, got --device cuda"),
        (["--frames", "2", "--runtime", "torch"], "--frames, --runtime: belong to --scenes"),
    ],
)
def test_bad_options_are_refused_by_name(argv, needle, capsys):
    assert bench_cli.cli_main(argv) == 2
    assert needle in capsys.readouterr().err
