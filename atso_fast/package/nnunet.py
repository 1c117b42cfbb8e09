"""Import a trained nnU-Net v2 model folder as an atso-fast model package.

A model folder (``nnUNet_results/DatasetXXX/TRAINER__PLANS__CONFIGURATION``) holds
``dataset.json``, ``plans.json`` and ``fold_K/checkpoint_final.pth``. The importer builds the
network nnU-Net would build from the plans' ``architecture`` entry (a class of
``dynamic_network_architectures``, resolved through an allow-list, never by importing a name
taken from the file), loads each fold's weights from a checkpoint read with
``torch.load(weights_only=True)`` (tensors, numbers, strings and containers; a checkpoint never
runs code), and exports one ONNX graph whose output is the mean of the folds' logits (nnU-Net
averages the folds' logits the same way), verified against PyTorch.

Carried into ``model.json``: patch size (the window), target spacing, ``transpose_forward``,
crop to nonzero, per-channel normalisation with the plans' foreground intensity properties and
``use_mask_for_norm``, nnU-Net's resampling orders and anisotropy rule, the ``nnunet`` window
grid (tile step 0.5 is the relabeler's default overlap), label names and the allowed mirroring
axes. Relabelling the package needs neither nnunetv2 nor this module.

Not supported (refused with a message naming the reason): region-based models (sigmoid outputs
per region), cascade stages (they need the previous stage's segmentation as input), plans older
than nnU-Net 2.4 (no ``architecture`` entry), custom preprocessors, resampling functions,
normalisation schemes, image readers or network classes outside the allow-lists below.
"""

from __future__ import annotations

import copy
import importlib
import io
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from atso_fast.io.base import InputError
from atso_fast.io.files import read_regular_file, read_text_file
from atso_fast.package.export import export_model
from atso_fast.package.model import PackageError, validate_meta

__all__ = ["NETWORK_CLASSES", "import_nnunet", "load_checkpoint", "read_model_folder"]

NETWORK_CLASSES = {
    f"dynamic_network_architectures.architectures.unet.{name}": name
    for name in ("PlainConvUNet", "ResidualEncoderUNet", "ResidualUNet")
}
"""Network classes the importer builds (nnU-Net's default and residual-encoder U-Nets)."""

_ACTIVATIONS = ("LeakyReLU", "ReLU", "PReLU", "GELU", "ELU")
_OPS = frozenset(
    [
        *(f"torch.nn.modules.conv.Conv{d}d" for d in (2, 3)),
        *(f"torch.nn.modules.instancenorm.InstanceNorm{d}d" for d in (2, 3)),
        *(f"torch.nn.modules.batchnorm.BatchNorm{d}d" for d in (2, 3)),
        *(f"torch.nn.modules.dropout.Dropout{d}d" for d in (2, 3)),
        *(f"torch.nn.{name}" for name in _ACTIVATIONS),
        *(f"torch.nn.modules.activation.{name}" for name in _ACTIVATIONS),
        "torch.nn.modules.normalization.GroupNorm",
        "dynamic_network_architectures.building_blocks.residual.BasicBlockD",
        "dynamic_network_architectures.building_blocks.residual.BottleneckD",
    ]
)
"""Layer classes ``_kw_requires_import`` may name (by module path)."""

_NORMALIZATION = {
    "CTNormalization": "ct",
    "ZScoreNormalization": "zscore",
    "NoNormalization": "none",
    "RescaleTo01Normalization": "rescale_to_0_1",
    "RGBTo01Normalization": "rgb_to_0_1",
}
_READERS = {
    "SimpleITKIO": "as-stored",
    "NibabelIO": "as-stored",
    "NibabelIOWithReorient": "RAS",
    "SimpleITKIOWithReorient": "RAS",
}
_RESAMPLING = "resample_data_or_seg_to_shape"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        if not os.path.lexists(path):
            raise PackageError(
                f"{path}: not found (an nnU-Net model folder holds dataset.json, plans.json "
                "and fold_K/checkpoint_final.pth)"
            )
        data = json.loads(read_text_file(path))
        if not isinstance(data, dict):
            raise PackageError(f"{path}: must hold a JSON object, got a {type(data).__name__}")
        return data
    except InputError as exc:
        raise PackageError(str(exc)) from None
    except json.JSONDecodeError as exc:
        raise PackageError(f"{path}: unreadable JSON ({exc})") from None


