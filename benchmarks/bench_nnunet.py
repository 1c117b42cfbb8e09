"""nnU-Net's own predictor vs atso-fast on the same nnU-Net model folder and scans, in one run.

Part ``speed``: a synthetic nnU-Net v2 model folder (``atso_fast.datasets.nnunet_folder``:
nnU-Net's PlainConvUNet, random weights) is imported (``atso_fast.import_nnunet``); then
``nnUNetPredictor`` (CPU, float32 network, its sequential path: the same ``run_case`` /
``predict_logits_from_preprocessed_data`` / ``export_prediction_from_logits`` functions
``nnUNetv2_predict`` runs) and atso-fast (read -> ``relabel_volume`` -> write, then the pipelined
``relabel_archive``) label the real scans of ``shared/data/real``. Each side runs in its own
subprocess; seconds are split into preprocessing (read + crop/normalise/resample), network
(forward passes + blending) and export (resample back + argmax + write). Peak RSS is the largest
sum over the subprocess tree, sampled every 20 ms. Labels are compared voxel by voxel first.

Part ``memory``: a synthetic CT (air, body, organs; int16 HU) of ``--shape`` at ``--spacing`` mm
and a 105-class model at 1.5 mm (``--classes``, ``--model-spacing``); each side labels it in a
subprocess and its peak RSS is reported. Sizes that need more memory than the machine has are
skipped for nnU-Net (``--max-gb``); see RESULTS.md for the extrapolation. ``--sides`` runs one
side only (a large network's run split into several locked runs).

Part ``window``: seconds of one window's forward pass through our runtime and through the torch
network nnU-Net's predictor runs, on the memory part's model (sizes a ``memory`` run before it
is made).

Part ``command``: the commands users run, whole: ``nnUNetv2_predict_from_modelfolder`` against
``atso-fast relabel`` (default settings: ``auto`` runtime from the package's measured agreement),
on a planner-sized network: nnU-Net's own ``ExperimentPlanner`` plans the real CT cases
(fingerprint + ``nnUNetv2_plan_experiment`` on them, labels > 0 as foreground), and a model
folder with random weights (``--folds`` folds) is written from those plans; ``--plans`` takes a
plans.json instead. ``atso-fast import-nnunet`` (with ``--measure-scan`` on the first case) runs
once, timed apart. Then both commands run ``--repeats`` times, alternating, each into a fresh
folder; the best wall time of each is compared, and labels are compared voxel by voxel per case.
``--mirror`` runs both with mirroring (nnU-Net's default TTA; ``--mirror`` for ours), else nnU-Net
gets ``--disable_tta``; ``--runtime`` passes a runtime to ``atso-fast relabel`` (default: its
``auto``). ``--toy`` uses the 8-16-32-64 network of ``speed`` instead.

Usage:
    flock /work/bench.lock python benchmarks/bench_nnunet.py command [--cases ct_abdomen tumour_lung1] [--mirror]
    flock /work/bench.lock python benchmarks/bench_nnunet.py speed [--cases ct_abdomen ...] [--mirror]
    flock /work/bench.lock python benchmarks/bench_nnunet.py memory [--depths 40 80 400] [--sides ours]
    flock /work/bench.lock python benchmarks/bench_nnunet.py window --patch 128 128 128 --features 32 64 128 256 320 320
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from atso_fast.datasets.synthetic import synthetic_ct  # the one CT-like phantom of the benchmarks

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"

__all__ = ["main"]


# ------------------------------------------------------------------------------ process tree RSS
def _tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        here = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == here and p not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(rss.get(p, 0) for p in tree)


def run_measured(args: list[str], timeout: float) -> tuple[dict, float]:
    """Run ``python bench_nnunet.py <args>`` and return (its JSON result, peak tree RSS GiB)."""
    proc = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return result, peak[0] / 2**30


# ------------------------------------------------------------------------------ workers (subprocesses)
def nnunet_worker(ns: argparse.Namespace) -> dict:
    """nnUNetPredictor's sequential path with a timer around each of its three stages."""
    import torch
    from nnunetv2.inference import predict_from_raw_data as pfr
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import (
        DefaultPreprocessor,
    )

    torch.set_num_threads(ns.threads)
    times: list[dict] = []

    def timed(fn, key):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if key == "preprocess":
                    times.append({})
                times[-1][key] = times[-1].get(key, 0.0) + time.perf_counter() - start

        return wrapper

    DefaultPreprocessor.run_case = timed(DefaultPreprocessor.run_case, "preprocess")
    pfr.nnUNetPredictor.predict_logits_from_preprocessed_data = timed(
        pfr.nnUNetPredictor.predict_logits_from_preprocessed_data, "network"
    )
    pfr.export_prediction_from_logits = timed(pfr.export_prediction_from_logits, "export")
    predictor = pfr.nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=ns.mirror,
        device=torch.device("cpu"),
        verbose=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(ns.model, use_folds=None)
    patch = predictor.configuration_manager.patch_size  # warm-up: one window, not timed
    predictor.predict_sliding_window_return_logits(torch.zeros((1, *patch)))
    out = Path(ns.out)
    start = time.perf_counter()
    predictor.predict_from_files_sequential(
        [[img] for img in ns.images],
        [str(out / Path(img).parent.name) for img in ns.images],
        save_probabilities=False,
        overwrite=True,
    )
    return {"seconds": time.perf_counter() - start, "cases": times, "threads": torch.get_num_threads()}


