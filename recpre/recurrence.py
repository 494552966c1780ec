"""How deep the recurrent core runs in training: the depth sampler, the recurrence policy and its curriculum.

`ModelConfig` describes the function the weights compute and carries a shape's *default* recurrence
(`mean_recurrence`, `mean_backprop_depth`, `sampling_scheme`, `lockstep`), as Huginn's config does. What a run
actually samples is its `train.recurrence` section, resolved here into a `RecurrencePolicy`: each null key
takes the shape's default, and a curriculum may ramp the mean depth and the backprop depth over the first
steps (docs/recurrence.md).

Depth draws are pure functions of (seed, optimizer step, global micro-batch index), never of the rank or of
how the batch is split over ranks: with `lockstep` one depth serves every micro-batch of an optimizer step;
without it each global micro-batch draws its own. So N ranks train what one process trains at the same global
batch and micro-batch size, and a resumed run draws the depths it would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

DEPTH_SIGMA = 0.5  # sigma of the log-normal in poisson-lognormal-filling
SAMPLING_SCHEMES = ("poisson-lognormal-filling", "poisson-fill", "fixed", "non-recurrent")
CURRICULA = ("constant", "linear", "sqrt")
STATE_NOISE = ("per-batch", "rank-replicated")
_DEPTH_KEY = 0x6465707468  # "depth": separates the sampler's stream from other seeded streams


@dataclass(frozen=True)
class DepthSpec:
    """What one draw needs; `ModelConfig` has the same attribute names, so a shape is a spec too."""

    mean_recurrence: float
    mean_backprop_depth: int
    sampling_scheme: str = "poisson-lognormal-filling"
    lockstep: bool = True


def sample_depth(spec: Any, step: int, stream: int = 0, seed: int = 0) -> tuple[int, int]:
    """(n no-grad iterations, k grad iterations): a pure function of (seed, step, stream).

    `spec` is a `DepthSpec` or a `ModelConfig`. With `spec.lockstep` the stream is ignored: every micro-batch
    of the step runs the same depth. Schemes (s = backprop depth, t = mean - s): poisson-lognormal-filling
    r = Poisson(LogNormal(ln(t+s) - sigma^2/2, sigma)) + 1, n = max(r-s, 0), k = min(s, r) (E[r] = t+s+1);
    poisson-fill n = Poisson(t), k = s; fixed (round(t), s); non-recurrent (0, 1).
    """
    s = int(spec.mean_backprop_depth)
    t = max(float(spec.mean_recurrence) - s, 0.0)
    if spec.sampling_scheme == "fixed":
        return round(t), min(s, round(float(spec.mean_recurrence)))
    if spec.sampling_scheme == "non-recurrent":
        return 0, 1
    if min(seed, step, stream) < 0:
        raise ValueError(f"sample_depth needs non-negative seed, step and stream, got {(seed, step, stream)}")
    rng = np.random.default_rng([seed, step, 0 if spec.lockstep else stream, _DEPTH_KEY])
    if spec.sampling_scheme == "poisson-fill":
        return int(rng.poisson(t)), s
    mu = math.log(t + s) - DEPTH_SIGMA**2 / 2
    r = int(rng.poisson(rng.lognormal(mu, DEPTH_SIGMA))) + 1
    return max(r - s, 0), min(s, r)


def ramp_fraction(name: str, step: int, steps: int) -> float:
    """How far a curriculum has come at `step`: 0 at the start, 1 from `steps` on.

    linear: t/N; sqrt: 1 - sqrt(1 - t/N) (slow at first, as in the retrofitting-recurrence work).
    """
    if name == "constant" or steps <= 0 or step >= steps:
        return 1.0
    x = max(step, 0) / steps
    return x if name == "linear" else 1.0 - math.sqrt(1.0 - x)


@dataclass(frozen=True)
class RecurrencePolicy:
    """The depths a run trains at: targets (mean, backprop depth), scheme, lockstep and a curriculum."""

    mean: int
    backprop_depth: int
    sampling: str
    lockstep: bool
    curriculum: str = "constant"
    curriculum_steps: int = 0
    start_mean: int | None = None
    start_backprop_depth: int | None = None
    state_noise: str = "per-batch"

    @classmethod
    def from_settings(cls, recurrence: Any, config: Any) -> RecurrencePolicy | None:
        """The policy of `train.recurrence` over the shape `config`; None for a model without recurrence."""
        if not getattr(config, "is_recurrent", False):
            return None

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        cur = recurrence.curriculum
        return cls(
            mean=int(pick(recurrence.mean, config.mean_recurrence)),
            backprop_depth=int(pick(recurrence.backprop_depth, config.mean_backprop_depth)),
            sampling=str(pick(recurrence.sampling, config.sampling_scheme)),
            lockstep=bool(pick(recurrence.lockstep, config.lockstep)),
            curriculum=str(cur.name),
            curriculum_steps=int(cur.steps),
            start_mean=cur.start_mean,
            start_backprop_depth=cur.start_backprop_depth,
            state_noise=str(recurrence.state_noise),
        )

    def spec_at(self, step: int) -> DepthSpec:
        """The sampler's targets at optimizer step `step` (0-based): the curriculum's point on its ramp."""
        f = ramp_fraction(self.curriculum, step, self.curriculum_steps)
        m0 = self.mean if self.start_mean is None else self.start_mean
        k0 = self.backprop_depth if self.start_backprop_depth is None else self.start_backprop_depth
        mean = m0 + (self.mean - m0) * f
        backprop = max(1, round(k0 + (self.backprop_depth - k0) * f))
        return DepthSpec(mean, backprop, self.sampling, self.lockstep)

    def depth(self, step: int, micro_batch: int, seed: int) -> tuple[int, int]:
        """(n, k) for global micro-batch `micro_batch` of optimizer step `step`."""
        return sample_depth(self.spec_at(step), step, micro_batch, seed)

    def backprop_depths(self, total_steps: int) -> list[int]:
        """Every backprop depth the run will use (on XLA each is one compiled graph)."""
        if self.curriculum == "constant":
            return [self.spec_at(0).mean_backprop_depth]
        last = min(total_steps, self.curriculum_steps + 1)
        return sorted({self.spec_at(s).mean_backprop_depth for s in range(max(last, 1))})


def noise_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for the initial-state noise of one micro-batch, from the run seed and its keys."""
    state = np.random.SeedSequence([seed, *keys, 0x6E6F697365]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
