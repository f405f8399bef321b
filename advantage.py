"""The value-free baselines GRPO, Dr.GRPO and RLOO (formulas and algorithm classes), the token-level GAE the
critics share (PPO, VC-PPO, GenAC), and the PPO loss math.

Pure tensor math, no models, no I/O; every function is unit-tested against hand-computed numbers
(tests/test_advantage.py). Conventions match verl's `core_algos.py` so numbers are comparable:
  - GRPO std is the unbiased std with eps 1e-6; RLOO is r_i - mean_{j != i} r_j;
  - loss aggregation modes `token-mean` (default), `seq-mean-token-mean`, `seq-mean-token-sum`, with the
    normaliser computed ONCE per optimizer step so the micro-batch split cannot change the gradient.

Shapes: N rollouts, R response tokens (right-padded), `mask` is 1 on real response tokens.
"""

from __future__ import annotations

import torch

from algo_flags import GRPOFlags, RLOOFlags
from flags import LOSS_AGG_MODES


# ---------------------------------------------------------------------------------------------
# Group statistics over the rollouts of one prompt


def _group_sum_count(values: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values [N], group_index [N] -> per-rollout (sum of its group, size of its group), both [N]."""
    groups = int(group_index.max()) + 1
    sums = torch.zeros(groups, dtype=values.dtype).index_add_(0, group_index, values)  # [G]
    counts = torch.zeros(groups, dtype=values.dtype).index_add_(0, group_index, torch.ones_like(values))  # [G]
    return sums[group_index], counts[group_index]


def grpo_advantages(rewards: torch.Tensor, group_index: torch.Tensor, use_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean_j r_j) / (std_j r_j + eps), unbiased std; `use_std=False` is Dr.GRPO.

    rewards [N], group_index [N] -> [N].  Example: r = [1, 0, 0, 1] in one group -> mean 0.5,
    unbiased std 0.5774 -> A = [0.866, -0.866, -0.866, 0.866]. A group of one gets A = 0.
    """
    rewards = rewards.double()
    sums, counts = _group_sum_count(rewards, group_index)
    mean = sums / counts  # [N]
    centred = rewards - mean
    if not use_std:
        return centred.float()
    sq, _ = _group_sum_count(centred ** 2, group_index)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))  # unbiased; 0 for a group of one
    return (centred / (std + eps)).float()


