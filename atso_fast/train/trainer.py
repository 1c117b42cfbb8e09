"""A slim segmentation training loop: batches from patch samplers, Dice + CE loss with an ignore
label, AdamW or SGD with a poly learning-rate schedule, AMP and channels-last on CUDA.

All randomness comes from the ``numpy.random.Generator`` passed in (patch positions, which source
a sample comes from, augmentation); the loop itself draws nothing from torch's global RNG.
Batches are ``x`` ``(B, M, *patch)`` float32 and ``y`` ``(B, *patch)`` int64 (hard labels) or
``(B, C, *patch)`` float32 (soft targets, e.g. a teacher's probabilities).

A consistency term (:class:`ConsistencyTerm`, e.g. :class:`atso_fast.train.mean_teacher.MeanTeacher`)
adds a loss on the unlabelled part of each batch; the supervised loss then covers only the first
``n_lab`` samples. Its noise comes from a torch generator reseeded every step from
``(noise seed, global step)``, so a run is reproducible and resumes mid-way with the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from atso_fast.train.augment import AugmentConfig, augment_sample
from atso_fast.train.data import Sampler
from atso_fast.train.losses import dice_ce_loss, soft_target_loss

__all__ = [
    "OptimConfig",
    "make_optimizer",
    "poly_lr",
    "MixedBatches",
    "ConsistencyTerm",
    "train_steps",
    "train_loader",
    "mean_loss",
]

BatchFn = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser settings.

    Attributes:
        optimizer: ``"adamw"`` or ``"sgd"`` (Nesterov, nnU-Net style).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        momentum: SGD momentum.
        schedule: ``"poly"`` (``lr * (1 - step / steps) ** poly_exponent``) or ``"constant"``.
        poly_exponent: exponent of the poly schedule.
        grad_clip: max gradient norm (0 disables).
    """

    optimizer: str = "adamw"
    weight_decay: float = 3e-5
    momentum: float = 0.99
    schedule: str = "poly"
    poly_exponent: float = 0.9
    grad_clip: float = 12.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("poly", "constant"):
            raise ValueError(f"schedule must be 'poly' or 'constant', got {self.schedule!r}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need weight_decay >= 0, grad_clip >= 0, momentum in [0, 1), got {self}")

    @classmethod
    def from_value(cls, value: OptimConfig | dict[str, Any] | None) -> OptimConfig:
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict) or not set(value) <= {f.name for f in fields(cls)}:
            raise ValueError(f"optim must be a dict of {[f.name for f in fields(cls)]}, got {value!r}")
        return cls(**value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_optimizer(params: Any, lr: float, config: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD over ``params`` at learning rate ``lr``."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=config.momentum, nesterov=config.momentum > 0, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)


def poly_lr(base_lr: float, step: int, total: int, exponent: float = 0.9) -> float:
    """nnU-Net's poly schedule: ``base_lr * (1 - step / total) ** exponent``."""
    if total < 1 or not 0 <= step <= total:
        raise ValueError(f"poly_lr needs 0 <= step <= total and total >= 1, got step={step}, total={total}")
    return base_lr * (1.0 - step / total) ** exponent


class MixedBatches:
    """Batches mixing a labelled source and an optional pseudo-labelled source.

    Each batch holds ``floor(B * r)`` labelled samples plus one more with probability equal to the
    fractional part of ``B * r`` (``r = labelled_ratio``); the rest come from ``pseudo``. Labelled
    samples come first; :attr:`last_labelled` holds their count in the batch drawn last.

    Args:
        labelled: sampler over labelled cases.
        pseudo: sampler over pseudo-labelled cases, or None (then every sample is labelled).
        batch_size: B.
        labelled_ratio: r in [0, 1].
        augment: augmentation applied to every sample, or None.
        labelled_only: keep only the labelled part of each batch (at least one sample), so that a
            supervised run sees as many labelled samples per step as a mixed run with the same r.
        soft_channels: C when the pseudo sampler's images carry C trailing channels of target
            probabilities; batches then hold soft targets ``y`` ``(B, C, *patch)`` float32 (labelled
            samples one-hot, ignored voxels all zero).

    Raises:
        ValueError: bad batch size, ratio or channel count.
    """

    def __init__(
        self,
        labelled: Sampler,
        pseudo: Sampler | None,
        batch_size: int,
        *,
        labelled_ratio: float = 0.5,
        augment: AugmentConfig | None = None,
        labelled_only: bool = False,
        soft_channels: int | None = None,
    ) -> None:
        if int(batch_size) < 1 or not 0.0 <= labelled_ratio <= 1.0:
            raise ValueError(f"need batch_size >= 1 and labelled_ratio in [0, 1], got {batch_size}, {labelled_ratio}")
        if soft_channels is not None and int(soft_channels) < 2:
            raise ValueError(f"soft_channels must be >= 2 classes or None, got {soft_channels}")
        self.labelled, self.pseudo, self.batch_size = labelled, pseudo, int(batch_size)
        self.labelled_only = bool(labelled_only)
        self.ratio = 1.0 if pseudo is None and not labelled_only else float(labelled_ratio)
        self.augment = augment
        self.soft_channels = None if soft_channels is None else int(soft_channels)
        self.last_labelled = 0

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``(x (B, M, *patch) float32, y (B, *patch) int64 or (B, C, *patch) float32)``."""
        want = self.batch_size * self.ratio
        n_lab = int(math.floor(want)) + int(rng.random() < want - math.floor(want))
        size = max(1, n_lab) if self.labelled_only else self.batch_size
        images, labels = [], []
        for i in range(size):
            source = self.labelled if i < n_lab or self.pseudo is None or self.labelled_only else self.pseudo
            image, label = source.sample(rng)
            if self.augment is not None:
                channels = image.shape[0] - self.soft_channels if source is self.pseudo and self.soft_channels else None
                image, label = augment_sample(image, label, rng, self.augment, channels=channels)
            images.append(image)
            labels.append(label)
        self.last_labelled = size if self.labelled_only or self.pseudo is None else n_lab
        if self.soft_channels is None:
            return np.stack(images), np.stack(labels).astype(np.int64)
        return self._soft(images, labels, self.last_labelled, self.soft_channels)

    def _soft(
        self, images: list[np.ndarray], labels: list[np.ndarray], n_lab: int, c: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Split the pseudo samples' ``c`` target channels off; one-hot targets for the labelled ones."""
        ignore = self.labelled.ignore_index
        xs, ys = [], []
        for i, (image, label) in enumerate(zip(images, labels)):
            if i < n_lab:
                target = (np.arange(c).reshape((c,) + (1,) * label.ndim) == label[None]).astype(np.float32)
                xs.append(image)
            else:
                target = np.array(image[-c:], dtype=np.float32)
                target[:, label == ignore] = 0.0  # thresholded or padded voxels count for nothing
                xs.append(image[:-c])
            ys.append(target)
        return np.ascontiguousarray(np.stack(xs)), np.stack(ys)


class ConsistencyTerm(Protocol):
    """What the training loop reads from a consistency term (e.g. Mean Teacher's EMA teacher).

    ``step`` is the step of the current call; ``step_offset + step`` the step of the whole run.
    """

    step_offset: int

    def to(self, device: str | torch.device, memory_format: torch.memory_format = ...) -> Any:
        """Move whatever model the term holds next to the student."""

    def weight(self, step: int) -> float:
        """The term's weight at ``step`` (reported)."""

    def loss(
        self, x: torch.Tensor, logits: torch.Tensor, n_lab: int, step: int, generator: torch.Generator
    ) -> torch.Tensor:
        """The weighted term of a batch whose first ``n_lab`` samples are labelled."""

    def update(self, student: nn.Module, step: int) -> None:
        """After the optimiser step."""

    def state_dict(self) -> dict[str, Any]:
        """Whatever resumes the term mid-run."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


def _noise_seed(seed: int, step: int) -> int:
    """The noise generator's seed at global step ``step``."""
    return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1, np.uint64)[0])


