"""A 2D U-Net on a ResNet-18/34 encoder, in plain torch, with torchvision's parameter names.

Every published driving-scene result starts from an ImageNet-pretrained encoder. torchvision is
not needed (it does not import beside every torch build): :class:`ResNetEncoder` is torchvision's
``resnet18``/``resnet34`` trunk with the same module names (``conv1``, ``bn1``, ``layer1`` ..
``layer4``, blocks ``layerK.N.conv1/bn1/conv2/bn2/downsample.0/downsample.1``), so a
``resnet18-*.pth`` state_dict the user has on disk loads as it is (:func:`load_encoder`; its
``fc.*`` classifier is dropped). Nothing is downloaded; weights are read with
``torch.load(weights_only=True)`` (no pickled code runs).

The decoder is the U-Net of segmentation_models_pytorch's ``Unet``: five blocks, each
upsample x2 (nearest) -> concatenate the encoder feature of that resolution -> two 3x3
conv-BN-ReLU; then a 3x3 conv to the class logits at full resolution.

Shapes: input ``(N, in_channels, H, W)``, ``H`` and ``W`` multiples of 32 (:attr:`divisor`; a
training crop and the relabel window are chosen so); output ``(N, num_classes, H, W)`` logits.
Inputs are expected normalised as the encoder was trained (ImageNet:
``atso_fast.package.normalize.IMAGENET_RGB``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["BLOCKS", "BasicBlock", "ResNetEncoder", "ResNetUNet", "load_encoder", "resnet_unet_options", "MODEL_KEYS"]

MODEL_KEYS = ("name", "layers", "encoder_weights", "decoder_channels")
"""The keys of a training config's ``model`` dict that picks this network (``name: resnet_unet``)."""

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
"""Basic blocks per stage of ResNet-18 and ResNet-34."""
_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: two 3x3 conv-BN, identity (or 1x1 conv-BN ``downsample``) added."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNetEncoder(nn.Module):
    """ResNet-18/34 trunk (no pooling head); :meth:`forward` returns the five feature maps at
    strides 2, 4, 8, 16, 32 (64, 64, 128, 256, 512 channels)."""

    # registered by name in __init__ (torchvision's names, so its weights load); declared for the type checker
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, depth: int = 18, in_channels: int = 3) -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"depth must be one of {sorted(BLOCKS)}, got {depth!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
        self.depth, self.in_channels = depth, in_channels
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for k, (blocks, planes) in enumerate(zip(BLOCKS[depth], _WIDTHS), start=1):
            stage = [BasicBlock(inplanes, planes, stride=1 if k == 1 else 2)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{k}", nn.Sequential(*stage))
            inplanes = planes
        self.channels = (64, *_WIDTHS)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(stem))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        return [stem, f1, f2, f3, self.layer4(f3)]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(cin + skip, cout)
        self.conv2 = _conv_bn_relu(cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class ResNetUNet(nn.Module):
    """U-Net decoder on a :class:`ResNetEncoder` (see the module docstring).

    Args:
        num_classes: output logits C.
        in_channels: input channels (3 for RGB; a pretrained encoder needs 3).
        depth: 18 or 34.
        decoder_channels: the five decoder blocks' widths, coarse to fine.

    Raises:
        ValueError: an argument out of range.
    """

    divisor = 32

    def __init__(
        self,
        num_classes: int,
        *,
        in_channels: int = 3,
        depth: int = 18,
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if len(decoder_channels) != 5 or min(decoder_channels) < 1:
            raise ValueError(f"decoder_channels must be 5 positive widths, got {decoder_channels!r}")
        self.encoder = ResNetEncoder(depth, in_channels)
        skips = (*self.encoder.channels[:4][::-1], 0)  # 256, 128, 64, 64, none
        cins = (self.encoder.channels[4], *decoder_channels[:4])
        self.decoder = nn.ModuleList(
            _DecoderBlock(cin, skip, cout) for cin, skip, cout in zip(cins, skips, decoder_channels)
        )
        self.head = nn.Conv2d(decoder_channels[-1], num_classes, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(f"input height and width must be multiples of {self.divisor}, got {tuple(x.shape[-2:])}")
        features = self.encoder(x)
        skips = [*features[:4][::-1], None]
        y = features[4]
        for block, skip in zip(self.decoder, skips):
            y = block(y, skip)
        return self.head(y)


def load_encoder(encoder: ResNetEncoder, path: str | os.PathLike[str]) -> ResNetEncoder:
    """Load a torchvision-layout ResNet state_dict from ``path`` into ``encoder`` (in place).

    Read with ``torch.load(map_location="cpu", weights_only=True)``; a ``module.`` prefix
    (DataParallel) is stripped and the ``fc.*`` classifier dropped; every other key must match
    the encoder's, name and shape.

    Returns:
        ``encoder``.

    Raises:
        ValueError: the file holds no state_dict, or keys are missing, unexpected or of another
            shape (naming up to three of each, and the file).
    """
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # an unpickling refusal, a truncated file, not a torch file
        raise ValueError(f"{path}: not a loadable torch state_dict ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict (name -> tensor), got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} (encoder: {tuple(own[k].shape)})"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    problems = [
        f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes))
        if keys
    ]
    if problems:
        raise ValueError(
            f"{path}: not a ResNet-{encoder.depth} state_dict with {encoder.in_channels} input "
            f"channel(s) in torchvision's layout; {'; '.join(problems)}"
        )
    encoder.load_state_dict(state, strict=True)
    return encoder


def resnet_unet_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The network a config's ``model`` dict names (``{"name": "resnet_unet", "layers": 18 | 34,
    "encoder_weights": PATH | None, "decoder_channels": [5 widths]}``; ``layers`` default 18) as
    ``{"depth", "decoder_channels", "encoder_weights"}`` (the file is not read here).

    Raises:
        ValueError: an unknown key, or a value out of range.
    """
    unknown = sorted(set(spec) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"model 'resnet_unet' takes the keys {list(MODEL_KEYS)}, got unknown {unknown}")
    depth = spec.get("layers", 18)
    if isinstance(depth, bool) or depth not in BLOCKS:
        raise ValueError(f"model 'resnet_unet' layers must be one of {sorted(BLOCKS)}, got {depth!r}")
    weights = spec.get("encoder_weights")
    if weights is not None and (not isinstance(weights, (str, os.PathLike)) or not os.fspath(weights)):
        raise ValueError(f"model 'resnet_unet' encoder_weights must be a file path or null, got {weights!r}")
    widths = spec.get("decoder_channels", (256, 128, 64, 32, 16))
    if (
        not isinstance(widths, (list, tuple))
        or len(widths) != 5
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths)
    ):
        raise ValueError(f"model 'resnet_unet' decoder_channels must be 5 positive ints, got {widths!r}")
    return {
        "depth": int(depth),
        "decoder_channels": tuple(widths),
        "encoder_weights": None if weights is None else os.fspath(weights),
    }
