"""`eval.py baselines`: the truth's noise correction, the bootstrap and its pairing, each method's baselines and
costs."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tools.baseline_stats import (Method, bootstrap_summary, critic_method, group_mean_methods, per_prompt_terms,
                                  poise_method, spearman_rows, truth_from_rewards, v05_methods)
from tools.baselines import judged_values

ROOT = Path(__file__).resolve().parents[1]


def terms_of(sq_error, estimate=None, truth=None):
    """Per-prompt terms of a method whose squared error per prompt is given (the other terms derived from it)."""
    sq_error = np.asarray(sq_error, dtype=np.float64)
    estimate = sq_error if estimate is None else np.asarray(estimate, dtype=np.float64)
    zeros = np.zeros_like(sq_error)
    return {"sq_error": sq_error, "error": sq_error, "estimate": estimate, "advantage_sq": sq_error,
            "policy_tokens": zeros, "critic_tokens": zeros}


# ---------------------------------------------------------------------------------------------
# The truth and the MSE correction


def test_truth_standard_error_is_the_unbiased_variance_over_m():
    value, se2 = truth_from_rewards([[1, 0, 1, 1], [0, 0, 0, 0]])
    assert value.tolist() == [0.75, 0.0]
    # deviations 0.25, -0.75, 0.25, 0.25: squares sum 0.75, / (M - 1) = 0.25, / M = 0.0625
    assert se2.tolist() == pytest.approx([0.0625, 0.0])
    with pytest.raises(ValueError, match="2 samples"):
        truth_from_rewards([[1], [0]])


def test_corrected_mse_of_the_exact_value_is_zero_and_of_a_replica_is_its_sampling_error():
    """The truth is an M-sample mean. A method that IS the true p scores MSE ~ 0 after the correction (~ p(1-p)/M
    before it); a method that is another independent M-sample mean scores ~ its own sampling error p(1-p)/M."""
    rng = np.random.default_rng(0)
    P, M = 40000, 4
    p = rng.uniform(0.05, 0.95, P)
    truth, se2 = truth_from_rewards((rng.random((P, M)) < p[:, None]).astype(float).tolist())
    replica = (rng.random((P, M)) < p[:, None]).mean(1)
    sampling_error = float((p * (1 - p)).mean() / M)  # ~ 0.052
    exact = per_prompt_terms(Method("exact", "oracle", [[x] for x in p], [[0.0]] * P, [0] * P, [0] * P), truth, se2)
    again = per_prompt_terms(Method("replica", "mc", [[x] for x in replica], [[0.0]] * P, [0] * P, [0] * P), truth, se2)
    assert abs(exact["sq_error"].mean()) < 0.0015
    assert again["sq_error"].mean() == pytest.approx(sampling_error, abs=0.0015)
    # uncorrected: the truth's noise
    assert (exact["sq_error"] + se2).mean() == pytest.approx(sampling_error, abs=0.0015)
    assert abs(exact["error"].mean()) < 0.003  # the truth's noise has mean 0: no bias


def test_per_prompt_terms_hand_case():
    """Prompt 0: baselines [0.5, 1.0] on rewards [1, 0] with V = 0.5, se² = 0.01; prompt 1: one value 0.2, V = 0."""
    method = Method("m", "x", [[0.5, 1.0], [0.2, 0.2]], [[1.0, 0.0], [0.0, 1.0]], [30, 0], [0, 7])
    t = per_prompt_terms(method, np.array([0.5, 0.0]), np.array([0.01, 0.0]))
    assert t["estimate"].tolist() == pytest.approx([0.75, 0.2])
    assert t["sq_error"].tolist() == pytest.approx([(0 + 0.25) / 2 - 0.01, 0.04])
    assert t["error"].tolist() == pytest.approx([0.25, 0.2])
    assert t["advantage_sq"].tolist() == pytest.approx([(0.25 + 1.0) / 2, (0.04 + 0.64) / 2])
    assert t["policy_tokens"].tolist() == [30, 0] and t["critic_tokens"].tolist() == [0, 7]


# ---------------------------------------------------------------------------------------------
# Bootstrap intervals, pairing, Spearman


def test_bootstrap_interval_covers_the_known_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered, widths = 0, []
    for rep in range(200):
        x = rng.exponential(0.1, 80)  # a skewed per-prompt error with known mean 0.1
        s = bootstrap_summary({"m": terms_of(x)}, rng.random(80), reference="none", draws=400, seed=rep)
        lo, hi = s["m"]["mse"]["ci"]
        covered += lo <= 0.1 <= hi
        widths.append(hi - lo)
        assert s["m"]["mse"]["value"] == pytest.approx(x.mean())
    assert 0.88 <= covered / 200 <= 0.99
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 0.1 / np.sqrt(80), rel=0.15)  # the normal-theory width


def test_paired_difference_uses_the_same_resamples():
    """Two methods share a large per-prompt error and differ by 0.02 everywhere: the paired interval of the difference
    is tight around 0.02 and excludes 0, though each method's own interval is ~ ±0.2 wide."""
    rng = np.random.default_rng(2)
    shared = rng.normal(1.0, 1.0, 100)
    truth = rng.random(100)
    s = bootstrap_summary({"ref": terms_of(shared, truth), "m": terms_of(shared + 0.02, truth + 0.001 * shared)},
                          truth, reference="ref", draws=500, seed=0)
    lo, hi = s["m"]["vs_reference"]["mse"]["ci"]
    assert s["m"]["vs_reference"]["mse"]["value"] == pytest.approx(0.02)
    assert lo == pytest.approx(0.02) and hi == pytest.approx(0.02)  # method − reference, exact pairs
    own_lo, own_hi = s["m"]["mse"]["ci"]
    assert own_hi - own_lo > 0.2 and own_lo < shared.mean() + 0.02 < own_hi
    assert s["ref"]["vs_reference"]["mse"]["ci"] == [0.0, 0.0]


