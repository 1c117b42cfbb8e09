"""The synthetic nnU-Net folders' network is the one nnU-Net's own planner would configure.

``bench_nnunet.py`` sizes its "realistic" 105-class network with ``plans_for``: for an isotropic
target spacing, the kernel sizes and strides it writes must be those nnU-Net's default
``ExperimentPlanner`` derives for the same patch (``get_pool_and_conv_props``, feature maps no
smaller than 4), and the planner's features per stage (32 doubling up to 320) go through unchanged.
"""

from __future__ import annotations

import pytest

pytest.importorskip("nnunetv2")

from nnunetv2.experiment_planning.experiment_planners.network_topology import (
    get_pool_and_conv_props,
)

from atso_fast.datasets.nnunet_folder import plans_for

INTENSITY = {"mean": 0.0, "std": 1.0, "percentile_00_5": -1.0, "percentile_99_5": 1.0}


@pytest.mark.parametrize("patch", [(96, 128, 128), (128, 128, 128), (112, 160, 128), (64, 64, 64)])
def test_isotropic_architecture_matches_nnunet_planner(patch):
    spacing = (1.5, 1.5, 1.5)
    _, strides, kernels, planned_patch, _ = get_pool_and_conv_props(spacing, patch, 4, 999999)
    assert tuple(planned_patch) == patch  # the patch is one the planner can return as it is
    features = [min(320, 32 * 2**i) for i in range(len(strides))]
    arch = plans_for(
        "3d_fullres",
        patch=patch,
        spacing=spacing,
        normalization="CTNormalization",
        use_mask=False,
        intensity=INTENSITY,
        features=features,
    )["configurations"]["3d_fullres"]["architecture"]
    kw = arch["arch_kwargs"]
    assert [list(s) for s in kw["strides"]] == [list(s) for s in strides]
    assert [list(k) for k in kw["kernel_sizes"]] == [list(k) for k in kernels]
    assert kw["features_per_stage"] == features
    assert kw["n_conv_per_stage"] == [2] * len(strides)
    assert kw["n_conv_per_stage_decoder"] == [2] * (len(strides) - 1)
    assert arch["network_class_name"].endswith("PlainConvUNet")