def ours_worker(ns: argparse.Namespace) -> dict:
    """atso-fast: read -> relabel_volume -> write per case (stage split), then relabel_archive."""
    import torch  # noqa: F401  (imported before timing, as in nnU-Net's worker)

    from atso_fast.archive import relabel_archive
    from atso_fast.engine import Relabeler
    from atso_fast.io import read_volume, write_labels

    rel = Relabeler(
        ns.model,
        runtime=ns.runtime,
        mirror=ns.mirror,
        threads=ns.threads,
        batch_size=ns.batch_size,
        accumulate_dtype=ns.accumulate,
    )
    # warm-up, not timed: one window through the whole path (resampled to the model's grid and
    # back: a scan at 1.25x the model's spacing, 1/1.25 of the window on each axis)
    window = rel.package.window3d
    spacing = rel.package.spacing if rel.package.spacing and len(rel.package.spacing) == 3 else None
    shape = window if spacing is None else [max(1, int(w / 1.25)) for w in window]
    rel.relabel_volume(
        np.ones((rel.package.in_channels, *shape), np.float32),
        spacing=None if spacing is None else [1.25 * s for s in spacing],
    )
    out = Path(ns.out)
    cases = []
    start = time.perf_counter()
    for img in ns.images:
        t0 = time.perf_counter()
        array, meta = read_volume(img)
        t1 = time.perf_counter()
        res = rel.relabel_volume(array, spacing=meta.spacing, affine=meta.affine)
        del array
        t2 = time.perf_counter()
        write_labels(out / f"{Path(img).parent.name}.nii.gz", res.labels, meta)
        t3 = time.perf_counter()
        tm = res.stats["timings"]
        cases.append(
            {
                "preprocess": t1 - t0 + tm["preprocess"],
                "network": tm["network"] + tm["stitch"],
                "export": tm["export"] + t3 - t2,
                "read": t1 - t0,
                "write": t3 - t2,
                "relabel": t2 - t1,
                "windows": res.stats["windows"],
                "grid": res.stats["network_shape"],
            }
        )
        del res
    sequential = time.perf_counter() - start
    result = {"seconds": sequential, "cases": cases, "runtime": rel.runtime_label}
    if ns.archive:
        links = Path(tempfile.mkdtemp(prefix="bench_nnunet_in_"))
        for img in ns.images:
            os.symlink(img, links / f"{Path(img).parent.name}.nii.gz")
        summary = relabel_archive(rel, links, out / "archive", progress=False)
        result["archive_seconds"] = summary["seconds"]
        result["archive_failed"] = summary["failed"]
    return result


