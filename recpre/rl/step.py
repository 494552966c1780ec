"""One GRPO step: sample a rollout for each of this rank's prompt micro-batches, score it, then take
`rl.updates_per_rollout` optimizer steps of the clipped objective over it (recpre/rl/objective.py).

The step function has `train_step`'s signature and metrics, so the driver's loop runs it unchanged; a step
counts one rollout (its optimizer updates are inside it), so checkpoints fall between rollouts and hold no
rollout buffer. For a recurrent model the rollout's depth (n + k iterations while decoding) is recorded and
every forward of the update runs (n, k) from the same initial-state noise (the micro-batch's key, as in
pretraining). The old log-probabilities come from a training-style forward over the finished rollout, not
from the decoder (which differs by ~1e-6), so the ratio is exactly 1 before the first update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from recpre.flops import training_flops_per_token
from recpre.rl.objective import clipped_token_loss, group_advantages, token_log_probs
from recpre.rl.prompts import PromptBatch
from recpre.rl.rewards import RewardFn
from recpre.rl.rollout import Rollout, RolloutRng, collect_rollout
from recpre.train_state import TrainState


@dataclass
class ScoredRollout:
    rollout: Rollout
    advantages: Tensor  # [N]
    old_log_probs: Tensor | None  # [N, L]; None with one update per rollout (its own detached forward)
    ref_log_probs: Tensor | None  # [N, L]; None without a KL term
    noise_key: int


@dataclass
class GrpoObjective:
    """What GRPO adds to the trainer: the reference model, the reward, the tokenizer and the rollout RNG."""

    rl: Any  # settings.rl
    reference: torch.nn.Module | None  # the frozen initial weights (None when kl_coef is 0)
    reward_fn: RewardFn
    tokenizer: Any
    rng: RolloutRng
    depth_value: int | None = None  # rl.depth fixed: total iterations (None = the shape's mean)
    last_rollouts: list[Rollout] = field(default_factory=list)  # for tests and benchmarks

    def rollout_depth(self, trainer: Any, step: int, g: int) -> tuple[int, int] | None:
        """(n, k) of a rollout: fixed at depth_value, or sampled as training samples it."""
        if trainer.recurrence is None:
            return None
        if self.rl.depth == "sampled":
            return trainer.recurrence.depth(step, g, trainer.seed)
        total = self.depth_value or trainer.recurrence.mean
        k = min(trainer.recurrence.spec_at(step).mean_backprop_depth, total)
        return total - k, k

    def log_probs(self, trainer: Any, model: torch.nn.Module, r: Rollout, noise_key: int) -> Tensor:
        """Per-token log-probabilities [N, L] of the rollout's targets: a training-style forward at its depth."""
        fabric = trainer.fabric
        trainer.backend.seed_noise(noise_key)
        with fabric.autocast():
            logits = model(r.inputs.to(fabric.device), num_steps=r.depth).logits
        vocab = trainer.config.vocab_size
        return token_log_probs(logits, r.targets.to(fabric.device), vocab_size=vocab, temperature=self.rl.temperature)

    def score(self, trainer: Any, state: TrainState, batch: PromptBatch, i: int) -> ScoredRollout:
        model = trainer.fabric.unwrap(trainer.model)
        depth = self.rollout_depth(trainer, state.step, batch.index)
        r = collect_rollout(
            model, batch, depth=depth, seed=self.rng.next_seed(), rl=self.rl, tokenizer=self.tokenizer,
            reward_fn=self.reward_fn,
        )  # fmt: skip
        self.last_rollouts.append(r)
        key = trainer.noise_key(state.step, batch.index, i)
        adv = group_advantages(r.rewards, self.rl.group_size, scale_rewards=self.rl.scale_rewards)
        with torch.no_grad():
            # One update: the update's own forward (detached) is the old policy, bit for bit; no extra forward.
            old = self.log_probs(trainer, model, r, key) if self.rl.updates_per_rollout > 1 else None
            ref = self.log_probs(trainer, self.reference, r, key) if self.reference is not None else None
        return ScoredRollout(r, adv.to(trainer.fabric.device), old, ref, key)

    def update(self, trainer: Any, scored: list[ScoredRollout], normalizer: float) -> dict[str, Any]:
        """One optimizer step of the clipped objective over every scored rollout of this rank."""
        fabric, model = trainer.fabric, trainer.model
        sums = torch.zeros(4, dtype=torch.float64, device=fabric.device)  # loss, kl, clipped, ratio-1
        for i, s in enumerate(scored):
            mask = s.rollout.mask.to(fabric.device)
            with fabric.no_sync(model, enabled=i < len(scored) - 1):
                log_probs = self.log_probs(trainer, model, s.rollout, s.noise_key)
                old = log_probs.detach() if s.old_log_probs is None else s.old_log_probs
                terms = clipped_token_loss(
                    log_probs, old, s.advantages, clip_eps=self.rl.clip_eps,
                    ref_log_probs=s.ref_log_probs, kl_coef=self.rl.kl_coef,
                )  # fmt: skip
                loss = (terms.loss * mask).sum() / normalizer
            loss.backward()
            m = mask.double()
            sums += torch.stack([
                loss.detach().double(), (terms.kl.detach() * m).sum() / normalizer,
                (terms.clipped * m).sum() / normalizer, ((terms.ratio - 1).abs() * m).sum() / normalizer,
            ])  # fmt: skip
        fabric.all_reduce_gradients(model)
        loss, grad_norm, memory = trainer.backend.finish_step(trainer, sums[0].float())
        sums = fabric.all_reduce(sums, op="mean")  # each rank's sums are over the global normalizer / W
        return {"loss": loss, "grad_norm": grad_norm, "memory": memory, "kl": float(sums[1]),
                "clip_fraction": float(sums[2]), "ratio_dev": float(sums[3])}  # fmt: skip

    def step(self, trainer: Any, state: TrainState, micro: list[PromptBatch]) -> dict[str, Any]:
        """One rollout and its updates; updates `state` and returns metrics like `train_step`'s."""
        fabric = trainer.fabric
        self.last_rollouts = []
        was_training = trainer.model.training
        scored = [self.score(trainer, state, batch, i) for i, batch in enumerate(micro)]
        trainer.model.train(was_training)
        state.micro_batches += fabric.world_size * len(micro)
        local = torch.tensor([float(sum(s.rollout.completion_tokens for s in scored)),
                              float(sum(s.rollout.rewards.sum() for s in scored)),
                              float(sum(s.rollout.rewards.numel() for s in scored)),
                              float(sum(s.rollout.inputs.numel() + len(s.rollout.texts) for s in scored))],
                             dtype=torch.float64)  # fmt: skip
        totals = fabric.all_reduce(local.to(fabric.device), op="sum").cpu()
        normalizer = fabric.loss_normalizer(local[0])
        updates = [self.update(trainer, scored, normalizer) for _ in range(self.rl.updates_per_rollout)]
        finite = all(math.isfinite(u["grad_norm"]) for u in updates)
        tokens = int(totals[3])
        state.record_step(tokens, finite=finite)
        first = updates[0]
        depth = scored[0].rollout.depth if scored else None
        # the updates' forward + backward passes (decoding and the no-grad forwards are not counted)
        flops = len(updates) * training_flops_per_token(trainer.config, *(depth or (0, 0))) * totals[3]
        return {
            "memory": first["memory"], "loss": sum(u["loss"] for u in updates) / len(updates),
            "grad_norm": updates[-1]["grad_norm"], "accum": len(micro),
            "depth": list(depth) if depth else None, "flops": float(flops), "step_tokens": tokens,
            "reward": float(totals[1] / totals[2]), "kl": first["kl"],
            "clip_fraction": sum(u["clip_fraction"] for u in updates) / len(updates),
            "ratio_deviation": first["ratio_dev"],  # mean |ratio - 1| of the first update: 0 by construction
            "completion_length": float(totals[0] / totals[2]), **trainer.backend.metrics(),
        }  # fmt: skip
