"""Synthetic nnU-Net v2 model folders: a small random U-Net with plans, dataset.json and fold
checkpoints laid out exactly as nnU-Net's trainer writes them, for tests, demos and benchmarks of
``atso_fast.import_nnunet`` side by side with ``nnUNetPredictor`` (no training, no downloads).

The network is nnU-Net's own ``PlainConvUNet`` (``dynamic_network_architectures``), randomly
initialised from a seed; its last layer is scaled so that the logits are well separated (a random
network's logits are otherwise near-ties everywhere, and agreement on labels would say little).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["make_nnunet_folder", "plans_for"]

_CONV = {2: "torch.nn.modules.conv.Conv2d", 3: "torch.nn.modules.conv.Conv3d"}
_NORM = {2: "torch.nn.modules.instancenorm.InstanceNorm2d", 3: "torch.nn.modules.instancenorm.InstanceNorm3d"}


def _architecture(patch: Sequence[int], features: Sequence[int]) -> dict[str, Any]:
    """PlainConvUNet kwargs: one stride-2 pooling per stage on axes still large enough (nnU-Net's
    planner keeps anisotropic axes unpooled, with 1-voxel kernels along them)."""
    dims = len(patch)
    size = list(patch)
    kernels, strides = (
        [[1 if (dims == 3 and a == 0 and patch[0] * 3 < max(patch)) else 3 for a in range(dims)]],
        [[1] * dims],
    )
    for _ in range(1, len(features)):
        stride = [2 if s % 2 == 0 and s >= 8 else 1 for s in size]
        size = [s // st for s, st in zip(size, stride)]
        strides.append(stride)
        kernels.append([3] * dims)
    n = len(features)
    return {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": n,
            "features_per_stage": list(features),
            "conv_op": _CONV[dims],
            "kernel_sizes": kernels,
            "strides": strides,
            "n_conv_per_stage": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1),
            "conv_bias": True,
            "norm_op": _NORM[dims],
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def plans_for(
    configuration: str,
    *,
    patch: Sequence[int],
    spacing: Sequence[float],
    normalization: str,
    use_mask: bool,
    intensity: dict[str, float],
    features: Sequence[int] = (8, 16, 32),
    transpose: Sequence[int] = (0, 1, 2),
) -> dict[str, Any]:
    """An nnU-Net ``plans.json`` dict with one configuration (nnU-Net 2.4+ layout)."""
    inverse = [list(transpose).index(i) for i in range(3)]
    config = {
        "data_identifier": f"nnUNetPlans_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(patch),
        "median_image_size_in_voxels": [64] * len(patch),
        "spacing": list(spacing),
        "normalization_schemes": [normalization],
        "use_mask_for_norm": [bool(use_mask)],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": _architecture(patch, features),
        "batch_dice": True,
    }
    return {
        "dataset_name": "Dataset999_Synthetic",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [float(s) for s in (list(spacing) + [1.0] * 3)[:3]],
        "original_median_shape_after_transp": [64, 64, 64],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose),
        "transpose_backward": inverse,
        "configurations": {configuration: config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {k: float(v) for k, v in intensity.items()}},
    }


def _network(plans: dict, configuration: str, num_classes: int, seed: int, scale: float) -> Any:
    import pydoc

    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    arch = plans["configurations"][configuration]["architecture"]
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])  # our own plans, written just above
    torch.manual_seed(seed)
    net = PlainConvUNet(input_channels=1, num_classes=num_classes, deep_supervision=False, **kwargs)
    with torch.no_grad():
        for layer in net.decoder.seg_layers:
            layer.weight.mul_(scale)
            layer.bias.mul_(scale)
    return net


def _checkpoint(
    net: Any, plans: dict, configuration: str, fold: int, dataset: dict, mirror_axes: Sequence[int] | None
) -> dict[str, Any]:
    """What ``nnUNetTrainer.save_checkpoint`` writes (optimizer state and log included)."""
    import torch

    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    # one step with zero gradients: the optimizer holds momentum buffers, the weights stay as drawn
    for param in net.parameters():
        param.grad = torch.zeros_like(param)
    opt.step()
    opt.zero_grad()
    log = {
        "mean_fg_dice": [np.float64(0.5)],
        "ema_fg_dice": [np.float64(0.5)],
        "dice_per_class_or_region": [[np.float64(0.5)]],
        "train_losses": [np.float32(-0.5)],
        "val_losses": [np.float32(-0.4)],
        "lrs": [0.01],
        "epoch_start_timestamps": [0.0],
        "epoch_end_timestamps": [1.0],
    }
    return {
        "network_weights": net.state_dict(),
        "optimizer_state": opt.state_dict(),
        "grad_scaler_state": None,
        "logging": log,
        "_best_ema": np.float64(0.5),
        "current_epoch": 1000,
        "init_args": {
            "plans": plans,
            "configuration": configuration,
            "fold": fold,
            "dataset_json": dataset,
            "device": torch.device("cpu"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": None if mirror_axes is None else tuple(mirror_axes),
    }


def make_nnunet_folder(
    root: str | Path,
    *,
    configuration: str = "3d_fullres",
    patch: Sequence[int] = (16, 48, 48),
    spacing: Sequence[float] = (8.0, 2.5, 2.5),
    num_classes: int = 3,
    folds: Sequence[int] = (0,),
    normalization: str = "CTNormalization",
    use_mask: bool = False,
    intensity: dict[str, float] | None = None,
    features: Sequence[int] = (8, 16, 32),
    scale: float = 20.0,
    seed: int = 0,
    mirror_axes: Sequence[int] | None = (0, 1, 2),
    transpose: Sequence[int] = (0, 1, 2),
    plans: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/Dataset999_Synthetic/nnUNetTrainer__nnUNetPlans__<configuration>`` and return it.

    Args:
        root: parent folder (nnU-Net's ``nnUNet_results``).
        configuration: ``"3d_fullres"``, ``"2d"``, ...; the patch's length sets 2D/3D.
        patch: patch size; spacing: target spacing (2 entries for 2D).
        num_classes: labels including background.
        folds: one random network per fold (different seeds).
        normalization: nnU-Net scheme name of the single channel; use_mask: ``use_mask_for_norm``.
        intensity: foreground intensity properties (mean, std, percentile_00_5, percentile_99_5,
            median, min, max); CT-like defaults.
        features: features per stage; scale: factor on the last layer's weights.
        mirror_axes: ``inference_allowed_mirroring_axes`` stored in the checkpoints.
        transpose: ``transpose_forward``.
        plans: a whole ``nnUNetPlans.json`` (nnU-Net's ExperimentPlanner's, say) to use instead
            of one made from the arguments above: its ``configuration`` sets the network, patch,
            spacing and preprocessing; ``num_classes``, ``folds``, ``scale``, ``seed`` and
            ``mirror_axes`` still apply.
    """
    import torch

    intensity = intensity or {
        "mean": 40.0,
        "std": 120.0,
        "percentile_00_5": -150.0,
        "percentile_99_5": 300.0,
        "median": 40.0,
        "min": -1000.0,
        "max": 1500.0,
    }
    folder = Path(root) / "Dataset999_Synthetic" / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    if plans is not None:
        normalization = plans["configurations"][configuration]["normalization_schemes"][0]
    labels = {"background": 0, **{f"class_{c}": c for c in range(1, num_classes)}}
    dataset = {
        "channel_names": {"0": "CT" if normalization == "CTNormalization" else "MR"},
        "labels": labels,
        "numTraining": 10,
        "file_ending": ".nii.gz",
    }
    plans = plans or plans_for(
        configuration,
        patch=patch,
        spacing=spacing,
        normalization=normalization,
        use_mask=use_mask,
        intensity=intensity,
        features=features,
        transpose=transpose,
    )
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    for i, fold in enumerate(folds):
        net = _network(plans, configuration, num_classes, seed + 1000 * i, scale)
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(
            _checkpoint(net, plans, configuration, fold, dataset, mirror_axes),
            folder / f"fold_{fold}" / "checkpoint_final.pth",
        )
    return folder
