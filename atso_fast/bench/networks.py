"""The built-in benchmark network (seeded MONAI U-Net or a small conv-net) and its export as a
model package; shared by ``atso-fast bench`` and ``benchmarks/``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from atso_fast.package import export_model

__all__ = ["CT_NORMALIZATION", "default_window", "builtin_network", "check_builtin_window", "export_builtin"]

CT_NORMALIZATION = {"scheme": "ct", "clip": [-1000.0, 1000.0], "mean": 0.0, "std": 500.0}
"""Intensity policy stored with the built-in model (HU in, roughly unit scale out)."""


def default_window(device: str) -> tuple[int, int, int]:
    """The built-in model's window: 64^3 on CPU, 96^3 on CUDA (the design sketch's anchor)."""
    return (96, 96, 96) if device.startswith("cuda") else (64, 64, 64)


def builtin_network(classes: int, *, net: str = "auto", seed: int = 0) -> tuple[Any, str]:
    """The benchmark network with seeded weights, in eval mode, and its name.

    Args:
        classes: output channels.
        net: ``"unet"`` (MONAI ``UNet`` 16-32-64-128-256, two residual units), ``"convnet"``
            (three plain 3D convolutions) or ``"auto"`` (the U-Net when MONAI is importable).
        seed: ``torch.manual_seed`` before construction, so every process builds equal weights.

    Raises:
        ValueError: unknown ``net`` or ``classes < 1``; ImportError for ``"unet"`` without MONAI.
    """
    import torch

    if net not in ("auto", "unet", "convnet"):
        raise ValueError(f"net must be 'auto', 'unet' or 'convnet', got {net!r}")
    if int(classes) < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    if net == "auto":
        net = "unet" if _monai_available() else "convnet"
    torch.manual_seed(seed)
    if net == "unet":
        from monai.networks.nets import UNet

        unet = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=int(classes),
            channels=(16, 32, 64, 128, 256),
            strides=(2, 2, 2, 2),
            num_res_units=2,
        )
        return unet.eval(), "monai-unet"
    conv = torch.nn.Conv3d
    module = torch.nn.Sequential(
        conv(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        conv(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        conv(16, int(classes), 1),
    )
    return module.eval(), "convnet"


def _monai_available() -> bool:
    try:
        import monai.networks.nets  # noqa: F401
    except ImportError:
        return False
    return True


def check_builtin_window(window: tuple[int, ...], net_name: str) -> None:
    """The U-Net halves the window four times and instance-normalises the bottleneck."""
    if net_name in ("unet", "monai-unet") and any(w % 16 or w < 32 for w in window):
        raise ValueError(
            f"the built-in U-Net needs window sizes that are multiples of 16 and >= 32, got {tuple(window)}"
        )


def export_builtin(
    out_dir: str | os.PathLike, *, window: tuple[int, int, int], classes: int, net: str = "auto", seed: int = 0
) -> tuple[Path, str]:
    """Export :func:`builtin_network` as a model package (CT normalisation); returns (dir, name)."""

    module, name = builtin_network(classes, net=net, seed=seed)
    check_builtin_window(window, name)
    path = export_model(module, out_dir, window=window, num_classes=int(classes), normalization=CT_NORMALIZATION)
    return Path(path), name