# ------------------------------------------------------------------------------ checkpoints
def _safe_globals() -> list[Any]:
    """The few non-tensor types nnU-Net checkpoints hold (numpy scalars in the training log)."""
    import numpy as np

    # numpy 2 moved it to numpy._core; imported by name, as the installed stubs know one path only
    multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    scalar, rebuild = multiarray.scalar, multiarray._reconstruct
    dtypes = [
        type(np.dtype(t))
        for t in (
            "float16",
            "float32",
            "float64",
            "int8",
            "int16",
            "int32",
            "int64",
            "uint8",
            "uint16",
            "uint32",
            "uint64",
            "bool",
        )
    ]
    return [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),
        rebuild,
        (rebuild, "numpy.core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *dtypes,
    ]


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """An nnU-Net checkpoint as plain data: ``torch.load(weights_only=True)`` with an allow-list
    of numpy scalar types only (no code runs while loading).

    Raises:
        PackageError: missing or unreadable file, a Python object outside the allow-list, or
            no ``network_weights``.
    """
    import torch

    path = Path(path)
    if not os.path.lexists(path):
        raise PackageError(f"{path}: checkpoint not found")
    try:
        data = read_regular_file(path)
    except InputError as exc:
        raise PackageError(str(exc)) from None
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip/pickle), EOFError ...
        found = re.search(r"(?:Unsupported global: GLOBAL|but got) <?(?:class ')?([\w.]+)", str(exc))
        what = (
            f"a Python object atso-fast does not unpickle ({found.group(1)})"
            if found
            else f"not a readable torch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        )
        raise PackageError(f"{path}: {what}; checkpoints load with torch.load(weights_only=True)") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("network_weights"), dict):
        raise PackageError(f"{path}: not an nnU-Net checkpoint (no 'network_weights')")
    return ckpt