def rloo_advantages(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """RLOO: A_i = r_i - mean_{j != i} r_j.  rewards [N], group_index [N] -> [N].

    Example: r = [1, 0, 0, 1] -> A = [1 - 1/3, 0 - 2/3, -2/3, 1/3] = [0.667, -0.667, -0.667, 0.667].
    A group of one has no siblings and gets A = 0.
    """
    rewards = rewards.double()
    sums, counts = _group_sum_count(rewards, group_index)
    others = (sums - rewards) / (counts - 1).clamp(min=1)
    return torch.where(counts > 1, rewards - others, torch.zeros_like(rewards)).float()


def broadcast_to_tokens(sequence_advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N] -> [N, R]: the same advantage on every response token, 0 on padding."""
    return sequence_advantages[:, None] * mask


# ---------------------------------------------------------------------------------------------
# The value-free algorithms, as train.py's algorithm interface: no model of their own


class GRPO(GRPOFlags):
    """GRPO (arXiv:2402.03300 §4.1.2): A_i = (r_i - mean_j r_j) / (std_j r_j + 1e-6) over the G rollouts of a
    prompt, unbiased std (verl); --no-std gives Dr.GRPO's r_i - mean_j r_j (arXiv:2503.20783). Same A_i on
    every token of response i; no model of its own. Its flags (add_arguments, check_arguments): algo_flags.GRPOFlags,
    torch-free so that train.py checks them before importing this file."""

    memory_parts = frozenset()  # what the memory plan (memory.py) counts beside the actor: nothing

    def __init__(self, args, actor, tokenizer, device, world: int, checkpoint=None):
        self.args, self.warmup_steps = args, 0

    def sample(self, problems, prompt_ids, step):
        samples, rewards = step.generate([self.args.rollouts_per_prompt] * len(prompt_ids), step.seed)  # G per prompt
        return samples, rewards, {}, {}

    def advantages(self, batch, problems, step) -> tuple[torch.Tensor, dict]:
        sequence_advantages = grpo_advantages(batch.rewards, batch.group_index, use_std=not self.args.no_std)  # [N]
        return broadcast_to_tokens(sequence_advantages, batch.response_mask), {}

    def after_update(self, batch, step) -> dict: return {}
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: pass
    def save(self, folder) -> None: pass
    def close(self) -> None: pass


class RLOO(RLOOFlags, GRPO):
    """RLOO (arXiv:2402.14740): A_i = r_i - mean_{j != i} r_j, the leave-one-out mean of the siblings. GRPO's
    sampling; its flags: algo_flags.RLOOFlags (none of its own, GRPO's G >= 2 check)."""

    def advantages(self, batch, problems, step) -> tuple[torch.Tensor, dict]:
        sequence_advantages = rloo_advantages(batch.rewards, batch.group_index)  # [N]
        return broadcast_to_tokens(sequence_advantages, batch.response_mask), {}


# ---------------------------------------------------------------------------------------------
# Token-level GAE over a critic's values, whitened over the batch (PPO, VC-PPO, GenAC)


def gae_advantages(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level GAE with the outcome reward on the last real token.

    values [N, R] (V_t = value of the state before response token t), rewards [N], mask [N, R]
    -> (advantages [N, R], returns [N, R]), zero on padding.
        delta_t = r_t + gamma * V_{t+1} - V_t,  r_t = 0 except the last token, V after the last token = 0
        A_t = sum_l (gamma * lam)^l delta_{t+l},  returns_t = A_t + V_t
    With gamma = lam = 1: A_t = r - V_t.
    """
    N, R = values.shape
    lengths = mask.sum(1).long()  # [N]
    token_rewards = torch.zeros_like(values)
    has_tokens = lengths > 0
    token_rewards[has_tokens, lengths[has_tokens] - 1] = rewards[has_tokens].to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros(N, dtype=values.dtype)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros(N, dtype=values.dtype)
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * mask[:, t]  # padding contributes nothing and resets nothing after the end
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def whitened_gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
                 returns_lam: float, sum_over_ranks=lambda t: t) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Token-level GAE from values [N, R], whitened over the whole batch (PPO, VC-PPO, GenAC).

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_l (gamma lambda)^l delta_{t+l},   returns_t = A_t + V_t
        (gamma = lambda = 1: A_t = r - V_t)

    The returns (the critic's targets) use `returns_lam`: VC-PPO regresses the Monte-Carlo return (lambda = 1)
    whatever the actor's lambda ("decoupled GAE", arXiv:2503.01491). `sum_over_ranks` all-reduces a float64
    tensor of sums, so the whitening and the metrics are global. -> (advantages [N, R], returns [N, R], metrics).
    """
    values = values * mask
    advantages, returns = gae_advantages(values, rewards, mask, gamma, lam)
    if returns_lam != lam:
        _, returns = gae_advantages(values, rewards, mask, gamma, returns_lam)
    s = sum_over_ranks(torch.tensor([float((advantages * mask).sum()), float(mask.sum()), float((returns * mask).sum()),
                                     float((returns ** 2 * mask).sum()), float(((returns - values) ** 2 * mask).sum()),
                                     float((values * mask).sum())], dtype=torch.float64))
    n = max(float(s[1]), 1.0)
    mean = float(s[0]) / n
    centred_sq = sum_over_ranks(torch.tensor([float((((advantages - mean) ** 2) * mask).sum())], dtype=torch.float64))
    var = float(centred_sq[0]) / max(n - 1, 1.0)
    whitened = (advantages - mean) * (var + 1e-8) ** -0.5 * mask  # = masked_whiten on one rank
    returns_var = float(s[3]) / n - (float(s[2]) / n) ** 2
    metrics = {"critic/value_mean": float(s[5]) / n, "critic/return_mean": float(s[2]) / n,
               "critic/values_mse": float(s[4]) / n}
    if returns_var > 1e-6:  # R^2 of the values against the returns (undefined when every reward is equal)
        metrics["critic/r2"] = 1.0 - float(s[4]) / n / returns_var
    return whitened, returns, metrics


# ---------------------------------------------------------------------------------------------
# The shared policy loss


def ppo_token_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     clip_low: float = 0.2, clip_high: float = 0.2,
                     clip_ratio_c: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate per token: L_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t), with verl's
    guards: the log-ratio is clamped to ±20 before exp (no inf/NaN at extreme ratios), and for A_t < 0 the loss is
    capped at -c A_t (dual-clip, arXiv:1912.09729, c = clip_ratio_c = 3).

    All [N, R] -> (losses [N, R], clipped [N, R] bool: where the clipped branch was taken).
    `clip_high = 0.28` is DAPO's clip-higher.
    """
    ratio = torch.exp((logprobs - old_logprobs).clamp(-20.0, 20.0))
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * advantages
    losses = -torch.minimum(unclipped, clipped)
    dual_clipped = torch.minimum(losses, -clip_ratio_c * advantages)  # only binds for A < 0 and rho > c
    return torch.where(advantages < 0, dual_clipped, losses), clipped < unclipped


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0, with verl's guards: the
    log-ratio clamped to ±20 and the value to [-10, 10]. [N, R] -> [N, R]."""
    d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)


def loss_normaliser(mask: torch.Tensor, mode: str) -> float:
    """The denominator of `aggregate_loss` for a whole optimizer batch (count it once per step).

    mask [N, R] of ALL rollouts in the optimizer step (summed over ranks by the caller).
    token-mean -> number of response tokens; seq-mean-* -> number of non-empty responses (an empty one has no
    token to train and is left out of the mean, as verl's agg_loss masks it).
    """
    if mode == "token-mean":
        return float(mask.sum())
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return float((mask.sum(1) > 0).sum())
    raise ValueError(f"unknown loss aggregation {mode!r}; choose from {LOSS_AGG_MODES}")


def aggregate_loss(token_losses: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float) -> torch.Tensor:
    """Sum this micro-batch's share of the optimizer-batch loss. [b, R], [b, R] -> scalar.

    Summing `aggregate_loss` over the micro-batches of a step gives exactly
      token-mean:          sum_{i,t} L_it / (#tokens in the step)
      seq-mean-token-mean: sum_i (sum_t L_it / |y_i|) / (#non-empty sequences in the step)
      seq-mean-token-sum:  sum_i (sum_t L_it) / (#non-empty sequences in the step)
    whatever the split, because the normaliser is fixed for the step.
    """
    masked = token_losses * mask
    if mode == "token-mean":
        return masked.sum() / normaliser
    if mode == "seq-mean-token-mean":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / normaliser
    if mode == "seq-mean-token-sum":
        return masked.sum() / normaliser
    raise ValueError(f"unknown loss aggregation {mode!r}; choose from {LOSS_AGG_MODES}")
