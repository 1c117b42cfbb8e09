"""A plain nnU-Net-style U-Net: conv-InstanceNorm-LeakyReLU blocks, strided-conv downsampling,
transposed-conv upsampling, skip concatenation. 2D or 3D.

Input ``(N, C_in, D, H, W)`` (3D) or ``(N, C_in, H, W)`` (2D); every spatial size must be a
multiple of :attr:`UNet.divisor` (``2 ** (depth - 1)``). Output logits ``(N, num_classes, ...)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet", "ConvBlock"]

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_UP = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class ConvBlock(nn.Sequential):
    """``convs`` x (3^d conv -> InstanceNorm(affine) -> LeakyReLU); the first conv has ``stride``."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        convs: int = 2,
        negative_slope: float = 0.01,
    ) -> None:
        layers: list[nn.Module] = []
        for i in range(convs):
            layers += [
                _CONV[spatial_dims](
                    in_channels if i == 0 else out_channels, out_channels, 3, stride=stride if i == 0 else 1, padding=1
                ),
                _NORM[spatial_dims](out_channels, affine=True, eps=1e-5),
                nn.LeakyReLU(negative_slope, inplace=True),
            ]
        super().__init__(*layers)


class UNet(nn.Module):
    """Plain U-Net.

    Args:
        in_channels: input channels (modalities) M.
        num_classes: output channels C (logits).
        spatial_dims: 2 or 3.
        base_channels: features at full resolution; doubled per stage, capped at ``max_channels``.
        depth: number of resolution stages (``depth - 1`` downsamplings), >= 1.
        max_channels: feature cap.
        convs_per_stage: convolutions per block.

    Raises:
        ValueError: any argument out of range.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        *,
        spatial_dims: int = 3,
        base_channels: int = 16,
        depth: int = 4,
        max_channels: int = 320,
        convs_per_stage: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("base_channels", base_channels),
            ("depth", depth),
            ("max_channels", max_channels),
            ("convs_per_stage", convs_per_stage),
        ):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.spatial_dims, self.depth = int(spatial_dims), int(depth)
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)
        widths = [min(int(base_channels) * 2**i, int(max_channels)) for i in range(self.depth)]
        self.encoder = nn.ModuleList(
            ConvBlock(
                spatial_dims,
                in_channels if i == 0 else widths[i - 1],
                widths[i],
                stride=1 if i == 0 else 2,
                convs=convs_per_stage,
            )
            for i in range(self.depth)
        )
        self.up = nn.ModuleList(
            _UP[spatial_dims](widths[i], widths[i - 1], 2, stride=2) for i in range(self.depth - 1, 0, -1)
        )
        self.decoder = nn.ModuleList(
            ConvBlock(spatial_dims, 2 * widths[i - 1], widths[i - 1], convs=convs_per_stage)
            for i in range(self.depth - 1, 0, -1)
        )
        self.head = _CONV[spatial_dims](widths[0], num_classes, 1)

    @property
    def divisor(self) -> int:
        """Every spatial input size must be a multiple of this."""
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, M, *spatial)`` -> logits ``(N, C, *spatial)``."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            self._check_input(x)
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        for up, block, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = block(torch.cat([up(x), skip], dim=1))
        return self.head(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects (N, {self.in_channels}, {self.spatial_dims} spatial dims), got shape {tuple(x.shape)}"
            )
        if any(s % self.divisor for s in x.shape[2:]):
            raise ValueError(f"UNet spatial sizes must be multiples of {self.divisor}, got {tuple(x.shape[2:])}")