# ------------------------------------------------------------------------------ the folder
def _configuration(plans: dict, name: str, where: Path) -> dict:
    """``plans["configurations"][name]`` with ``inherits_from`` resolved (nnU-Net's PlansManager)."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or name not in configs:
        raise PackageError(f"{where}: configuration {name!r} not in plans (has {sorted(configs or {})})")
    seen, chain = set(), []
    while name is not None:
        if name in seen or name not in configs:
            raise PackageError(f"{where}: configuration inheritance of {name!r} is broken")
        seen.add(name)
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
    out: dict = {}
    for cfg in reversed(chain):
        out.update(copy.deepcopy(cfg))
    return out


def _folds(folder: Path, folds: Any, checkpoint: str) -> list[str]:
    if folds is None:  # nnU-Net's auto_detect_available_folds: fold_K with the checkpoint, not fold_all
        found = sorted(
            (p.name[5:] for p in folder.glob("fold_*") if p.name != "fold_all" and os.path.lexists(p / checkpoint)),
            key=lambda f: (len(f), f),
        )
        if not found:
            raise PackageError(f"{folder}: no fold_K/{checkpoint} found")
        return found
    if isinstance(folds, (int, str)):
        folds = [folds]
    out = [str(f) for f in folds]
    if not out or any(not (f == "all" or f.isdigit()) for f in out):
        raise PackageError(f"folds must be fold numbers (or 'all'), got {folds!r}")
    return out


def read_model_folder(
    model_folder: str | os.PathLike, folds: Any = None, checkpoint: str = "checkpoint_final.pth"
) -> dict[str, Any]:
    """``dataset.json``, ``plans.json``, the fold checkpoints and the resolved configuration.

    Raises:
        PackageError: a missing or inconsistent file, or an unsupported model (see the module).
    """
    folder = Path(model_folder)
    if not folder.is_dir():
        raise PackageError(f"{folder}: not an nnU-Net model folder (not a directory)")
    if "/" in checkpoint or "\\" in checkpoint or checkpoint in ("", ".", ".."):
        raise PackageError(f"checkpoint must be a file name inside fold_K, got {checkpoint!r}")
    dataset, plans = _read_json(folder / "dataset.json"), _read_json(folder / "plans.json")
    names = _folds(folder, folds, checkpoint)
    ckpts = [load_checkpoint(folder / f"fold_{f}" / checkpoint) for f in names]
    configs = {str((c.get("init_args") or {}).get("configuration")) for c in ckpts}
    if len(configs) != 1 or "None" in configs:
        raise PackageError(
            f"{folder}: the folds' checkpoints name configurations {sorted(configs)}; "
            "expected one (init_args.configuration)"
        )
    name = configs.pop()
    return {
        "folder": folder,
        "dataset": dataset,
        "plans": plans,
        "folds": names,
        "checkpoints": ckpts,
        "configuration_name": name,
        "configuration": _configuration(plans, name, folder / "plans.json"),
        "checkpoint": checkpoint,
    }


def _refuse_unsupported(model: dict) -> None:
    where, cfg, dataset, plans = model["folder"], model["configuration"], model["dataset"], model["plans"]
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise PackageError(f"{where / 'dataset.json'}: no 'labels' mapping")
    if "regions_class_order" in dataset or any(isinstance(v, (list, tuple)) for v in labels.values()):
        raise PackageError(
            f"{where}: region-based models (sigmoid outputs per region, dataset.json "
            "regions_class_order) are not supported"
        )
    if cfg.get("previous_stage"):
        raise PackageError(
            f"{where}: configuration {model['configuration_name']!r} is a cascade stage (it needs the "
            f"segmentation of {cfg['previous_stage']!r} as input); cascades are not supported, "
            "import the 3d_fullres or 3d_lowres model instead"
        )
    if "architecture" not in cfg:
        raise PackageError(
            f"{where / 'plans.json'}: no 'architecture' entry (plans of nnU-Net < 2.4 are not "
            "supported; re-plan with nnU-Net >= 2.4)"
        )
    if cfg.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise PackageError(
            f"{where}: preprocessor {cfg['preprocessor_name']!r} is not supported (only DefaultPreprocessor)"
        )
    for key in ("resampling_fn_data", "resampling_fn_probabilities"):
        if cfg.get(key, _RESAMPLING) != _RESAMPLING:
            raise PackageError(f"{where}: {key} {cfg[key]!r} is not supported (only {_RESAMPLING})")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in _READERS:
        raise PackageError(f"{where}: image reader {reader!r} is not supported (only {sorted(_READERS)})")
    if plans.get("label_manager", "LabelManager") != "LabelManager":
        raise PackageError(f"{where}: label manager {plans['label_manager']!r} is not supported")


# ------------------------------------------------------------------------------ what model.json holds
def _class_names(dataset: dict, where: Path) -> list[str]:
    """Label names by value, without the ignore label (nnU-Net makes no output for it)."""
    items = [(int(v), str(k)) for k, v in dataset["labels"].items() if k != "ignore"]
    values = sorted(v for v, _ in items)
    if values != list(range(len(values))):
        raise PackageError(f"{where / 'dataset.json'}: labels must be 0..N-1 (nnU-Net's rule), got {values}")
    return [name for _, name in sorted(items)]


def _channels(dataset: dict) -> int:
    names = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(names, dict) or not names:
        raise PackageError("dataset.json: no 'channel_names'")
    return len(names)


def _normalization(model: dict, channels: int) -> list[dict[str, Any]]:
    cfg, plans, where = model["configuration"], model["plans"], model["folder"] / "plans.json"
    schemes, masks = cfg.get("normalization_schemes", []), cfg.get("use_mask_for_norm", [])
    props = plans.get(
        "foreground_intensity_properties_per_channel", plans.get("foreground_intensity_properties_by_modality", {})
    )
    if len(schemes) != channels or len(masks) != channels:
        raise PackageError(
            f"{where}: normalization_schemes/use_mask_for_norm must list {channels} channel(s), "
            f"got {schemes!r} / {masks!r}"
        )
    out = []
    for c, (scheme, use_mask) in enumerate(zip(schemes, masks)):
        if scheme not in _NORMALIZATION:
            raise PackageError(
                f"{where}: normalisation {scheme!r} of channel {c} is not supported (only {sorted(_NORMALIZATION)})"
            )
        policy: dict[str, Any] = {"scheme": _NORMALIZATION[scheme]}
        if policy["scheme"] == "ct":
            p = props.get(str(c)) or {}
            try:
                policy.update(
                    clip=[float(p["percentile_00_5"]), float(p["percentile_99_5"])],
                    mean=float(p["mean"]),
                    std=float(p["std"]),
                )
            except (KeyError, TypeError, ValueError):
                raise PackageError(
                    f"{where}: CTNormalization of channel {c} needs "
                    "foreground_intensity_properties_per_channel (percentiles, mean, std)"
                ) from None
        elif policy["scheme"] == "zscore" and bool(use_mask):
            policy["use_mask"] = True
        out.append(policy)
    return out


def _resampling(cfg: dict, where: Path) -> dict[str, Any]:
    data = cfg.get("resampling_fn_data_kwargs") or {"order": 3, "order_z": 0, "force_separate_z": None}
    prob = cfg.get("resampling_fn_probabilities_kwargs") or {"order": 1, "order_z": 0, "force_separate_z": None}
    if data.get("force_separate_z") != prob.get("force_separate_z"):
        raise PackageError(
            f"{where}: force_separate_z differs between data and probabilities resampling "
            f"({data.get('force_separate_z')!r} vs {prob.get('force_separate_z')!r})"
        )
    return {
        "data_order": int(data.get("order", 3)),
        "data_order_z": int(data.get("order_z", 0)),
        "probabilities_order": int(prob.get("order", 1)),
        "probabilities_order_z": int(prob.get("order_z", 0)),
        "separate_z": data.get("force_separate_z"),
        "anisotropy_threshold": float(data.get("separate_z_anisotropy_threshold", 3.0)),
    }


def _transpose(plans: dict, where: Path) -> list[int]:
    fwd, bwd = plans.get("transpose_forward", [0, 1, 2]), plans.get("transpose_backward", [0, 1, 2])
    if sorted(fwd) != [0, 1, 2] or [fwd.index(i) for i in range(3)] != list(bwd):
        raise PackageError(
            f"{where}: transpose_forward {fwd!r} / transpose_backward {bwd!r} are not inverse permutations"
        )
    return [int(a) for a in fwd]


def _mirror_axes(ckpt: dict, spatial_dims: int) -> list[int]:
    axes = ckpt.get("inference_allowed_mirroring_axes")
    if axes is None:  # nnU-Net's predictor then mirrors nothing, whatever use_mirroring says
        return []
    return sorted(int(a) for a in axes if 0 <= int(a) < spatial_dims)


# ------------------------------------------------------------------------------ the network
def _locate(name: str, where: Path) -> Any:
    """An allow-listed class by its module path (nothing else is ever imported)."""
    if name in NETWORK_CLASSES:
        module, attr = "dynamic_network_architectures.architectures.unet", NETWORK_CLASSES[name]
    elif name in _OPS:
        module, attr = name.rsplit(".", 1)
    else:
        raise PackageError(
            f"{where}: class {name!r} is not one the importer builds (allowed: network classes "
            f"{sorted(NETWORK_CLASSES)} and torch layers {sorted(_OPS)})"
        )
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise PackageError(
            f"importing nnU-Net models needs dynamic_network_architectures (pip install 'atso-fast[nnunet]'): {exc}"
        ) from None


def build_network(model: dict, in_channels: int, num_classes: int) -> Any:
    """The plans' network (deep supervision off), as nnU-Net's ``get_network_from_plans``."""
    where = model["folder"] / "plans.json"
    arch = model["configuration"]["architecture"]
    kwargs = dict(arch.get("arch_kwargs") or {})
    for key in arch.get("_kw_requires_import") or []:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(str(kwargs[key]), where)
    network_class = _locate(str(arch.get("network_class_name")), where)
    kwargs["deep_supervision"] = False
    try:
        return network_class(input_channels=in_channels, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise PackageError(f"{where}: cannot build {arch.get('network_class_name')} from arch_kwargs ({exc})") from None


def _fold_mean(nets: list[Any]) -> Any:
    """A torch module whose output is the mean of the folds' logits (nnU-Net's
    ``predict_logits_from_preprocessed_data``; the mean commutes with the window blending)."""
    import torch

    class FoldMean(torch.nn.Module):
        def __init__(self, folds: list[Any]):
            super().__init__()
            self.folds = torch.nn.ModuleList(folds)

        def forward(self, x):
            total = self.folds[0](x)
            for net in self.folds[1:]:
                total = total + net(x)
            return total / len(self.folds) if len(self.folds) > 1 else total

    return FoldMean(nets).eval()


def _fold_networks(model: dict, in_channels: int, num_classes: int) -> list[Any]:
    nets = []
    for fold, ckpt in zip(model["folds"], model["checkpoints"]):
        net = build_network(model, in_channels, num_classes)
        try:
            net.load_state_dict(ckpt["network_weights"])
        except RuntimeError as exc:
            raise PackageError(
                f"{model['folder']}/fold_{fold}: weights do not fit the plans' network "
                f"({str(exc).splitlines()[0][:300]})"
            ) from None
        nets.append(net.eval())
    return nets


def _tolerance(module: Any, window: list[int], in_channels: int) -> float:
    """ONNX check tolerance: 1e-3, relative to the logits' scale when they are larger than 10."""
    import torch

    with torch.no_grad():
        probe = module(torch.randn(1, in_channels, *window))
    return 1e-3 * max(1.0, float(probe.abs().max()) / 10.0)