# ------------------------------------------------------------------------------ helpers
def machine() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {memory:.0f} GiB"


def agreement(a_dir: Path, b_dir: Path, names: list[str]) -> dict[str, float]:
    from atso_fast.io import read_volume

    out = {}
    for name in names:
        a, ma = read_volume(a_dir / f"{name}.nii.gz")
        b, mb = read_volume(b_dir / f"{name}.nii.gz")
        if a.shape != b.shape or not np.allclose(ma.affine, mb.affine, atol=1e-4):
            raise RuntimeError(f"{name}: outputs differ in grid: {a.shape} vs {b.shape}")
        out[name] = float((a == b).mean())
    return out


def model_folder(root: Path, ns: argparse.Namespace, num_classes: int, spacing, patch, features) -> Path:
    from atso_fast.datasets.nnunet_folder import make_nnunet_folder

    return make_nnunet_folder(
        root,
        configuration="3d_fullres",
        patch=patch,
        spacing=spacing,
        num_classes=num_classes,
        folds=tuple(range(ns.folds)),
        features=features,
        scale=ns.scale,
        seed=0,
    )


def _side_args(kind: str, model: Path, images: list[str], out: Path, ns: argparse.Namespace) -> list[str]:
    args = [kind, "--model", str(model), "--out", str(out), "--threads", str(ns.threads), "--images", *images]
    if ns.mirror:
        args.append("--mirror")
    if kind == "ours-worker":
        args += ["--runtime", ns.runtime, "--batch-size", str(ns.batch_size), "--accumulate", ns.accumulate]
        if getattr(ns, "archive", True):
            args.append("--archive")
    return args


def _stage_sums(cases: list[dict]) -> dict[str, float]:
    return {k: float(sum(c.get(k, 0.0) for c in cases)) for k in ("preprocess", "network", "export")}


# ------------------------------------------------------------------------------ part: speed
def speed(ns: argparse.Namespace) -> dict:
    from atso_fast import import_nnunet

    work = Path(tempfile.mkdtemp(prefix="bench_nnunet_"))
    folder = model_folder(work / "results", ns, ns.num_classes, ns.model_spacing, ns.patch, ns.features)
    start = time.perf_counter()
    package = import_nnunet(folder, work / "package")
    import_seconds = time.perf_counter() - start
    images = [str(REAL / c / "image.nii.gz") for c in ns.cases]
    (work / "nnunet").mkdir()
    (work / "ours").mkdir()
    theirs, theirs_gb = run_measured(_side_args("nnunet-worker", folder, images, work / "nnunet", ns), ns.timeout)
    ours, ours_gb = run_measured(_side_args("ours-worker", package, images, work / "ours", ns), ns.timeout)
    agree = agreement(work / "ours", work / "nnunet", ns.cases)
    t_sum, o_sum = _stage_sums(theirs["cases"]), _stage_sums(ours["cases"])
    return {
        "part": "speed",
        "nnunet": {**theirs, "stages": t_sum, "peak_rss_gib": theirs_gb},
        "ours": {**ours, "stages": o_sum, "peak_rss_gib": ours_gb},
        "agreement": agree,
        "import_seconds": import_seconds,
        "speedup_end_to_end": theirs["seconds"] / ours["seconds"],
        "speedup_archive": theirs["seconds"] / ours["archive_seconds"] if "archive_seconds" in ours else None,
        "pre_export_vs_network": (o_sum["preprocess"] + o_sum["export"]) / max(o_sum["network"], 1e-9),
        "pre_export_speedup": (t_sum["preprocess"] + t_sum["export"])
        / max(o_sum["preprocess"] + o_sum["export"], 1e-9),
    }


