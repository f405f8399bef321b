"""The baselines benchmark's arithmetic (tools/baselines.py runs it): every method's baseline from a pool of samples,
its error against Monte-Carlo truth with bootstrap intervals over prompts, and the report's table and plot. Pure
numpy on lists of rewards, values and token counts; no model, no engine. The definitions (truth, MSE corrected by the
truth's sampling variance, bias, Spearman, A²) are in tools/baselines.py's docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from advantage import grpo_advantages, rloo_advantages
from prior import sample_with_osla
from probe import cross_rollout_baselines

GROUP_SIZES = (2, 4, 8, 16)
REFERENCE = "GRPO G=8"
CRITIC_ADVANTAGE_ROLLOUTS = 8  # rollouts whose advantages a critic's or the prior's baseline is scored on (G = 8)

# ---------------------------------------------------------------------------------------------
# 1. Ground truth and one method's baselines and costs


def truth_from_rewards(rewards: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """rewards[x] = the M rewards of prompt x -> (V [P] = their mean, se² [P] = unbiased sample variance / M)."""
    r = np.asarray(rewards, dtype=np.float64)  # [P, M]
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"the truth needs >= 2 samples per prompt, got shape {r.shape}")
    m = r.shape[1]
    value = r.mean(1)  # [P]
    return value, ((r - value[:, None]) ** 2).sum(1) / (m - 1) / m


@dataclass
class Method:
    """One method's baselines for P prompts. baselines[x]: the baseline of each rollout of prompt x (a prompt-level
    estimate has one entry per rollout, all equal); rewards[x]: those rollouts' rewards (what the advantages use)."""
    name: str
    algorithm: str
    baselines: list[list[float]]
    rewards: list[list[float]]
    policy_tokens: list[int]  # [P] policy tokens generated for the estimate
    critic_tokens: list[int]  # [P] tokens a critic or the prior's embedder reads, plus tokens a critic generates
    critic_generated: list[int] = field(default_factory=list)  # [P] of critic_tokens, the generated ones
    note: str = ""

    def __post_init__(self):
        self.critic_generated = self.critic_generated or [0] * len(self.baselines)


def group_mean_methods(pool_rewards: list[list[float]], pool_tokens: list[list[int]],
                       sizes=GROUP_SIZES) -> list[Method]:
    """GRPO (group mean, self included) and RLOO (leave-one-out mean) over the first G rollouts of each prompt's pool:
    b_i = r_i − A_i with A from advantage.grpo_advantages(use_std=False) / advantage.rloo_advantages."""
    out = []
    for g in sizes:
        rewards = torch.tensor([r[:g] for r in pool_rewards], dtype=torch.float64)  # [P, G]
        flat, groups = rewards.flatten(), torch.arange(len(pool_rewards)).repeat_interleave(g)  # [P G]
        tokens = [sum(t[:g]) for t in pool_tokens]
        for name, algorithm, advantages in ((f"GRPO G={g}", "grpo", grpo_advantages(flat, groups, use_std=False)),
                                            (f"RLOO G={g}", "rloo", rloo_advantages(flat, groups))):
            baselines = (flat - advantages.double()).view(-1, g)  # [P, G]
            out.append(Method(name, algorithm, baselines.tolist(), rewards.tolist(), tokens, [0] * len(tokens)))
    return out


def v05_methods(prior_values: list[float], prior_tokens: list[int], pool_rewards: list[list[float]],
                pool_tokens: list[list[int]], **osla) -> list[Method]:
    """V0.5 (prior.py): the prior alone; prior + shrinkage fusion with 4 rollouts; prior + fusion + OSLA at its default
    budget (n0 = 4, c = 0.0039 -> K_max = 16, pad 4). Rollouts come from each prompt's pool in order, so a method's
    cost is the tokens of exactly the rollouts it asked for. The fused b̂ (±1 scale) is mapped back to
    (b̂ + 1) / 2."""
    served = [0] * len(pool_rewards)

    def sample_round(wanted: list[int]) -> list[list[float]]:
        for i, w in enumerate(wanted):
            if served[i] + w > len(pool_rewards[i]):
                raise ValueError(f"OSLA wants {served[i] + w} rollouts of prompt {i}; "
                                 f"the pool holds {len(pool_rewards[i])}")
        out = [pool_rewards[i][served[i]:served[i] + w] for i, w in enumerate(wanted)]
        served[:] = [s + w for s, w in zip(served, wanted)]
        return out

    critic_rows = [r[:CRITIC_ADVANTAGE_ROLLOUTS] for r in pool_rewards]
    methods = [Method("V0.5 prior alone", "v05", [[v] * len(r) for v, r in zip(prior_values, critic_rows)], critic_rows,
                      [0] * len(prior_values), list(prior_tokens))]
    for name, kwargs in (("V0.5 prior + fusion, 4 rollouts", {"fixed_k": 4}), ("V0.5 prior + fusion + OSLA", osla)):
        served[:] = [0] * len(pool_rewards)
        res = sample_with_osla(prior_values, sample_round, **kwargs)
        fused = ((res.fused_baseline + 1) / 2).tolist()  # [P] on [0, 1]
        methods.append(Method(name, "v05", [[b] * len(r) for b, r in zip(fused, res.rewards)], res.rewards,
                              [sum(t[:k]) for t, k in zip(pool_tokens, res.counts.tolist())], list(prior_tokens),
                              note=f"{res.rounds} OSLA rounds" if "fixed_k" not in kwargs else ""))
    return methods


