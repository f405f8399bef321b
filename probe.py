"""POISE end to end: value from the actor's own hidden states, with cross-rollout baselines.

Paper: "Your Language Model is Its Own Critic: Reinforcement Learning with Value Estimation from Actor's Internal
States" (Choi et al., 2026); settings from the authors' code (github.com/holi-lab/POISE). Rewards r ∈ {0,1}; G ≥ 2
rollouts per prompt (the authors use G = 2). One step of `--algo poise` (commands and measured results: docs/poise.md):

    1. features z_i (`rollout_features`), pooled in the old-log-prob pass (no extra forward) from h_t, the output of
       decoder layer L ≈ 0.55·depth, and H_t, the entropy of the distribution that sampled response token t (E ≤ R:
       the R response tokens up to and including the first `</think>`, else R; spans as the authors: `think_spans`):
           z_i = [ mean h_t over the last 10 prompt tokens,                      H dims
                   mean h_t over the last 10 response tokens ending at token E,  H dims
                   mean H_t over the response, the reasoning, the answer ]       3 dims (a missing span -> 0.0)
    2. the probe (`RidgeProbe`): g(z) = clip(w·φ(z) + c, 0, 1), φ = PCA of the centred raw prompt block (32 axes) and
       response block (64), scores scaled to unit variance, plus the 3 standardised entropies; (w, c) is ridge
       regression, α = 100, unpenalised intercept: w = (ΦᵀΦ + αI)⁻¹Φᵀ(y − ȳ), Φ centred
    3. cross-rollout advantages (`PoiseBaseline`), the probe fitted on EARLIER steps only:
           y_i = mean_{j≠i} r_j        b_i = mean_{j≠i} g(z_j)        A_i = r_i − b_i   (no std scaling)
       Given x, b_i depends only on the siblings' responses, so E[b_i ∇log π(y_i|x)|x]
       = E[b_i|x]·E[∇log π(y_i|x)|x] = 0: unbiased although z_j reads a whole trajectory (g(z_i) would not be;
       tests/test_probe.py, a toy bandit)
    4. this step's (z, y) rows enter a FIFO buffer of the newest 4096 and the probe is refitted in closed form; the
       first 16 steps use RLOO (b_i = y_i) while it fills. Every rank fits the same probe on all ranks' rows.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from advantage import broadcast_to_tokens
from algo_flags import POISEFlags

POOL_TOKENS = 10  # tokens averaged for each hidden-state feature [code]
ENTROPY_FEATURES = 3  # whole-response, reasoning-span and answer-span mean entropy
STD_FLOOR = 1e-6  # a constant feature is divided by this instead of 0
EIGENVALUE_RTOL = 1e-9  # principal axes below this fraction of the top variance are numerical noise


def probe_layer_index(num_layers: int, fraction: float = 0.55) -> int:
    """Decoder layer whose output feeds the probe: ⌊fraction·depth⌋ (36 layers → 19 as the authors
    use for Qwen3-4B; SmolLM2-135M's 30 → 16). The harness reads `hidden_states[layer + 1]`."""
    return min(max(math.floor(fraction * num_layers + 1e-9), 0), num_layers - 1)


# ---- 1. Features of one rollout, from the forward pass that computes the old log-probs -------
def _mean_of_last_tokens(hidden: torch.Tensor, window_end: torch.Tensor, window_len: torch.Tensor,
                         pool: int) -> torch.Tensor:
    """Mean of hidden[i, window_end_i − window_len_i : window_end_i] in float32; zeros when empty.
    hidden [b, T, H]; window_end, window_len [b] with window_len ≤ pool. Returns [b, H]."""
    b, T, _ = hidden.shape
    offsets = torch.arange(pool, device=hidden.device)  # [W]
    positions = (window_end[:, None] - pool + offsets).clamp(0, T - 1)  # [b, W]
    in_window = offsets >= pool - window_len[:, None]  # [b, W] the last window_len slots
    rows = torch.arange(b, device=hidden.device)[:, None]  # [b, 1]
    gathered = hidden[rows, positions].float()  # [b, W, H]
    summed = torch.where(in_window[..., None], gathered, 0.0).sum(1)  # [b, H]
    return summed / window_len.clamp(min=1)[:, None].float()  # [b, H]


def rollout_features(hidden: torch.Tensor, prompt_lens: torch.Tensor, response_lens: torch.Tensor,
                     response_entropy: torch.Tensor, reasoning_end: torch.Tensor, entropy_spans: torch.Tensor,
                     pool: int = POOL_TOKENS) -> torch.Tensor:
    """Features z of each rollout (step 1 above), [b, 2H + 3] float32: [prompt hidden | response hidden | entropies].
    hidden [b, T, H]: one layer's output, row i = prompt [0, P_i), response [P_i, P_i + R_i), padding. prompt_lens P,
    response_lens R, reasoning_end E [b]; response_entropy [b, R_max]: each response token's sampling entropy (past
    R_i ignored); entropy_spans [b, 3] = (s, e, a): reasoning [s, e), answer [a, R), an empty one's mean 0.0."""
    device = hidden.device
    P, R, E = (x.to(device=device, dtype=torch.long) for x in (prompt_lens, response_lens, reasoning_end))
    s, e, a = entropy_spans.to(device=device, dtype=torch.long).unbind(1)  # [b] each
    if bool((E < 0).any() | (E > R).any()):
        raise ValueError("reasoning_end must lie in [0, response_len]")
    if bool((s < 0).any() | (s > e).any() | (e > a).any() | (a > R).any()):
        raise ValueError("entropy_spans must satisfy 0 <= start <= stop <= answer_start <= response_len")
    if bool((P + R > hidden.shape[1]).any()) or bool((R > response_entropy.shape[1]).any()):
        raise ValueError("prompt_len + response_len exceeds the hidden or entropy tensors")

    prompt_hidden = _mean_of_last_tokens(hidden, P, P.clamp(max=pool), pool)  # [b, H]
    response_hidden = _mean_of_last_tokens(hidden, P + E, E.clamp(max=pool), pool)  # [b, H]

    entropy = response_entropy.to(device=device, dtype=torch.float32)  # [b, R_max]
    token = torch.arange(entropy.shape[1], device=device)  # [R_max]
    in_response = token < R[:, None]  # [b, R_max]
    in_reasoning = (token >= s[:, None]) & (token < e[:, None])  # [b, R_max] ⊆ in_response since e ≤ R
    in_answer = (token >= a[:, None]) & in_response  # [b, R_max]

    def span_mean(mask):  # [b, R_max] -> mean [b]; 0.0 for an empty span (the authors' value when it is missing)
        return torch.where(mask, entropy, 0.0).sum(1) / mask.sum(1).clamp(min=1)

    entropies = torch.stack([span_mean(in_response), span_mean(in_reasoning), span_mean(in_answer)], dim=1)  # [b, 3]
    return torch.cat([prompt_hidden, response_hidden, entropies], dim=1)  # [b, 2H + 3]


def _right_align(hidden: torch.Tensor, mb):
    """Our rows are [pad | prompt | response | pad]; rollout_features wants [prompt | response | pad].
    hidden [b, T, H] -> (hidden [b, T, H], prompt_lens [b], response_lens [b])."""
    b, T, H = hidden.shape
    shift = mb.prompt_width - mb.prompt_lens  # [b] left-pad width of each row
    src = (torch.arange(T)[None, :] + shift[:, None]).clamp(max=T - 1)  # [b, T]
    return hidden.gather(1, src[:, :, None].expand(b, T, H)), mb.prompt_lens, mb.response_lens


def _find(row: list[int], marker: list[int], start: int = 0) -> int:
    """Index of the first occurrence of the token sequence `marker` in row[start:], or -1."""
    for j in range(start, len(row) - len(marker) + 1):
        if marker and row[j:j + len(marker)] == marker:
            return j
    return -1


def think_spans(mb, open_marker: list[int], close_marker: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' split of each response at its FIRST `</think>` (token sequences, as their trainer searches) ->
    reasoning_end E [b] (tokens up to and including it, else R) and entropy_spans [b, 3] = (s, e, a): reasoning =
    [s, e) inside the first `<think>…</think>` (tags excluded; s = 0 without a `<think>` before it, which the chat
    template may have opened), answer = [a, R) after it. Without a `</think>` both spans are empty (entropy 0.0)."""
    ends = mb.response_lens.clone()
    spans = torch.zeros(len(ends), 3, dtype=torch.long)
    for i, row in enumerate(mb.response_ids.tolist()):
        row = row[: int(mb.response_lens[i])]
        close = _find(row, close_marker)
        if close < 0:
            spans[i] = torch.tensor([0, 0, len(row)])
            continue
        opened = _find(row[:close], open_marker)
        start = opened + len(open_marker) if opened >= 0 else 0
        ends[i] = close + len(close_marker)
        spans[i] = torch.tensor([start, close, close + len(close_marker)])
    return ends, spans


# ---- 2. The probe: centre -> PCA per block -> standardise scores -> ridge -> clip, closed form (float64) ----
@contextlib.contextmanager
def _single_thread():
    """Probe math runs single-threaded: OpenMP threads fight over a busy CPU's cores (docs/poise.md)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def principal_axes(block: torch.Tensor, max_dims: int):
    """Top principal axes of a column-centred block [N, W]: returns (axes [W, k], score_std [k]),
    k = min(max_dims, N − 1, W, numerical rank), largest variance first."""
    variances, vectors = torch.linalg.eigh(block.T @ block / block.shape[0])  # [W], [W, W]
    variances, vectors = variances.flip(0), vectors.flip(1)  # largest first
    rank = int((variances > EIGENVALUE_RTOL * variances[0].clamp(min=1e-300)).sum())
    k = max(0, min(max_dims, block.shape[0] - 1, block.shape[1], rank))
    return vectors[:, :k], variances[:k].sqrt().clamp(min=STD_FLOOR)


class RidgeProbe:
    """g(z) ∈ [0, 1] from features [prompt hidden (H) | response hidden (H) | entropies (3)]. The hidden blocks
    are only centred before PCA, the authors' order (their `fit_estimator`: PCA on raw states, StandardScaler +
    Ridge on scores and scalars); `standardize_hidden=True` first scales each hidden dim to unit variance."""

    def __init__(self, prompt_dim: int, pca_prompt: int = 32, pca_response: int = 64,
                 ridge_alpha: float = 100.0, standardize_hidden: bool = False):
        self.prompt_dim, self.pca_prompt, self.pca_response = prompt_dim, pca_prompt, pca_response
        self.ridge_alpha, self.standardize_hidden = ridge_alpha, standardize_hidden
        self.params: dict[str, torch.Tensor] | None = None  # set by fit

    @property
    def is_fitted(self) -> bool: return self.params is not None

    def _design(self, z: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        """φ: centred features z [M, F] (entropies standardised) -> design matrix [M, k_p + k_r + 3]."""
        H = self.prompt_dim
        prompt_scores = z[:, :H] @ p["prompt_axes"]  # [M, k_p]
        response_scores = z[:, H:2 * H] @ p["response_axes"]  # [M, k_r]
        scores = torch.cat([prompt_scores, response_scores], 1) / p["score_std"]  # [M, k_p + k_r]
        return torch.cat([scores, z[:, 2 * H:]], 1)  # [M, D]

    def fit(self, features: torch.Tensor, targets: torch.Tensor) -> "RidgeProbe":
        """Closed-form fit on features [N, F = 2H + 3], targets [N] (N ≥ 2)."""
        H = self.prompt_dim
        if features.shape[1] != 2 * H + ENTROPY_FEATURES or features.shape[0] < 2:
            raise ValueError(f"expected ≥ 2 rows of {2 * H + ENTROPY_FEATURES} features, "
                             f"got {tuple(features.shape)}")
        with _single_thread():
            x, y = features.detach().cpu().double(), targets.detach().cpu().double()  # [N, F], [N]
            mean = x.mean(0)  # [F]
            scale = x.std(0, unbiased=False).clamp(min=STD_FLOOR)  # [F]
            if not self.standardize_hidden:
                scale[:2 * H] = 1.0
            z = (x - mean) / scale  # [N, F] centred; entropies (and hidden dims if asked) scaled
            prompt_axes, prompt_std = principal_axes(z[:, :H], self.pca_prompt)  # [H, k_p], [k_p]
            response_axes, response_std = principal_axes(z[:, H:2 * H], self.pca_response)  # [H, k_r]
            params = dict(mean=mean, scale=scale, prompt_axes=prompt_axes, response_axes=response_axes,
                          score_std=torch.cat([prompt_std, response_std]))
            design = self._design(z, params)  # [N, D]
            design_mean, target_mean = design.mean(0), y.mean()  # centring: intercept unpenalised
            centred = design - design_mean  # [N, D]
            gram = centred.T @ centred + self.ridge_alpha * torch.eye(design.shape[1], dtype=torch.float64)
            weights = torch.linalg.solve(gram, centred.T @ (y - target_mean))  # [D]
        params.update(weights=weights, intercept=target_mean - design_mean @ weights)
        self.params = params
        return self

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """g(z) for features [M, F] -> [M] float32 in [0, 1]."""
        if self.params is None:
            raise RuntimeError("RidgeProbe.predict called before fit")
        p = self.params
        with _single_thread():
            z = (features.detach().cpu().double() - p["mean"]) / p["scale"]  # [M, F]
            raw = self._design(z, p) @ p["weights"] + p["intercept"]  # [M]
        return raw.clamp(0.0, 1.0).float().to(features.device)

    def state_dict(self) -> dict: return {"params": None if self.params is None else dict(self.params)}

    def load_state_dict(self, state: dict) -> None:
        self.params = None if state["params"] is None else dict(state["params"])


# ---- 3. Online data: a FIFO buffer of the newest rows ----------------------------------------
class FeatureBuffer:
    """The newest `capacity` (feature [F], target) rows, oldest dropped first (CPU, float32)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._features = torch.empty(0, 0)  # [n, F]
        self._targets = torch.empty(0)  # [n]

    def append(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        """features [N, F], targets [N]."""
        features = features.detach().to("cpu", torch.float32)
        targets = targets.detach().to("cpu", torch.float32)
        if len(self) == 0:
            self._features = features.new_empty(0, features.shape[1])
        self._features = torch.cat([self._features, features])[-self.capacity:]  # [n, F]
        self._targets = torch.cat([self._targets, targets])[-self.capacity:]  # [n]

    def features(self) -> torch.Tensor: return self._features
    def targets(self) -> torch.Tensor: return self._targets
    def __len__(self) -> int: return self._targets.shape[0]


# ---- 4. Cross-rollout targets, baselines and advantages (pure functions on tensors) ----------
def _leave_one_out_mean(values: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """out_i = mean of values_j over j ≠ i in i's group. values [N], group_index [N] (any ids)."""
    _, group = torch.unique(group_index, return_inverse=True)  # [N] ids -> 0..num_groups-1
    count = torch.bincount(group)  # [num_groups]
    if bool((count < 2).any()):
        raise ValueError("every group needs at least 2 rollouts for a leave-one-out mean; "
                         f"sizes seen: {sorted(set(count.tolist()))}")
    values64 = values.double()  # float64 sums: removing i's own value cancels to rounding ~1e-16
    total = torch.zeros(len(count), dtype=torch.float64, device=values.device)
    total = total.index_add(0, group, values64)  # [num_groups]
    return ((total[group] - values64) / (count[group] - 1)).float()  # [N]


def cross_rollout_targets(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """Probe target y_i = mean_{j≠i} r_j, the siblings' reward. rewards [N], group_index [N] -> [N]."""
    return _leave_one_out_mean(rewards, group_index)


def cross_rollout_baselines(values: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """b_i = mean_{j≠i} g(z_j): only siblings' features enter i's baseline. values [N] -> [N]."""
    return _leave_one_out_mean(values, group_index)


def poise_advantages(rewards: torch.Tensor, baselines: torch.Tensor) -> torch.Tensor:
    """A_i = r_i − b_i, no std normalisation; the same value goes on every token. [N] -> [N]."""
    return rewards.float() - baselines.float()


# ---- 5. Probe quality metrics ----------------------------------------------------------------
def probe_quality(predicted: torch.Tensor, observed_rates: torch.Tensor) -> dict[str, float]:
    """MAE, RMSE and Pearson r of predicted [P] vs observed [P]. Pairs with a non-finite value are
    dropped; a metric that is undefined (no rows, constant input) is nan, never an exception."""
    p, o = predicted.detach().double().flatten().cpu(), observed_rates.detach().double().flatten().cpu()
    keep = torch.isfinite(p) & torch.isfinite(o)
    p, o = p[keep], o[keep]
    if p.numel() == 0:
        return {"mae": math.nan, "rmse": math.nan, "pearson": math.nan}
    error = p - o  # [P]
    pc, oc = p - p.mean(), o - o.mean()
    norm = (pc.square().sum() * oc.square().sum()).sqrt()
    pearson = float((pc * oc).sum() / norm) if norm > 1e-12 else math.nan
    return {"mae": float(error.abs().mean()), "rmse": float(error.square().mean().sqrt()), "pearson": pearson}


def pairwise_sign_accuracy(values: torch.Tensor, targets: torch.Tensor, group_index: torch.Tensor) -> float:
    """Over ALL sibling pairs (i < j, same group): the fraction with sign(g_i − g_j) = sign(y_i − y_j) in float32,
    as the authors' `cross_rollout_pairwise_sign_matches`: tied targets count as right only if g ties exactly,
    a tie in g with unequal targets as wrong. nan without pairs (theirs logs 0). values, targets, group_index [N]."""
    g, y, group = (t.detach().cpu() for t in (values.float(), targets.float(), group_index))
    pairs = (group[:, None] == group[None, :]).triu(diagonal=1)  # [N, N] same group, i < j
    if not bool(pairs.any()):
        return math.nan
    same_sign = torch.sign(g[:, None] - g[None, :]) == torch.sign(y[:, None] - y[None, :])  # [N, N]
    return float(same_sign[pairs].float().mean())


# ---- 6. The schedule: RLOO while the buffer fills, then the probe fitted on earlier steps ----
class PoiseBaseline:
    """Advantages for one training step at a time; holds the buffer, the probe and the step count."""

    def __init__(self, prompt_dim: int, bootstrap_steps: int = 16, buffer_size: int = 4096,
                 pca_prompt: int = 32, pca_response: int = 64, ridge_alpha: float = 100.0,
                 standardize_hidden: bool = False):
        self.prompt_dim, self.bootstrap_steps = prompt_dim, bootstrap_steps
        self.buffer = FeatureBuffer(buffer_size)
        self.probe = RidgeProbe(prompt_dim, pca_prompt, pca_response, ridge_alpha, standardize_hidden)
        self.step = 0  # calls to `advantages` so far

    def advantages(self, features: torch.Tensor, rewards: torch.Tensor, group_index: torch.Tensor):
        """features [N, 2H + 3], rewards [N], group_index [N] -> (advantages [N] float32, metrics).
        The probe used here was fitted before this step's rows entered the buffer."""
        self.step += 1
        targets = cross_rollout_targets(rewards, group_index)  # [N] y_i = mean_{j≠i} r_j
        metrics: dict[str, float] = {}
        use_probe = self.step > self.bootstrap_steps and self.probe.is_fitted
        if self.probe.is_fitted:  # judge the probe on rows it has not seen (also while bootstrapping)
            values = self.probe.predict(features).to(targets.device)  # [N] g(z_i)
            metrics.update(self._quality_metrics(values, targets, group_index))
        if use_probe:
            baselines = cross_rollout_baselines(values, group_index)  # [N] mean_{j≠i} g(z_j)
        else:
            baselines = targets  # RLOO: b_i = mean_{j≠i} r_j
        advantages = poise_advantages(rewards, baselines)  # [N]

        self.buffer.append(features, targets)
        start = time.perf_counter()
        self.probe.fit(self.buffer.features(), self.buffer.targets())
        metrics.update({"probe/refit_s": time.perf_counter() - start, "probe/used": float(use_probe),
                        "probe/buffer_rows": float(len(self.buffer))})
        return advantages, metrics

    def _quality_metrics(self, values, targets, group_index) -> dict[str, float]:
        """Metrics of g [N] against sibling-reward targets y [N] on this step's (unseen) rows. Brier skill
        is against the constant mean(y) of these rows (the authors' `regression_diagnostic_values`)."""
        quality = probe_quality(values, targets)
        y = targets.detach().double().cpu()  # [N]
        constant_brier = float((y - y.mean()).square().mean())
        brier = quality["rmse"] ** 2
        return {"probe/mae": quality["mae"], "probe/rmse": quality["rmse"], "probe/pearson": quality["pearson"],
                "probe/pair_sign_acc": pairwise_sign_accuracy(values, targets, group_index),
                "probe/brier_skill": 1 - brier / constant_brier if constant_brier > 1e-12 else math.nan}

    @torch.no_grad()
    def predict_values(self, features: torch.Tensor) -> torch.Tensor:
        """Prompt-level value V(x) ≈ g(z) from one rollout's features [N, F] -> [N] (evaluation)."""
        return self.probe.predict(features)

    def state_dict(self) -> dict:
        """Everything needed to resume exactly; tensors and numbers only (torch.load-safe)."""
        return {"step": self.step, "prompt_dim": self.prompt_dim, "buffer_features": self.buffer.features().clone(),
                "buffer_targets": self.buffer.targets().clone(), "probe": self.probe.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["prompt_dim"] != self.prompt_dim:
            raise ValueError(f"checkpoint has prompt_dim {state['prompt_dim']}, not {self.prompt_dim}")
        self.step = int(state["step"])
        self.buffer = FeatureBuffer(self.buffer.capacity)
        if len(state["buffer_targets"]):
            self.buffer.append(state["buffer_features"], state["buffer_targets"])
        self.probe.load_state_dict(state["probe"])


# ---- 7. The algorithm: features from the old-log-prob pass -> cross-rollout advantages over all ranks ----
class POISE(POISEFlags):
    """POISE as train.py's algorithm interface (see the module docstring). Its flags (probe layer, buffer, the
    authors' defaults for shared flags): algo_flags.POISEFlags, torch-free."""

    memory_parts = frozenset({"hidden states"})  # what the memory plan (memory.py) counts beside the actor

    def __init__(self, args, actor, tokenizer, device, world: int, checkpoint=None):
        self.args = args
        layers = actor.config.num_hidden_layers
        layer = args.probe_layer if args.probe_layer is not None else probe_layer_index(layers)
        if not 0 <= layer < layers:
            raise ValueError(f"--probe-layer {layer} out of range for a {layers}-layer model")
        self.baseline = PoiseBaseline(prompt_dim=actor.config.hidden_size, bootstrap_steps=args.probe_bootstrap_steps,
                                      standardize_hidden=args.probe_standardize_hidden)
        self.marker = tokenizer.encode("</think>", add_special_tokens=False)  # token sequence, as the authors' trainer
        self.open_marker = tokenizer.encode("<think>", add_special_tokens=False)
        self.warmup_steps, self.layer = 0, layer  # the actor's no-grad pass keeps decoder `layer`'s output

    def pool_features(self, mb, hidden: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """hidden [b, T, H] of one micro-batch, entropy [b, R] -> features z [b, 2H + 3] (`rollout_features`)."""
        return rollout_features(*_right_align(hidden, mb), entropy * mb.response_mask,
                                *think_spans(mb, self.open_marker, self.marker))

    def features(self, batch, passes) -> torch.Tensor:
        """Step 1 on the actor's no-grad pass (`passes`: actor.old_logprob_passes with hidden_layer=self.layer, which
        fills the old log-probs on the way): each micro-batch pooled as it comes. -> z [N, 2H + 3]."""
        features = None
        for idx, mb, hidden, entropy in passes:
            f = self.pool_features(mb, hidden, entropy)  # [b, F]
            features = torch.zeros(len(batch), f.shape[1]) if features is None else features
            features[idx] = f
        return features

    def sample(self, problems, prompt_ids, step):
        samples, rewards = step.generate([self.args.rollouts_per_prompt] * len(prompt_ids), step.seed)  # G per prompt
        return samples, rewards, {}, {}

    def advantages(self, batch, problems, step) -> tuple[torch.Tensor, dict]:
        """Features from the actor's pass; every rank gathers all ranks' (features, rewards, groups), computes the
        same advantages (and refits the same probe), and keeps its own rows. -> (token advantages [N, R], metrics)."""
        t = time.time()
        features = self.features(batch, step.actor_passes(batch, hidden_layer=self.layer))  # [N, F]
        seconds = time.time() - t
        rows = step.all_gather((features, batch.rewards, batch.group_index))
        group_offsets = [0]
        for _, _, groups in rows:
            group_offsets.append(group_offsets[-1] + int(groups.max()) + 1)
        features = torch.cat([f for f, _, _ in rows])  # [N_all, F]
        rewards = torch.cat([r for _, r, _ in rows])  # [N_all]
        group_index = torch.cat([g + off for (_, _, g), off in zip(rows, group_offsets)])  # [N_all] globally unique
        advantages, metrics = self.baseline.advantages(features, rewards, group_index)  # [N_all]
        first = sum(len(r) for _, r, _ in rows[:step.rank])
        metrics["time/features"] = seconds  # the actor's pass with the hidden states, and their pooling
        return broadcast_to_tokens(advantages[first:first + len(batch)].float(), batch.response_mask), metrics

    def after_update(self, batch, step) -> dict: return {}  # the probe was refitted on this step's rows in `advantages`

    def feature_settings(self) -> dict:
        """What shapes the probe's features: saved with its state, so a reader of the checkpoint builds the same."""
        return {"probe_layer": self.layer, "probe_standardize_hidden": bool(self.args.probe_standardize_hidden)}

    def state_dict(self) -> dict: return {"poise": self.baseline.state_dict(), "features": self.feature_settings()}

    def load_state_dict(self, state: dict) -> None:
        """The fitted probe and its buffer; refused (naming the flag) when its features were made otherwise."""
        ours = self.feature_settings()
        for name, saved in state.get("features", {}).items():  # absent: a checkpoint from before they were saved
            if saved != ours[name]:
                raise ValueError(f"the probe was fitted on --{name.replace('_', '-')} {saved} features, not "
                                 f"{ours[name]}; build POISE with the run's settings")
        self.baseline.load_state_dict(state["poise"])
    def save(self, folder) -> None: pass
    def close(self) -> None: pass