# ------------------------------------------------------------------------------ part: command
def planner_plans(work: Path, cases: list[str]) -> dict:
    """nnU-Net's ExperimentPlanner's ``nnUNetPlans.json`` for the real ``cases`` (an nnUNet_raw
    dataset of their images, label > 0 as foreground; fingerprint, then planning)."""
    import SimpleITK as sitk

    raw = work / "raw" / "Dataset501_Bench"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for i, case in enumerate(cases):
        image = sitk.ReadImage(str(REAL / case / "image.nii.gz"))
        label = sitk.ReadImage(str(REAL / case / "label.nii.gz"))
        fg = sitk.GetImageFromArray((sitk.GetArrayFromImage(label) > 0).astype(np.uint8))
        fg.CopyInformation(image)
        sitk.WriteImage(image, str(raw / "imagesTr" / f"case{i:03d}_0000.nii.gz"))
        sitk.WriteImage(fg, str(raw / "labelsTr" / f"case{i:03d}.nii.gz"))
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "foreground": 1}}
    dataset.update(numTraining=len(cases), file_ending=".nii.gz")
    (raw / "dataset.json").write_text(json.dumps(dataset))
    env = _nnunet_env(work)
    subprocess.run(["nnUNetv2_extract_fingerprint", "-d", "501", "-np", "1"], env=env, check=True, capture_output=True)
    subprocess.run(["nnUNetv2_plan_experiment", "-d", "501"], env=env, check=True, capture_output=True)
    return json.loads((work / "preprocessed" / "Dataset501_Bench" / "nnUNetPlans.json").read_text())


def _nnunet_env(work: Path) -> dict[str, str]:
    names = {"nnUNet_raw": "raw", "nnUNet_preprocessed": "preprocessed", "nnUNet_results": "results"}
    return {**os.environ, **{k: str(work / v) for k, v in names.items()}}


def _timed_command(args: list[str], env: dict[str, str], timeout: float) -> tuple[float, float, str]:
    """(wall seconds, peak tree RSS GiB, stderr tail) of one command; a failure raises."""
    peak = [0]
    start = time.perf_counter()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate(timeout=timeout)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {err[-2000:]}")
    return seconds, peak[0] / 2**30, (out + err)[-3000:]


def command(ns: argparse.Namespace) -> dict:
    from atso_fast.datasets.nnunet_folder import make_nnunet_folder

    if ns.work is not None and (ns.work / "package" / "model.json").is_file():
        return _commands(ns, ns.work, None, "(reused from an earlier run of this part)", ns.work / "package")
    work = Path(tempfile.mkdtemp(prefix="bench_nnunet_cmd_")) if ns.work is None else ns.work
    work.mkdir(parents=True, exist_ok=True)
    env = _nnunet_env(work)
    if ns.toy:
        folder = model_folder(work / "results", ns, ns.num_classes, [1.5] * 3, [32, 96, 96], [8, 16, 32, 64])
        plans_source = "toy: 8-16-32-64, patch 32x96x96, 1.5 mm"
    else:
        plans = json.loads(ns.plans.read_text()) if ns.plans else planner_plans(work, ns.cases)
        folder = make_nnunet_folder(
            work / "results", plans=plans, num_classes=ns.num_classes, folds=tuple(range(ns.folds)), scale=ns.scale
        )
        plans_source = str(ns.plans) if ns.plans else "nnU-Net ExperimentPlanner on the cases"
    package = work / "package"
    scan = str(REAL / ns.cases[0] / "image.nii.gz")
    import_args = ["atso-fast", "import-nnunet", str(folder), str(package), "--quiet", "--measure-scan", scan]
    import_seconds, _, import_log = _timed_command(import_args, env, ns.timeout)
    return _commands(ns, work, import_seconds, import_log, package, plans_source)


def _model_folder_in(work: Path) -> Path:
    return next((work / "results").glob("Dataset*/nnUNetTrainer__nnUNetPlans__3d_fullres"))