def poise_method(probe_values: list[list[float]], pool_rewards: list[list[float]],
                 pool_tokens: list[list[int]]) -> Method:
    """POISE (probe.py): b_i = mean_{j≠i} g(z_j) over the G rollouts whose probe values g(z) [P][G] are given (the
    first G of the pool); the features come from the old-log-prob pass, so no tokens beyond the G rollouts."""
    g = len(probe_values[0])
    values = torch.tensor(probe_values, dtype=torch.float64).flatten()  # [P G]
    groups = torch.arange(len(probe_values)).repeat_interleave(g)
    baselines = cross_rollout_baselines(values, groups).double().view(-1, g)  # [P, G]
    return Method(f"POISE probe, G={g}", "poise", baselines.tolist(), [r[:g] for r in pool_rewards],
                  [sum(t[:g]) for t in pool_tokens], [0] * len(probe_values))


def critic_method(name: str, algorithm: str, values: list[float], read_tokens: list[int], generated_tokens: list[int],
                  pool_rewards: list[list[float]], note: str = "") -> Method:
    """A value at the prompt state (critic or generative critic): no policy tokens; its advantages are scored on the
    first CRITIC_ADVANTAGE_ROLLOUTS rollouts of the pool. Critic tokens = read + generated."""
    rows = [r[:CRITIC_ADVANTAGE_ROLLOUTS] for r in pool_rewards]
    return Method(name, algorithm, [[v] * len(r) for v, r in zip(values, rows)], rows, [0] * len(values),
                  [a + b for a, b in zip(read_tokens, generated_tokens)], list(generated_tokens), note)


# ---------------------------------------------------------------------------------------------
# 2. Statistics: per-prompt terms, bootstrap over prompts, paired differences


def per_prompt_terms(method: Method, truth: np.ndarray, truth_se2: np.ndarray) -> dict[str, np.ndarray]:
    """[P] arrays: estimate mean_i b_i; squared error mean_i (b_i − V)² − se² (corrected); error mean_i b_i − V;
    advantage second moment mean_i (r_i − b_i)²; policy and critic tokens."""
    estimate = np.array([np.mean(b) for b in method.baselines])
    sq = np.array([np.mean((np.asarray(b) - v) ** 2) for b, v in zip(method.baselines, truth)]) - truth_se2
    adv = np.array([np.mean((np.asarray(r) - np.asarray(b)) ** 2) for r, b in zip(method.rewards, method.baselines)])
    return {"estimate": estimate, "sq_error": sq, "error": estimate - truth, "advantage_sq": adv,
            "policy_tokens": np.asarray(method.policy_tokens, dtype=np.float64),
            "critic_tokens": np.asarray(method.critic_tokens, dtype=np.float64),
            "critic_generated": np.asarray(method.critic_generated, dtype=np.float64)}


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..P along the last axis of x [B, P], ties given the mean of their ranks (scipy's rankdata) -> [B, P]."""
    B, P = x.shape
    order = np.argsort(x, axis=-1, kind="stable")  # [B, P]
    ordered = np.take_along_axis(x, order, -1)
    starts = np.ones((B, P), dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = np.cumsum(starts, -1) - 1 + np.arange(B)[:, None] * P  # [B, P]: a tie group's id, unique over rows
    position = np.broadcast_to(np.arange(1, P + 1, dtype=float), (B, P))
    total, count = np.zeros(B * P), np.zeros(B * P)
    np.add.at(total, group.ravel(), position.ravel())
    np.add.at(count, group.ravel(), 1.0)
    ranks = np.empty((B, P))
    np.put_along_axis(ranks, order, (total / np.maximum(count, 1.0))[group], -1)
    return ranks


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row pair of x, y [B, P] (average ranks for ties) -> [B]; nan for a constant row."""
    rx, ry = average_ranks(x), average_ranks(y)  # [B, P]
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    norm = np.sqrt((rx ** 2).sum(-1) * (ry ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (rx * ry).sum(-1) / np.where(norm > 0, norm, 1.0), np.nan)


STATISTICS = ("mse", "bias", "spearman", "advantage_sq")


def resampled_statistics(terms: dict[str, np.ndarray], truth: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Every statistic on each row of prompt indices idx [B, P] -> {name: [B]}."""
    mean = lambda key: terms[key][idx].mean(-1)  # noqa: E731
    return {"mse": mean("sq_error"), "bias": mean("error"),
            "spearman": spearman_rows(terms["estimate"][idx], truth[idx]), "advantage_sq": mean("advantage_sq"),
            "policy_tokens": mean("policy_tokens"), "critic_tokens": mean("critic_tokens")}


def interval(draws: np.ndarray, level: float = 0.95) -> list[float]:
    """Percentile interval of bootstrap draws [B] (nan draws dropped; [nan, nan] when none is left)."""
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return [math.nan, math.nan]
    return np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]).tolist()