def import_nnunet(
    model_folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    folds: Any = None,
    checkpoint: str = "checkpoint_final.pth",
) -> Path:
    """Import a trained nnU-Net v2 model folder into an atso-fast model package.

    Args:
        model_folder: ``.../DatasetXXX/TRAINER__PLANS__CONFIGURATION`` holding ``dataset.json``,
            ``plans.json`` and ``fold_K/<checkpoint>``.
        out_dir: the package folder to write (``model.onnx`` + ``model.json`` [+ ``model.pt2``]).
        folds: fold numbers (or ``"all"``) to ensemble; default every ``fold_K`` holding the
            checkpoint (``fold_all`` only when named), as ``nnUNetv2_predict``.
        checkpoint: file name inside each fold folder.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        PackageError: a missing/inconsistent file or an unsupported model, with the reason.
    """
    with _malformed(model_folder):
        model = read_model_folder(model_folder, folds, checkpoint)
        _refuse_unsupported(model)
        spec = _package_spec(model, checkpoint)
        module = _fold_mean(_fold_networks(model, spec["in_channels"], spec["num_classes"]))
    return export_model(module, out_dir, **spec, tolerance=_tolerance(module, spec["window"], spec["in_channels"]))


@contextmanager
def _malformed(folder: Any) -> Iterator[None]:
    """A plans.json or dataset.json of the wrong shape (a list for a mapping, a string for a
    number) becomes one PackageError naming the folder, not a traceback."""
    try:
        yield
    except PackageError:
        raise
    except (AttributeError, TypeError, KeyError, ValueError, IndexError) as exc:
        raise PackageError(
            f"{folder}: malformed plans.json or dataset.json ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def _package_spec(model: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """``export_model``'s arguments for an nnU-Net model read by :func:`read_model_folder`."""
    where, cfg, dataset, plans = model["folder"], model["configuration"], model["dataset"], model["plans"]
    names = _class_names(dataset, where)
    channels = _channels(dataset)
    window = cfg.get("patch_size")
    validate_meta(window, channels, len(names), "logits", None, f"{where / 'plans.json'}: patch_size")
    window = [int(p) for p in window]
    preprocessing = {
        "orientation": _READERS[plans.get("image_reader_writer", "SimpleITKIO")],
        "transpose": _transpose(plans, where / "plans.json"),
        "crop_to_nonzero": True,
        "resampling": _resampling(cfg, where / "plans.json"),
        "grid": "nnunet",
    }
    source = {
        "kind": "nnunetv2",
        "model_folder": str(where.resolve()),
        "configuration": model["configuration_name"],
        "folds": model["folds"],
        "checkpoint": checkpoint,
        "trainer": model["checkpoints"][0].get("trainer_name"),
        "plans_name": plans.get("plans_name"),
        "dataset_name": plans.get("dataset_name"),
        "labels": dataset["labels"],
    }
    return {
        "window": window,
        "num_classes": len(names),
        "kind": "logits",
        "normalization": _normalization(model, channels),
        "in_channels": channels,
        "spacing": [float(s) for s in cfg["spacing"]],
        "class_names": names,
        "preprocessing": preprocessing,
        "mirror_axes": _mirror_axes(model["checkpoints"][0], len(window)),
        "extra": {"source": source},
    }