def _commands(
    ns: argparse.Namespace,
    work: Path,
    import_seconds: float | None,
    import_log: str,
    package: Path,
    plans_source: str = "reused",
) -> dict:
    """Both commands, alternating, ``ns.repeats`` times, on ``ns.cases`` (linked into a fresh
    images folder), with the model folder and package found in ``work``."""
    env = _nnunet_env(work)
    folder = _model_folder_in(work)
    config = json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]
    images = Path(tempfile.mkdtemp(prefix="images_", dir=work))
    for case in ns.cases:
        (images / f"{case}_0000.nii.gz").symlink_to(REAL / case / "image.nii.gz")
    tta = [] if ns.mirror else ["--disable_tta"]
    theirs_cmd = ["nnUNetv2_predict_from_modelfolder", "-i", str(images), "-m", str(folder), "-device", "cpu"]
    theirs_cmd += ["-f", *map(str, range(ns.folds)), *tta]
    ours_cmd = ["atso-fast", "relabel", str(package), str(images)] + (["--mirror"] if ns.mirror else [])
    ours_cmd += [] if ns.runtime == "auto" else ["--runtime", ns.runtime]
    runs: dict[str, list[dict]] = {"nnunet": [], "ours": []}
    outs = Path(tempfile.mkdtemp(prefix="outputs_", dir=work))
    for repeat in range(ns.repeats):
        for side, cmd in (("nnunet", theirs_cmd), ("ours", ours_cmd)):
            out = outs / f"{side}_{repeat}"
            seconds, gib, log = _timed_command([*cmd, "-o", str(out)], env, ns.timeout)
            runs[side].append({"seconds": seconds, "peak_rss_gib": gib, "out": str(out), "log_tail": log[-600:]})
            print(f"{side} run {repeat}: {seconds:.1f} s, peak {gib:.2f} GiB", file=sys.stderr, flush=True)
    best = {side: min(runs[side], key=lambda r: r["seconds"]) for side in runs}
    agree = agreement(Path(best["ours"]["out"]), Path(best["nnunet"]["out"]), ns.cases)
    return {
        "part": "command",
        "plans": plans_source,
        "network": {
            "patch": config["patch_size"],
            "spacing": config["spacing"],
            "features": config["architecture"]["arch_kwargs"]["features_per_stage"],
            "folds": ns.folds,
        },
        "commands": {"nnunet": theirs_cmd, "ours": ours_cmd},
        "import_seconds": import_seconds,
        "import_log": import_log[-1500:],
        "runs": runs,
        "best_seconds": {side: best[side]["seconds"] for side in best},
        "speedup": best["nnunet"]["seconds"] / best["ours"]["seconds"],
        "agreement": agree,
        "min_agreement": min(agree.values()),
    }