def bootstrap_summary(terms: dict[str, dict[str, np.ndarray]], truth: np.ndarray, reference: str = REFERENCE,
                      draws: int = 2000, seed: int = 0, progress=None) -> dict[str, dict]:
    """terms[method] from `per_prompt_terms` -> per method: point value and 95% interval of each statistic, and the
    paired difference (method − reference) with its interval, all methods on the SAME resamples of the prompts."""
    num_prompts = len(truth)
    idx = np.random.default_rng(seed).integers(0, num_prompts, size=(draws, num_prompts))  # [B, P]
    everything = np.arange(num_prompts)[None]  # [1, P]: the point estimates
    items = progress(terms.items()) if progress else terms.items()
    boot = {name: resampled_statistics(t, truth, idx) for name, t in items}
    out = {}
    for name, t in terms.items():
        point = {k: float(v[0]) for k, v in resampled_statistics(t, truth, everything).items()}
        row = {k: {"value": point[k], "ci": interval(boot[name][k])} for k in point}
        if reference in terms:
            ref_point = {k: float(v[0]) for k, v in resampled_statistics(terms[reference], truth, everything).items()}
            row["vs_reference"] = {k: {"value": point[k] - ref_point[k],
                                       "ci": interval(boot[name][k] - boot[reference][k])} for k in STATISTICS}
        out[name] = row
    return out


# ---------------------------------------------------------------------------------------------
# 3. Reading the table: markdown, plot


def cell(stat: dict, digits: int = 4) -> str:
    v, (lo, hi) = stat["value"], stat["ci"]
    return "—" if not math.isfinite(v) else f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown_table(summary: dict[str, dict], reference: str = REFERENCE) -> str:
    head = ("| method | policy tokens / prompt | critic/prior tokens / prompt | MSE to V | bias | Spearman | "
            "E[(r − b)²] | "
            f"ΔMSE vs {reference} | ΔSpearman vs {reference} |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name, s in summary.items():
        d = s.get("vs_reference")
        rows.append(f"| {name} | {s['policy_tokens']['value']:.1f} | {s['critic_tokens']['value']:.1f} | "
                    f"{cell(s['mse'])} | "
                    f"{cell(s['bias'])} | {cell(s['spearman'], 3)} | {cell(s['advantage_sq'])} | "
                    f"{cell(d['mse']) if d else '—'} | {cell(d['spearman'], 3) if d else '—'} |")
    return "\n".join([head] + rows)


def plot_mse_vs_tokens(methods: dict[str, dict], target: Path, title: str) -> None:
    """MSE with its 95% interval against the tokens generated per prompt for the estimate (policy + generative critic;
    symlog x, so critics that only read sit at 0; symlog y, linear below 1e-3 where a noise-corrected MSE can be
    < 0): GRPO and RLOO as curves over G with bands, every other method a
    point with bars. methods: the JSON's "methods" (algorithm, generated_per_prompt, mse)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for algorithm, color in (("grpo", "tab:blue"), ("rloo", "tab:orange")):
        names = [n for n, m in methods.items() if m["algorithm"] == algorithm]
        xs = [methods[n]["generated_per_prompt"] for n in names]
        ax.plot(xs, [methods[n]["mse"]["value"] for n in names], marker="o", color=color,
                label=f"{algorithm.upper()} G=" + ",".join(n.split("=")[1] for n in names))
        ax.fill_between(xs, [methods[n]["mse"]["ci"][0] for n in names], [methods[n]["mse"]["ci"][1] for n in names],
                        color=color, alpha=0.2)
    markers = iter("sD^vP*Xhp<>8")
    for name, m in methods.items():
        if m["algorithm"] in ("grpo", "rloo"):
            continue
        v, (lo, hi) = m["mse"]["value"], m["mse"]["ci"]
        ax.errorbar([m["generated_per_prompt"]], [v], yerr=[[v - lo], [hi - v]], marker=next(markers, "o"), capsize=3,
                    linestyle="none", label=name)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_yscale("symlog", linthresh=1e-3)  # rollout baselines sit near 0.005, an untrained critic near 0.8
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("tokens generated per prompt for the estimate (policy + generative critic; symlog)")
    ax.set_ylabel("MSE to V(x), truth noise subtracted (symlog)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