def _to_device(x: Any, y: Any, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(x) if isinstance(x, np.ndarray) else x
    y = torch.from_numpy(y) if isinstance(y, np.ndarray) else y
    xt = x.to(device, non_blocking=True)
    if channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last_3d if xt.dim() == 5 else torch.channels_last)
    return xt, y.to(device, non_blocking=True)


def train_steps(
    model: nn.Module,
    batches: BatchFn,
    *,
    steps: int,
    lr: float,
    rng: np.random.Generator,
    optim: OptimConfig | None = None,
    ignore_index: int = 255,
    device: str | torch.device = "cpu",
    amp: bool = True,
    channels_last: bool = True,
    on_step: Callable[[int, Any], None] | None = None,
    consistency: ConsistencyTerm | None = None,
) -> dict[str, float]:
    """Train ``model`` for ``steps`` steps with a fresh optimiser and its own lr schedule.

    AMP (fp16 autocast + grad scaling) and channels-last apply only on CUDA devices.

    Args:
        model: maps ``(B, M, *patch)`` to logits ``(B, C, *patch)``; moved to ``device``.
        batches: ``batches(rng) -> (x, y)`` numpy arrays.
        steps: optimiser steps (0 does nothing).
        lr: peak learning rate.
        rng: the only source of randomness.
        optim: optimiser and schedule settings.
        ignore_index: label left out of the loss.
        device: torch device.
        amp, channels_last: enable on CUDA.
        on_step: ``on_step(steps done, run)`` after every step (progress reports).
        consistency: a consistency term on the samples after ``batches.last_labelled`` (their
            labels are not used: the supervised loss covers the labelled samples only); it is
            updated after every optimiser step. Its noise seed is drawn once from ``rng`` before
            the first batch (only when given, so runs without it draw exactly as before).

    Returns:
        ``{"loss": mean loss, "first_loss"/"last_loss": mean of the first/last 10% of steps,
        "pseudo_loss", "pseudo_first_loss", "pseudo_last_loss": the same for the loss of the
        pseudo-labelled part of each batch alone (computed without gradient; NaN when ``batches``
        has no ``last_labelled`` or never holds pseudo-labelled samples, and always with
        ``consistency``), "steps", "lr"}``; with ``consistency`` also ``"consistency_loss"`` (mean
        weighted term) and ``"consistency_weight"`` (its weight at the last step).

    Raises:
        ValueError: negative steps or non-positive lr.
    """
    if int(steps) < 0 or not lr > 0:
        raise ValueError(f"train_steps needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    noise_seed = int(rng.integers(2**63)) if consistency is not None else 0
    run = _Run(model, lr, optim, device, amp, channels_last, consistency, noise_seed)
    for step in range(int(steps)):
        x, y = batches(rng)
        run.step(step, int(steps), x, y, getattr(batches, "last_labelled", len(x)), ignore_index)
        if on_step is not None:
            on_step(step + 1, run)
    return run.summary(int(steps))


class _Run:
    """The state of one training run: model on the device, a fresh optimiser, AMP scaler, losses."""

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        optim: OptimConfig | None,
        device: str | torch.device,
        amp: bool,
        channels_last: bool,
        consistency: ConsistencyTerm | None = None,
        noise_seed: int = 0,
    ) -> None:
        self.optim = optim or OptimConfig()
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.model, self.lr, self.amp, self.channels_last = model, float(lr), cuda and amp, cuda and channels_last
        model.to(self.device)
        memory_format = torch.preserve_format
        if self.channels_last:
            memory_format = torch.channels_last_3d if _spatial_dims(model) == 3 else torch.channels_last
            # Module.to(memory_format=...) is documented torch API; torch's overload stubs omit it
            model.to(memory_format=memory_format)  # type: ignore[call-overload]
        model.train()
        self.opt = make_optimizer(model.parameters(), lr, self.optim)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.losses: list[torch.Tensor] = []
        self.pseudo_losses: list[torch.Tensor] = []
        self.consistency, self.noise_seed = consistency, int(noise_seed)
        self.consistency_losses: list[torch.Tensor] = []
        self.consistency_weight = math.nan
        if consistency is not None:
            consistency.to(self.device, memory_format)
            self.generator = torch.Generator(device=self.device)

    def step(self, step: int, steps: int, x: Any, y: Any, n_lab: int, ignore_index: int) -> None:
        """One optimiser step on ``x``, ``y`` (numpy arrays or CPU tensors)."""
        optim, opt, model, consistency = self.optim, self.opt, self.model, self.consistency
        for group in opt.param_groups:
            group["lr"] = poly_lr(self.lr, step, steps, optim.poly_exponent) if optim.schedule == "poly" else self.lr
        x, y = _to_device(x, y, self.device, self.channels_last)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            logits = model(x)
            if consistency is None:
                loss = _loss(logits, y, ignore_index)
            else:
                loss = _loss(logits[:n_lab], y[:n_lab], ignore_index)
                loss = loss + self._consistency(consistency, x, logits, n_lab, step)
        if n_lab < len(x) and consistency is None:
            with torch.no_grad():  # a monitor: the pseudo-labelled part of the batch alone
                self.pseudo_losses.append(_loss(logits[n_lab:].detach(), y[n_lab:], ignore_index))
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if optim.grad_clip > 0:
            self.scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        self.scaler.step(opt)
        self.scaler.update()
        if consistency is not None:
            consistency.update(model, step)
        self.losses.append(loss.detach())

    def _consistency(
        self, term: ConsistencyTerm, x: torch.Tensor, logits: torch.Tensor, n_lab: int, step: int
    ) -> torch.Tensor:
        """The consistency term's value this step, noise reseeded from ``(noise seed, global step)``."""
        self.generator.manual_seed(_noise_seed(self.noise_seed, term.step_offset + step))
        value = term.loss(x, logits, n_lab, step, self.generator)
        self.consistency_losses.append(value.detach())
        self.consistency_weight = float(term.weight(step))
        return value

    def summary(self, steps: int) -> dict[str, float]:
        out = {
            **_loss_summary(self.losses, ""),
            **_loss_summary(self.pseudo_losses, "pseudo_"),
            "steps": int(steps),
            "lr": float(self.lr),
        }
        if self.consistency is not None:
            losses = self.consistency_losses
            out["consistency_loss"] = float(torch.stack(losses).float().mean()) if losses else math.nan
            out["consistency_weight"] = self.consistency_weight
        return out

    def state(self, step: int) -> dict[str, Any]:
        """What resumes this run after ``step`` steps: optimiser and scaler state, losses so far
        (and the consistency term's state and losses, when there is one)."""
        state = {
            "step": int(step),
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict(),
            "losses": [float(v) for v in self.losses],
            "pseudo_losses": [float(v) for v in self.pseudo_losses],
        }
        if self.consistency is not None:
            state["consistency"] = self.consistency.state_dict()
            state["consistency_losses"] = [float(v) for v in self.consistency_losses]
        return state

    def load(self, state: dict[str, Any]) -> int:
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.losses = [torch.tensor(v, dtype=torch.float32) for v in state["losses"]]
        self.pseudo_losses = [torch.tensor(v, dtype=torch.float32) for v in state["pseudo_losses"]]
        if self.consistency is not None:
            if "consistency" not in state:
                raise ValueError("resume state has no consistency term state, but a consistency term was given")
            self.consistency.load_state_dict(state["consistency"])
            self.consistency_losses = [torch.tensor(v, dtype=torch.float32) for v in state["consistency_losses"]]
        return int(state["step"])


