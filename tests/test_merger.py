"""The slab merger on hand-made window outputs: no network, exact answers."""

from __future__ import annotations

import numpy as np
import pytest

from atso_fast.engine.merger import ArrayBackend, LabelSink, SlabMerger, z_runs
from atso_fast.engine.windows import gaussian_importance, sliding_window_origins
from atso_fast.kernels import native, reference

CPU = ArrayBackend("cpu")


class RecordingSink:
    """Keeps a copy of every row handed over, with the volume row it belongs to."""

    def __init__(self):
        self.rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.order: list[int] = []

    def take(self, acc, wsum, z_start, count):
        for k in range(count):
            assert z_start + k not in self.rows, f"row {z_start + k} handed over twice"
            self.rows[z_start + k] = (acc[:, k].copy(), wsum[k].copy())
            self.order.append(z_start + k)


def merge(shape, window, overlap, outputs, origins, sink, batch=3, dtype="float32"):
    merger = SlabMerger(shape, outputs.shape[1], window[0], sink, backend=CPU, accumulate_dtype=dtype)
    imp = np.ascontiguousarray(gaussian_importance(window))
    for i in range(0, len(origins), batch):
        merger.aggregate(outputs[i : i + batch], origins[i : i + batch], imp)
    return merger.finalize()


@pytest.mark.parametrize(
    "shape,window,overlap",
    [
        ((23, 17, 19), (8, 8, 8), 0.5),
        ((5, 20, 20), (8, 8, 8), 0.25),  # thinner than the window: origins start above row 0
        ((16, 16, 16), (4, 8, 8), 0.0),
        ((30, 9, 12), (6, 4, 16), 0.75),
    ],
)
def test_streamed_slab_equals_whole_volume_accumulation(rng, shape, window, overlap):
    origins = sliding_window_origins(shape, window, overlap)
    outputs = rng.standard_normal((len(origins), 3, *window)).astype(np.float32)
    sink = merge(shape, window, overlap, outputs, origins, RecordingSink())
    acc = np.zeros((3, *shape), np.float32)
    wsum = np.zeros(shape, np.float32)
    reference.accumulate(acc, wsum, outputs, origins, np.ascontiguousarray(gaussian_importance(window)))
    assert sink.order == list(range(shape[0]))  # every row once, in order
    for z, (a, w) in sink.rows.items():
        np.testing.assert_array_equal(a, acc[:, z])
        np.testing.assert_array_equal(w, wsum[z])