# ------------------------------------------------------------------------------ part: memory
def memory(ns: argparse.Namespace) -> dict:
    import nibabel as nib

    work = Path(tempfile.mkdtemp(prefix="bench_nnunet_mem_"))
    folder, package, _ = memory_model(ns, work)
    rows = []
    for depth in ns.depths:
        shape = (depth, ns.size, ns.size)
        scan = work / f"ct{depth}" / "image.nii.gz"
        scan.parent.mkdir()
        affine = np.diag([-ns.spacing, -ns.spacing, ns.spacing, 1.0])
        nib.save(nib.Nifti1Image(np.ascontiguousarray(synthetic_ct(shape).T), affine), scan)
        row = {"shape": list(shape), "classes": ns.classes}
        for kind, model in (("ours-worker", package), ("nnunet-worker", folder)):
            key = "ours" if kind == "ours-worker" else "nnunet"
            if key not in ns.sides:
                continue
            need = _nnunet_estimate_gib(shape, ns) if key == "nnunet" else 0.0
            if key == "nnunet" and need > ns.max_gb:
                row[key] = {"skipped": f"needs ~{need:.0f} GiB (estimate), more than --max-gb {ns.max_gb}"}
                continue
            out = work / f"out_{key}_{depth}"
            out.mkdir()
            ns.archive = False
            result, gib = run_measured(_side_args(kind, model, [str(scan)], out, ns), ns.timeout)
            row[key] = {"peak_rss_gib": gib, "seconds": result["seconds"], "stages": _stage_sums(result["cases"])}
            print(f"  {key} {shape}: peak {gib:.2f} GiB, {result['seconds']:.1f} s", file=sys.stderr, flush=True)
        if all("peak_rss_gib" in row.get(side, {}) for side in ("ours", "nnunet")):
            row["agreement"] = agreement(work / f"out_ours_{depth}", work / f"out_nnunet_{depth}", [f"ct{depth}"])
        rows.append(row)
    return {
        "part": "memory",
        "rows": rows,
        "model_spacing": ns.model_spacing,
        "scan_spacing": ns.spacing,
        "patch": ns.patch,
        "features": ns.features,
        "accumulate": ns.accumulate,
        "batch_size": ns.batch_size,
        "architecture": json.loads((folder / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"][
            "arch_kwargs"
        ],
    }


def memory_model(ns: argparse.Namespace, work: Path) -> tuple[Path, Path, float | None]:
    """The memory/window parts' nnU-Net folder and imported package: ``(folder, package, import
    seconds)``. Built in ``work``, or reused from ``--models DIR`` when DIR holds the same model
    (seed 0, same settings; import seconds None then), else built there: importing a large network
    (ONNX export and its check against torch) takes minutes, once instead of per locked run."""
    from atso_fast import import_nnunet

    key = {
        "classes": ns.classes,
        "model_spacing": ns.model_spacing,
        "patch": ns.patch,
        "features": ns.features,
        "folds": ns.folds,
        "scale": ns.scale,
        "seed": 0,
    }
    root = ns.models if ns.models is not None else work
    stamp = root / "model_settings.json"
    if stamp.is_file():
        if json.loads(stamp.read_text()) != key:
            raise ValueError(f"--models {root} holds another model ({stamp.read_text()}), not {key}")
        return root / "results" / _FOLDER, root / "package", None
    folder = model_folder(root / "results", ns, ns.classes, [ns.model_spacing] * 3, ns.patch, ns.features)
    start = time.perf_counter()
    package = import_nnunet(folder, root / "package")
    seconds = time.perf_counter() - start
    stamp.write_text(json.dumps(key))  # written last: a half-built folder is never reused
    return folder, package, seconds


_FOLDER = "Dataset999_Synthetic/nnUNetTrainer__nnUNetPlans__3d_fullres"


def _nnunet_estimate_gib(shape, ns) -> float:
    """nnU-Net's export holds float16 target logits, their float64 copy and float16 native logits."""
    target = np.prod([round(s * ns.spacing / ns.model_spacing) for s in shape])
    return ns.classes * (target * (2 + 8) + np.prod(shape) * 2) / 2**30 + 1.5


# ------------------------------------------------------------------------------ part: window
def window(ns: argparse.Namespace) -> dict:
    """Seconds of one window's forward pass (batch 1), our runtime and nnU-Net's torch network, on
    the memory part's model: what a ``memory`` run costs is about windows x this."""
    import torch

    from atso_fast.engine import Relabeler

    torch.set_num_threads(ns.threads)
    folder, package, import_seconds = memory_model(ns, Path(tempfile.mkdtemp(prefix="bench_nnunet_win_")))
    out = {"part": "window", "import_seconds": import_seconds, "patch": ns.patch, "features": ns.features}
    x = np.random.default_rng(0).standard_normal((1, 1, *ns.patch), dtype=np.float32)
    rel = Relabeler(package, runtime=ns.runtime, threads=ns.threads, batch_size=1)
    out["ours"] = _repeat(lambda: rel.runtime(x), ns.repeats) | {"runtime": rel.runtime_label}
    net = _nnunet_network(folder)
    with torch.inference_mode():
        out["nnunet_torch"] = _repeat(lambda: net(torch.from_numpy(x)), ns.repeats)
    return out


def _nnunet_network(folder: Path):
    """The network ``nnUNetPredictor`` runs for ``folder`` (fold 0, eval mode)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0,))
    return predictor.network.eval()


def _repeat(fn, repeats: int) -> dict:
    """One untimed call, then ``repeats`` timed ones."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"seconds": times, "median": float(np.median(times))}


# ------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    for name in ("speed", "memory", "window", "command"):
        q = sub.add_parser(name)
        q.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
        q.add_argument("--mirror", action="store_true")
        q.add_argument("--runtime", default="auto", help="atso-fast runtime (default: auto, the package's rule)")
        q.add_argument("--batch-size", type=int, default=4)
        q.add_argument("--accumulate", default="float32", choices=["float32", "float16"])
        q.add_argument("--folds", type=int, default=1)
        q.add_argument("--scale", type=float, default=8.0)
        q.add_argument("--timeout", type=float, default=7200)
        q.add_argument("--json", type=Path)
    s = sub.choices["speed"]
    s.add_argument("--cases", nargs="+", default=["ct_abdomen", "tumour_lung1", "mr_abdomen", "tumour_brain1"])
    s.add_argument("--num-classes", type=int, default=4)
    s.add_argument("--model-spacing", type=float, nargs=3, default=[1.5, 1.5, 1.5])
    s.add_argument("--patch", type=int, nargs=3, default=[32, 96, 96])
    s.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64])
    c = sub.choices["command"]
    c.add_argument("--cases", nargs="+", default=["ct_abdomen", "tumour_lung1"])
    c.add_argument("--num-classes", type=int, default=4)
    c.add_argument("--plans", type=Path, help="an nnUNetPlans.json (default: nnU-Net's planner on the cases)")
    c.add_argument("--toy", action="store_true", help="the toy 8-16-32-64 network instead")
    c.add_argument("--repeats", type=int, default=2)
    c.add_argument(
        "--work", type=Path, help="work folder: reused when it holds an imported package (no planning or import)"
    )
    c.set_defaults(folds=2)
    for name in ("memory", "window"):
        m = sub.choices[name]
        m.add_argument("--classes", type=int, default=105)
        m.add_argument("--model-spacing", type=float, default=1.5)
        m.add_argument("--patch", type=int, nargs=3, default=[64, 128, 128])
        m.add_argument("--models", type=Path, help="folder to build the model in once and reuse it from")
        m.add_argument(
            "--features",
            type=int,
            nargs="+",
            default=[4, 8, 16, 32],
            help="features per stage; 32 64 128 256 320 320 with --patch 96 128 128 is what nnU-Net "
            "2.8.1's default planner gives the memory case at 105 labels (see RESULTS.md)",
        )
    sub.choices["window"].add_argument("--repeats", type=int, default=3)
    m = sub.choices["memory"]
    m.add_argument("--depths", type=int, nargs="+", default=[40, 80, 400])
    m.add_argument("--size", type=int, default=512)
    m.add_argument("--spacing", type=float, default=0.8)
    m.add_argument("--max-gb", type=float, default=10.0, help="skip nnU-Net runs estimated above this")
    m.add_argument(
        "--sides",
        nargs="+",
        default=["ours", "nnunet"],
        choices=["ours", "nnunet"],
        help="which predictors to run (each side in its own subprocess)",
    )
    for name in ("nnunet-worker", "ours-worker"):
        w = sub.add_parser(name)
        w.add_argument("--model", required=True)
        w.add_argument("--out", required=True)
        w.add_argument("--images", nargs="+", required=True)
        w.add_argument("--threads", type=int, required=True)
        w.add_argument("--mirror", action="store_true")
        w.add_argument("--runtime", default="onnxruntime")
        w.add_argument("--batch-size", type=int, default=4)
        w.add_argument("--accumulate", default="float32")
        w.add_argument("--archive", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.part in ("nnunet-worker", "ours-worker"):
        result = (nnunet_worker if ns.part == "nnunet-worker" else ours_worker)(ns)
        print(json.dumps(result))
        return 0
    load_before = os.getloadavg()
    result = {"speed": speed, "memory": memory, "window": window, "command": command}[ns.part](ns)
    result.update(
        machine=machine(),
        date=datetime.date.today().isoformat(),
        load_before=load_before,
        load_after=os.getloadavg(),
        threads=ns.threads,
        mirror=ns.mirror,
        runtime=ns.runtime,
        settings={k: v for k, v in vars(ns).items() if k not in ("json", "part")},
    )
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if ns.json:
        ns.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