def train_loader(
    model: nn.Module,
    loader: Iterable[tuple[Any, Any, int]],
    *,
    steps: int,
    lr: float,
    optim: OptimConfig | None = None,
    ignore_index: int = 255,
    device: str | torch.device = "cpu",
    amp: bool = True,
    channels_last: bool = True,
    resume: dict[str, Any] | None = None,
    on_step: Callable[[int, Any], None] | None = None,
    consistency: ConsistencyTerm | None = None,
    noise_seed: int = 0,
) -> dict[str, float]:
    """:func:`train_steps` fed by an iterable of ``(x, y, labelled count)`` batches (a
    ``DataLoader``), resumable mid-run.

    Args:
        loader: yields the batches of steps ``resume["step"]`` (0 without ``resume``) .. ``steps - 1``.
        resume: a state from ``run.state(step)`` (optimiser, scaler, losses, step).
        on_step: ``on_step(steps done, run)`` after every step; ``run.losses`` holds the step
            losses (tensors), ``run.state(step)`` builds the resume state (it copies the
            optimiser state: call it only when saving).
        consistency: as :func:`train_steps`; give it the same ``step_offset`` when resuming (the
            resume state restores its teacher).
        noise_seed: seeds the consistency term's noise (with the global step; >= 0): pass the
            same value to a resumed call.
        Others: as :func:`train_steps`.

    Returns:
        as :func:`train_steps`.

    Raises:
        ValueError: negative steps or noise seed, non-positive lr, a loader that ends early, or a
            resume state without the consistency term's state.
    """
    if int(steps) < 0 or not lr > 0:
        raise ValueError(f"train_loader needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    if int(noise_seed) < 0:
        raise ValueError(f"noise_seed must be >= 0, got {noise_seed}")
    run = _Run(model, lr, optim, device, amp, channels_last, consistency, noise_seed)
    step = run.load(resume) if resume is not None else 0
    for x, y, n_lab in loader:
        if step >= int(steps):
            break
        run.step(step, int(steps), x, y, int(n_lab), ignore_index)
        step += 1
        if on_step is not None:
            on_step(step, run)
    if step < int(steps):
        raise ValueError(f"the batch loader ended after {step} of {steps} steps")
    return run.summary(int(steps))


def _loss(logits: torch.Tensor, y: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Hard labels ``(B, *patch)`` -> Dice + CE with ignore label; soft ``(B, C, *patch)`` -> soft loss."""
    if y.dim() == logits.dim():
        return soft_target_loss(logits, y)
    return dice_ce_loss(logits, y, ignore_index=ignore_index)


def _loss_summary(losses: list[torch.Tensor], prefix: str) -> dict[str, float]:
    """Mean, mean of the first and of the last 10% of the steps (NaN when there were none)."""
    if not losses:
        return {f"{prefix}loss": math.nan, f"{prefix}first_loss": math.nan, f"{prefix}last_loss": math.nan}
    values = torch.stack(losses).float().cpu().numpy()
    n = max(1, len(values) // 10)
    return {
        f"{prefix}loss": float(values.mean()),
        f"{prefix}first_loss": float(values[:n].mean()),
        f"{prefix}last_loss": float(values[-n:].mean()),
    }


def _spatial_dims(model: nn.Module) -> int:
    """3 if the model holds any 3D convolution, else 2."""
    return 3 if any(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in model.modules()) else 2


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    ignore_index: int = 255,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
) -> float:
    """Mean Dice + CE loss of ``model`` over ``(image (M, *patch), label (*patch))`` pairs, no grad.

    Returns NaN when ``pairs`` is empty.
    """
    if not pairs:
        return math.nan
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            x = torch.from_numpy(np.stack([p[0] for p in chunk])).to(device)
            y = torch.from_numpy(np.stack([p[1] for p in chunk]).astype(np.int64)).to(device)
            total += float(dice_ce_loss(model(x), y, ignore_index=ignore_index)) * len(chunk)
    finally:
        model.train(was_training)
    return total / len(pairs)