def test_label_sink_matches_reference_finalize(rng):
    shape, window = (19, 14, 15), (6, 8, 8)
    origins = sliding_window_origins(shape, window, 0.5)
    outputs = rng.standard_normal((len(origins), 4, *window)).astype(np.float32)
    sink = LabelSink(shape, 4, kind="logits", threshold=0.4, ignore_index=255, backend=CPU, save_probabilities=True)
    merge(shape, window, 0.5, outputs, origins, sink, batch=5)
    acc = np.zeros((4, *shape), np.float32)
    wsum = np.zeros(shape, np.float32)
    reference.accumulate(acc, wsum, outputs, origins, np.ascontiguousarray(gaussian_importance(window)))
    labels, conf, counts = reference.finalize(acc, wsum, 0.4, 255, "logits")
    np.testing.assert_array_equal(sink.labels, labels)
    np.testing.assert_array_equal(sink.confidence, conf)
    np.testing.assert_array_equal(sink.totals.counts, counts[:4])
    assert (sink.totals.ignored, sink.totals.invalid) == (counts[4], counts[5])
    probs = np.exp(acc / wsum - (acc / wsum).max(0))
    np.testing.assert_allclose(sink.probabilities, probs / probs.sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_label_sink_probabilities_are_the_kernels_finalize_decides_on(rng, channels, dtype):
    """Streamed rows give native.probabilities of the whole-volume blend, bit for bit: the
    softmax finalize takes the labels and confidence from."""
    shape, window = (19, 14, 15), (6, 8, 8)
    origins = sliding_window_origins(shape, window, 0.5)
    outputs = (rng.standard_normal((len(origins), channels, *window)) * 4).astype(np.float32)
    sink = LabelSink(
        shape, channels, kind="logits", threshold=0.0, ignore_index=255, backend=CPU, save_probabilities=True
    )
    merge(shape, window, 0.5, outputs, origins, sink, batch=5, dtype=dtype)
    acc, wsum = np.zeros((channels, *shape), dtype), np.zeros(shape, np.float32)
    native.accumulate(acc, wsum, outputs, origins, np.ascontiguousarray(gaussian_importance(window)))
    want = native.probabilities(acc, wsum, "logits")
    np.testing.assert_array_equal(sink.probabilities.view(np.uint32), want.view(np.uint32))
    if channels == 1:
        np.testing.assert_array_equal(sink.labels, (sink.probabilities[0] > 0.5).astype(np.uint8))
        return
    np.testing.assert_array_equal(sink.labels, np.argmax(sink.probabilities, axis=0))
    top = sink.probabilities.max(axis=0)
    np.testing.assert_array_equal(sink.confidence, np.floor(top * np.float32(255) + np.float32(0.5)))


def test_constant_windows_blend_to_the_constant():
    shape, window = (12, 10, 10), (4, 4, 4)
    origins = sliding_window_origins(shape, window, 0.5)
    outputs = np.zeros((len(origins), 2, *window), np.float32)
    outputs[:, 1] = 0.75
    outputs[:, 0] = 0.25
    sink = LabelSink(
        shape, 2, kind="probabilities", threshold=0.0, ignore_index=255, backend=CPU, save_probabilities=True
    )
    merge(shape, window, 0.5, outputs, origins, sink)
    np.testing.assert_allclose(sink.probabilities[1], 0.75, rtol=1e-6)
    assert (sink.labels == 1).all() and (sink.confidence == round(0.75 * 255)).all()


def test_rows_no_window_covers_are_invalid():
    shape, window = (10, 8, 8), (4, 8, 8)
    origins = np.array([[0, 0, 0], [6, 0, 0]], np.int64)  # rows 4 and 5 get no window
    outputs = np.ones((2, 2, *window), np.float32)
    sink = LabelSink(shape, 2, kind="logits", threshold=0.0, ignore_index=200, backend=CPU, save_probabilities=True)
    merge(shape, window, 0.0, outputs, origins, sink)
    assert (sink.labels[4:6] == 200).all() and sink.totals.invalid == 2 * 64
    assert (sink.labels[:4] != 200).all() and (sink.labels[6:] != 200).all()
    assert np.isnan(sink.probabilities[:, 4:6]).all()  # as finalize: no weight, no probability
    assert not np.isnan(sink.probabilities[:, :4]).any() and not np.isnan(sink.probabilities[:, 6:]).any()


def test_mark_invalid_moves_counts():
    sink = LabelSink((2, 2, 2), 2, kind="logits", threshold=0.0, ignore_index=255, backend=CPU)
    sink.labels[:] = 1
    sink.confidence[:] = 200
    sink.totals.counts[:] = [0, 8]
    mask = np.zeros((2, 2, 2), bool)
    mask[0, 0] = True
    sink.mark_invalid(mask)
    assert sink.totals.counts.tolist() == [0, 6] and sink.totals.invalid == 2
    assert (sink.labels[mask] == 255).all() and (sink.confidence[mask] == 0).all()


def test_windows_out_of_z_order_are_refused():
    shape, window = (20, 8, 8), (4, 8, 8)
    merger = SlabMerger(shape, 1, 4, RecordingSink(), backend=CPU)
    imp = np.ones(window, np.float32)
    merger.aggregate(np.ones((1, 1, *window), np.float32), np.array([[12, 0, 0]]), imp)
    with pytest.raises(ValueError, match="z order"):
        merger.aggregate(np.ones((1, 1, *window), np.float32), np.array([[2, 0, 0]]), imp)


def test_aggregate_after_finalize_is_an_error():
    merger = SlabMerger((4, 4, 4), 1, 4, RecordingSink(), backend=CPU)
    merger.finalize()
    with pytest.raises(RuntimeError, match="after finalize"):
        merger.aggregate(
            np.ones((1, 1, 4, 4, 4), np.float32), np.zeros((1, 3), np.int64), np.ones((4, 4, 4), np.float32)
        )


def test_bad_accumulate_dtype():
    with pytest.raises(ValueError, match="accumulate_dtype"):
        SlabMerger((4, 4, 4), 1, 4, RecordingSink(), backend=CPU, accumulate_dtype="float64")


def test_z_runs():
    assert z_runs(np.array([0, 0, 3, 3, 3, 7])) == [(0, 2), (2, 5), (5, 6)]
    assert z_runs(np.array([5])) == [(0, 1)]


def test_one_label_dtype_rule_for_kernel_and_merger():
    from atso_fast.engine.merger import label_dtype
    from atso_fast.kernels import native

    for classes, ignore in ((3, 255), (255, 255), (256, 256), (300, 65535)):
        acc = np.zeros((classes, 1, 2, 2), np.float32)
        labels = native.finalize(acc, np.ones((1, 2, 2), np.float32), ignore_index=ignore).labels
        assert label_dtype(classes, ignore) == native.label_dtype(classes, ignore) == labels.dtype
    assert native.label_dtype(3, 255) == np.uint8 and native.label_dtype(300, 65535) == np.uint16
