"""Training: a slim U-Net trainer and ATSO (with its baselines), one round engine over a data
store in memory (:class:`ArrayStore`) or on disk (:class:`CacheStore`); driving scenes (the
Cityscapes data form, :class:`ResNetUNet`, road-scene augmentation :class:`ScenePatches`, IoU)
in memory."""

from __future__ import annotations

from atso_fast.train.atso import (
    ATSO,
    METHODS,
    ArchiveATSO,
    ATSOConfig,
    build_model,
    default_relabel_fn,
    load_data,
    plan_round,
    run_methods,
    split_balanced,
)
from atso_fast.train.augment import AugmentConfig, augment_sample
from atso_fast.train.data import (
    Case,
    PatchCase,
    PatchSampler,
    SemiSupervisedData,
    data_from_arrays,
    load_raw,
)
from atso_fast.train.disk_store import CacheStore
from atso_fast.train.iou import IoUMeter
from atso_fast.train.losses import dice_ce_loss, dice_per_class, soft_dice_loss
from atso_fast.train.resnet_unet import ResNetUNet
from atso_fast.train.scene_augment import SceneAugmentConfig, ScenePatches
from atso_fast.train.scene_data import scene_cases
from atso_fast.train.stores import ArrayStore, DataStore
from atso_fast.train.trainer import MixedBatches, OptimConfig, train_steps
from atso_fast.train.unet import UNet

__all__ = [
    "ATSO",
    "ArchiveATSO",
    "ATSOConfig",
    "DataStore",
    "ArrayStore",
    "CacheStore",
    "METHODS",
    "build_model",
    "default_relabel_fn",
    "load_data",
    "plan_round",
    "run_methods",
    "split_balanced",
    "AugmentConfig",
    "augment_sample",
    "Case",
    "PatchCase",
    "PatchSampler",
    "SemiSupervisedData",
    "data_from_arrays",
    "load_raw",
    "dice_ce_loss",
    "dice_per_class",
    "soft_dice_loss",
    "MixedBatches",
    "OptimConfig",
    "train_steps",
    "UNet",
    "IoUMeter",
    "ResNetUNet",
    "SceneAugmentConfig",
    "ScenePatches",
    "scene_cases",
]
