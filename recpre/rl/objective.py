"""The GRPO objective: group-relative advantages, the PPO clipped ratio and the k3 KL estimator.

Per completion token t of completion i in a group of G completions of one prompt:

    A_i = (r_i - mean(r)) / (std(r) + eps)          (Dr. GRPO, `scale_rewards: false`: r_i - mean(r))
    ratio = exp(logp - logp_old)
    L_t = -min(ratio * A_i, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A_i) + kl_coef * k3
    k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1          (Schulman's unbiased, non-negative estimator)

The loss is the sum of L_t over every completion token of the step divided by their count (token-level
normalisation, as in DAPO / Dr. GRPO), so long completions are not down-weighted per token. Sources:
DeepSeekMath (arXiv 2402.03300), Dr. GRPO (arXiv 2503.20783), http://joschu.net/blog/kl-approx.html.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STD_EPS = 1e-4


def group_advantages(rewards: Tensor, group_size: int, *, scale_rewards: bool = True) -> Tensor:
    """Advantages [N] of rewards [N] laid out as consecutive groups of `group_size` completions of one prompt.

    A group whose rewards are all equal has zero advantage (it carries no signal); the std is the sample std
    (unbiased), as in the reference GRPO implementations.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + STD_EPS)
    return centred.reshape(-1)


def token_log_probs(logits: Tensor, targets: Tensor, *, vocab_size: int, temperature: float = 1.0) -> Tensor:
    """log p(target) [B, S] under the sampling distribution: logits [B, S, V'] over the real vocabulary only
    (padded embedding rows are never sampled), divided by the sampling temperature."""
    logits = logits[..., :vocab_size].float()
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return torch.gather(logits.log_softmax(dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def k3_kl(log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1 with d = ref - policy (>= 0)."""
    d = ref_log_probs - log_probs
    return torch.exp(d) - d - 1


@dataclass
class TokenTerms:
    """Per-token pieces of the loss (summed by the caller under the completion mask)."""

    loss: Tensor  # [B, S]
    kl: Tensor  # [B, S]
    clipped: Tensor  # [B, S] bool: the clipped branch was the active (smaller) one
    ratio: Tensor  # [B, S]


def clipped_token_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    *,
    clip_eps: float,
    ref_log_probs: Tensor | None = None,
    kl_coef: float = 0.0,
) -> TokenTerms:
    """PPO's clipped surrogate per token (negated: a loss), plus kl_coef x k3 against the reference.

    `advantages` [B] (one per completion) broadcast over its tokens. Beyond the clip range in the direction
    the advantage pushes, the clipped branch is a constant and the token's gradient is zero.
    """
    ratio = torch.exp(log_probs - old_log_probs)
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    surrogate = torch.minimum(unclipped, clipped)
    loss = -surrogate
    kl = torch.zeros_like(loss)
    if ref_log_probs is not None:
        kl = k3_kl(log_probs, ref_log_probs)
        if kl_coef:
            loss = loss + kl_coef * kl
    return TokenTerms(loss=loss, kl=kl, clipped=(clipped < unclipped).detach(), ratio=ratio.detach())
