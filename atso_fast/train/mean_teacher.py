"""The Mean Teacher baseline (Tarvainen & Valpola 2017), as in SSL4MIS' ``train_mean_teacher_2D.py``.

A teacher holds an exponential moving average (EMA) of the student's weights. On the unlabelled
samples of a batch the student's softmax is pulled towards the teacher's softmax on the same
patch plus clamped Gaussian noise (mean squared error over every element); the labelled samples
carry the supervised loss. The consistency weight ramps up as ``exp(-5 (1 - t) ** 2)``.

Steps are counted globally: a run split into several calls (rounds) passes each call the steps
done before as ``step_offset`` and the steps of the whole run as ``total_steps``, so the EMA
warm-up and the ramp continue where the last call stopped. :func:`mean_teacher_batches` builds
batches whose unlabelled samples carry only the ignore label, so no true label of an unlabelled
case reaches the loss or the choice of patches.

Differences from SSL4MIS, on purpose: the ramp length is a fraction of the run (SSL4MIS ramps
over ``200 * 150`` iterations, its whole default run, in steps of 150), and the consistency term
is on from the first step (SSL4MIS leaves it out for the first 1000 iterations).

Shapes: ``x`` ``(B, M, *patch)``, logits ``(B, C, *patch)``; the first ``n_lab`` samples are labelled.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from atso_fast.train.augment import AugmentConfig
from atso_fast.train.data import PatchSampler, Sampler
from atso_fast.train.trainer import MixedBatches

__all__ = [
    "MeanTeacherConfig",
    "MeanTeacher",
    "sigmoid_rampup",
    "ema_alpha",
    "unlabelled_sampler",
    "mean_teacher_batches",
]


@dataclass(frozen=True)
class MeanTeacherConfig:
    """Mean Teacher settings (SSL4MIS defaults).

    Attributes:
        ema_decay: the EMA decay once warmed up (see :func:`ema_alpha`).
        consistency: the final weight of the consistency loss.
        rampup: fraction of the run's total steps over which the weight ramps up.
        noise: teacher input noise ``clamp(randn * noise, -2 noise, 2 noise)``.
    """

    ema_decay: float = 0.99
    consistency: float = 0.1
    rampup: float = 0.4
    noise: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        for name in ("consistency", "rampup", "noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")

    @classmethod
    def from_value(cls, value: MeanTeacherConfig | dict[str, Any] | None) -> MeanTeacherConfig:
        """``None`` -> defaults, a dict of known keys -> config, a config -> itself."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        names = [f.name for f in fields(cls)]
        if not isinstance(value, dict) or set(value) - set(names):
            raise ValueError(f"mean teacher settings must be a dict of {names}, got {value!r}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - t) ** 2)`` with ``t = clip(current / length, 0, 1)`` (Laine & Aila); 1 when
    ``length`` is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(float(current), 0.0), float(length)) / float(length)
    return float(math.exp(-5.0 * phase * phase))


def ema_alpha(global_step: int, decay: float) -> float:
    """``min(1 - 1 / (global_step + 1), decay)``: the true average of the weights seen so far
    until that exceeds ``decay`` (step 0 copies the student)."""
    return min(1.0 - 1.0 / (int(global_step) + 1), float(decay))


