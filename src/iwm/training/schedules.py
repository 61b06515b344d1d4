"""Learning-rate, weight-decay and EMA-momentum schedules as pure functions of the step.

Every value here is computed from the global optimisation step alone, never from state
accumulated by earlier calls. Resuming at step N therefore gives exactly the value an
uninterrupted run would have had, without replaying N scheduler steps (the official
I-JEPA code keeps stateful schedulers and replays them on resume).

Step convention: ``step`` is the 0-based index of the optimisation step about to be
taken. Step 0 gets the start value; ``total_steps`` (one past the last update) gets the
final value; steps beyond it stay at the final value, so a run that overshoots by a
partial epoch does not wrap around the cosine.

Differences from the official I-JEPA recipe, on purpose: the official code stretches
the cosine and EMA schedules by a factor 1.25 (``ipe_scale``), so the lr never reaches
``final_lr`` and the EMA momentum never reaches 1.0. Here they reach their end values
exactly at ``total_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from iwm.config import OptimConfig


def _progress(step: float, total_steps: float) -> float:
    """Fraction of ``total_steps`` done, clamped to [0, 1]."""
    if total_steps <= 0:
        # A zero-length schedule is already at its end value.
        return 1.0
    return min(max(step / total_steps, 0.0), 1.0)


def linear(step: float, total_steps: float, start: float, end: float) -> float:
    """``start`` at step 0, straight line to ``end`` at ``total_steps``, then ``end``."""
    t = _progress(step, total_steps)
    return start + (end - start) * t


def cosine(step: float, total_steps: float, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (``total_steps`` and beyond).

    Works in either direction: I-JEPA uses it to increase the weight decay 0.04 → 0.4.
    """
    t = _progress(step, total_steps)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(
    step: float,
    total_steps: float,
    warmup_steps: float,
    start: float,
    peak: float,
    final: float,
) -> float:
    """Linear warmup ``start`` → ``peak`` over ``warmup_steps``, then cosine to ``final``.

    The value is ``start`` at step 0, ``peak`` at step ``warmup_steps`` and ``final`` at
    ``total_steps`` and beyond. With ``warmup_steps == 0`` it is a plain cosine from
    ``peak`` (``start`` is unused). If ``warmup_steps >= total_steps`` the warmup is
    still completed and the value drops straight to ``final`` afterwards, rather than
    silently shortening the warmup.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps}: must be >= 0")
    if step < warmup_steps:
        return linear(step, warmup_steps, start, peak)
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return peak if step <= warmup_steps else final
    return cosine(step - warmup_steps, decay_steps, peak, final)


@dataclass(frozen=True)
class Schedules:
    """The three I-JEPA schedules of one run, for a known number of steps.

    - lr: linear warmup ``optim.start_lr`` → ``optim.lr``, cosine to ``optim.final_lr``;
    - weight decay: cosine ``optim.weight_decay`` → ``optim.final_weight_decay``;
    - EMA momentum: linear ``optim.ema[0]`` → ``optim.ema[1]``.
    """

    optim: OptimConfig
    total_steps: int
    warmup_steps: int

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps={self.total_steps}: must be at least 1")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}: must be >= 0")

    @classmethod
    def for_run(cls, optim: OptimConfig, epochs: float, steps_per_epoch: int) -> Schedules:
        """Convert the epoch-based config (``train.epochs``, ``optim.warmup_epochs``) to steps.

        Totals are rounded up so a fractional final epoch still gets its steps; the warmup
        is rounded to the nearest step and capped at the total.
        """
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch={steps_per_epoch}: must be at least 1")
        total = max(1, math.ceil(epochs * steps_per_epoch))
        warmup = min(total, max(0, round(optim.warmup_epochs * steps_per_epoch)))
        return cls(optim=optim, total_steps=total, warmup_steps=warmup)

    def lr(self, step: int) -> float:
        o = self.optim
        return warmup_cosine(step, self.total_steps, self.warmup_steps,
                             o.start_lr, o.lr, o.final_lr)

    def weight_decay(self, step: int) -> float:
        o = self.optim
        return cosine(step, self.total_steps, o.weight_decay, o.final_weight_decay)

    def ema_momentum(self, step: int) -> float:
        start, end = self.optim.ema
        return linear(step, self.total_steps, start, end)