def test_spearman_rows_ties_and_constants():
    from scipy.stats import spearmanr
    x = np.array([[0.1, 0.4, 0.4, 0.9, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    y = np.array([[0.0, 0.5, 0.25, 0.25, 0.0], [0.0, 0.5, 0.25, 0.25, 0.0]])
    r = spearman_rows(x, y)
    assert r[0] == pytest.approx(spearmanr(x[0], y[0]).statistic)
    assert np.isnan(r[1])  # a constant estimate has no rank correlation
    assert spearman_rows(np.array([[3.0, 1.0, 2.0]]), np.array([[30.0, 10.0, 20.0]]))[0] == pytest.approx(1.0)
    assert spearman_rows(np.array([[3.0, 1.0, 2.0]]), np.array([[10.0, 30.0, 20.0]]))[0] == pytest.approx(-1.0)


# ---------------------------------------------------------------------------------------------
# Each method's baselines and cost accounting


POOL_REWARDS = [[1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0] * 2, [0.0] * 16]
POOL_TOKENS = [[10 * (i + 1) for i in range(16)], [1] * 16]


def test_group_means_count_the_first_g_rollouts():
    methods = {m.name: m for m in group_mean_methods(POOL_REWARDS, POOL_TOKENS, sizes=(2, 4))}
    assert set(methods) == {"GRPO G=2", "RLOO G=2", "GRPO G=4", "RLOO G=4"}
    assert methods["GRPO G=2"].policy_tokens == [10 + 20, 2] and methods["RLOO G=4"].policy_tokens == [100, 4]
    assert methods["GRPO G=4"].baselines[0] == pytest.approx([0.75] * 4)  # the group mean, self included
    assert methods["RLOO G=4"].baselines[0] == pytest.approx([2 / 3, 1.0, 2 / 3, 2 / 3])  # the others' mean
    assert methods["RLOO G=2"].baselines[0] == pytest.approx([0.0, 1.0])
    assert methods["GRPO G=4"].rewards[0] == [1.0, 0.0, 1.0, 1.0] and methods["GRPO G=4"].critic_tokens == [0, 0]


def test_v05_counts_exactly_the_rollouts_osla_asked_for():
    prior_values = [0.0, 0.0]  # right for prompt 1 (never solved), far off for prompt 0 (solved 5 of 8)
    methods = {m.name: m for m in v05_methods(prior_values, [12.5, 3.0], POOL_REWARDS, POOL_TOKENS)}
    alone, fixed, osla = (methods["V0.5 prior alone"], methods["V0.5 prior + fusion, 4 rollouts"],
                          methods["V0.5 prior + fusion + OSLA"])
    assert alone.policy_tokens == [0, 0] and alone.critic_tokens == [12.5, 3.0] and alone.baselines[1] == [0.0] * 8
    assert fixed.policy_tokens == [100, 4] and [len(r) for r in fixed.rewards] == [4, 4]
    counts = [len(r) for r in osla.rewards]
    assert counts[0] > 4 and counts[1] == 4  # the rejected prior gets more rollouts, the accepted one stops at n0
    assert osla.policy_tokens == [sum(POOL_TOKENS[0][:counts[0]]), 4]
    assert osla.rewards[0] == POOL_REWARDS[0][:counts[0]]  # served from the pool in order
    assert osla.baselines[1] == pytest.approx([0.0] * 4)  # the prior kept (fusion weight 0 on an accepted prior)
    assert osla.critic_tokens == [12.5, 3.0]


def test_poise_baseline_is_the_siblings_probe_value():
    m = poise_method([[0.2, 0.6], [0.1, 0.1]], POOL_REWARDS, POOL_TOKENS)
    assert m.baselines[0] == pytest.approx([0.6, 0.2]) and m.baselines[1] == pytest.approx([0.1, 0.1])
    assert m.policy_tokens == [30, 2] and m.critic_tokens == [0, 0] and m.rewards == [[1.0, 0.0], [0.0, 0.0]]


def test_critic_cost_is_read_plus_generated_and_no_policy_tokens():
    m = critic_method("c", "genac", [0.3, 0.7], [50, 60], [5, 0], POOL_REWARDS)
    assert m.policy_tokens == [0, 0] and m.critic_tokens == [55, 60] and m.critic_generated == [5, 0]
    assert m.baselines[0] == [0.3] * 8 and m.rewards[0] == POOL_REWARDS[0][:8]


def test_judged_values_counts_critic_tokens_and_falls_back_to_tau():
    class FakeCritic:  # pure-logic stand-in for genac.GenAC: its judge's return shape
        def judge(self, problems, partials, seed):
            prompts = [[1] * (10 + len(q) + len(y)) for q, y in zip(problems, partials)]
            samples = [SimpleNamespace(token_ids=[7] * n) for n in (3, 4)]
            return prompts, samples, [0.8, None]

        def fallback_value(self):
            return 0.25

    values, read, generated, failures = judged_values(FakeCritic(), ["ab", "abc"], ["", "xy"], seed=0)
    assert values == [0.8, 0.25] and read == [12, 15] and generated == [3, 4] and failures == 1


# ---------------------------------------------------------------------------------------------
# The command


@pytest.mark.slow  # starts processes that import torch / train.py
def test_baselines_cli_rejects_bad_sizes():
    for flags, message in ((["--prompts", "1"], "--prompts must be >= 2"),
                           (["--truth-samples", "1"], "--truth-samples must be >= 2"),
                           (["--prompts", "10", "--path-prompts", "11"],
                            "--path-prompts (11) must be <= --prompts (10)"),
                           (["--fit-prompts", "8", "--critic-iterations", "3"], "must cover --critic-iterations")):
        r = subprocess.run([sys.executable, str(ROOT / "eval.py"), "baselines", *flags], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr, (flags, r.stderr[-500:])


def test_baselines_cli_end_to_end(tiny_model, tmp_path):
    """Real vLLM, a tiny random policy: every algorithm in the table, JSON with intervals, the plot."""
    pytest.importorskip("vllm")
    out = tmp_path / "bench"
    cmd = [sys.executable, str(ROOT / "eval.py"), "baselines", "--policy", tiny_model, "--prompts", "6",
           "--truth-samples", "4",
           "--fit-prompts", "8", "--critic-iterations", "1", "--path-prompts", "2", "--path-samples", "2",
           "--max-new-tokens", "12", "--bootstrap", "50", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "baselines.json").read_text())
    algorithms = {m["algorithm"] for m in doc["methods"].values()}
    assert algorithms == {"grpo", "rloo", "v05", "poise", "ppo", "vcppo", "genac"}
    assert doc["meta"]["prompts"] == 6 and len(doc["truth"]["values"]) == 6
    for name, m in doc["methods"].items():
        assert m["mse"]["ci"][0] <= m["mse"]["value"] <= m["mse"]["ci"][1], name
        assert "vs_reference" in m and len(m["estimates"]) == 6
    assert doc["methods"]["GRPO G=8"]["vs_reference"]["mse"] == {"value": 0.0, "ci": [0.0, 0.0]}
    assert doc["methods"]["GRPO G=16"]["policy_tokens"]["value"] > doc["methods"]["GRPO G=2"]["policy_tokens"]["value"]
    assert set(doc["path_states"]["results"]) >= {"PPO critic, fresh head", "dataset mean"}
    assert "| GRPO G=8 |" in r.stdout and (out / "baselines_mse_vs_tokens.png").stat().st_size > 1000