class MeanTeacher:
    """An EMA teacher and the consistency term it gives (pass to ``train_steps(consistency=...)``).

    The teacher stays in training mode, as in SSL4MIS (same forward as the student's: dropout
    active, batch norm on batch statistics; InstanceNorm without running statistics, as in
    :class:`~atso_fast.train.unet.UNet`, behaves the same in both modes). It never takes gradients.

    Args:
        student: the model being trained; the teacher starts as a copy of it.
        config: settings.
        total_steps: steps of the whole Mean Teacher run (sets the ramp length).
        teacher_state: teacher weights (``state_dict()["teacher"]``) to start from instead.
        step_offset: steps of the run done before this call.

    Raises:
        ValueError: negative ``total_steps`` or ``step_offset``.
    """

    def __init__(
        self,
        student: nn.Module,
        config: MeanTeacherConfig,
        *,
        total_steps: int,
        teacher_state: dict[str, torch.Tensor] | None = None,
        step_offset: int = 0,
    ) -> None:
        if int(total_steps) < 0 or int(step_offset) < 0:
            raise ValueError(f"need total_steps >= 0 and step_offset >= 0, got {total_steps}, {step_offset}")
        self.config = MeanTeacherConfig.from_value(config)
        self.total_steps, self.step_offset = int(total_steps), int(step_offset)
        self.steps_done = self.step_offset  # global steps whose EMA update is in the teacher
        self.teacher = copy.deepcopy(student)
        if teacher_state is not None:
            self.teacher.load_state_dict(teacher_state)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.teacher.train()

    @classmethod
    def from_state(cls, student: nn.Module, state: dict[str, Any]) -> MeanTeacher:
        """Continue a run in a new call: teacher, settings and step count from :meth:`state_dict`."""
        return cls(
            student,
            MeanTeacherConfig.from_value(state["config"]),
            total_steps=int(state["total_steps"]),
            teacher_state=state["teacher"],
            step_offset=int(state["step"]),
        )

    def to(self, device: str | torch.device, memory_format: torch.memory_format = torch.preserve_format) -> MeanTeacher:
        """Move the teacher (e.g. where the trainer put the student)."""
        self.teacher.to(device)
        if memory_format is not torch.preserve_format:
            # Module.to(memory_format=...) is documented torch API; torch's overload stubs omit it
            self.teacher.to(memory_format=memory_format)  # type: ignore[call-overload]
        return self

    def weight(self, step: int) -> float:
        """``consistency * sigmoid_rampup(step_offset + step, rampup * total_steps)``."""
        cfg = self.config
        return cfg.consistency * sigmoid_rampup(self.step_offset + step, cfg.rampup * self.total_steps)

    def loss(
        self, x: torch.Tensor, logits: torch.Tensor, n_lab: int, step: int, generator: torch.Generator
    ) -> torch.Tensor:
        """The weighted consistency term of one batch (0 when every sample is labelled).

        Args:
            x: the batch ``(B, M, *patch)`` the student saw.
            logits: the student's logits ``(B, C, *patch)``.
            n_lab: labelled samples, first in the batch.
            step: step of this call (the global step is ``step_offset + step``).
            generator: source of the teacher's input noise (moved to ``x``'s device if elsewhere).

        Returns:
            scalar: ``weight(step) * mean((softmax(student) - softmax(teacher)) ** 2)`` over the
            unlabelled samples.
        """
        weight = self.weight(step)
        if n_lab >= len(x) or weight == 0.0:
            return logits.new_zeros((), dtype=torch.float32)
        unlabelled = x[n_lab:]
        sigma = self.config.noise
        noise = torch.randn(unlabelled.shape, generator=generator, device=generator.device, dtype=unlabelled.dtype)
        noise = torch.clamp(noise.to(unlabelled.device) * sigma, -2 * sigma, 2 * sigma)
        with torch.no_grad():
            target = torch.softmax(self.teacher(unlabelled + noise).float(), dim=1)
        return weight * F.mse_loss(torch.softmax(logits[n_lab:].float(), dim=1), target)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """EMA of the parameters with :func:`ema_alpha` at global step ``step_offset + step``;
        buffers are copied from the student."""
        alpha = ema_alpha(self.step_offset + step, self.config.ema_decay)
        for t, s in zip(self.teacher.parameters(), student.parameters()):
            t.mul_(alpha).add_(s.detach(), alpha=1.0 - alpha)
        for tb, sb in zip(self.teacher.buffers(), student.buffers()):
            tb.copy_(sb)
        self.steps_done = self.step_offset + step + 1

    def state_dict(self) -> dict[str, Any]:
        """``{"teacher": weights (CPU tensors), "step": global steps done, "config", "total_steps"}``;
        plain types only (``torch.load(weights_only=True)`` reads it)."""
        return {
            "teacher": {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()},
            "step": int(self.steps_done),
            "config": self.config.to_dict(),
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore teacher weights and step count (a run resumed mid-call keeps its ``step_offset``)."""
        self.teacher.load_state_dict(state["teacher"])
        self.steps_done = int(state["step"])


def unlabelled_sampler(
    images: Sequence[np.ndarray], patch_size: Sequence[int], *, ignore_index: int = 255
) -> PatchSampler:
    """A :class:`PatchSampler` over unlabelled ``(M, Z, Y, X)`` images whose labels are all
    ``ignore_index`` (read-only views, no memory): patches are placed uniformly, never by a label."""
    labels = [np.broadcast_to(np.uint8(ignore_index), image.shape[1:]) for image in images]
    return PatchSampler(images, labels, patch_size, num_classes=1, foreground_oversample=0.0, ignore_index=ignore_index)


def mean_teacher_batches(
    labelled: Sampler,
    unlabelled_images: Sequence[np.ndarray],
    batch_size: int,
    *,
    labelled_ratio: float = 0.5,
    augment: AugmentConfig | None = None,
    pool: Sampler | None = None,
) -> MixedBatches:
    """:class:`MixedBatches` for Mean Teacher: labelled samples first (``last_labelled`` of them),
    then unlabelled ones whose labels are all ``labelled.ignore_index``; same patch size and
    augmentation for both.

    Args:
        pool: the sampler of the unlabelled samples (``sample(rng)``, labels all ignored), e.g.
            road-scene samples of whole frames; default uniform patches of ``unlabelled_images``
            (:func:`unlabelled_sampler`).

    Raises:
        ValueError: no unlabelled image, or bad batch size or ratio.
    """
    if not unlabelled_images:
        raise ValueError("mean_teacher_batches needs at least one unlabelled image, got none")
    if pool is None:
        patch = labelled.patch[1:] if labelled.flat else labelled.patch
        pool = unlabelled_sampler(unlabelled_images, patch, ignore_index=labelled.ignore_index)
    return MixedBatches(labelled, pool, batch_size, labelled_ratio=labelled_ratio, augment=augment)
