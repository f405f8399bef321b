"""Tests for probe.py (POISE): features, the `</think>` marker, flags, probe fit, buffer, cross-rollout baselines,
metrics, schedule, and unbiasedness of the cross-rollout policy gradient on a toy bandit. Seeded; runs in seconds."""

import copy
import io
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from probe import (POISE, FeatureBuffer, PoiseBaseline, RidgeProbe, cross_rollout_baselines,  # noqa: E402
                   cross_rollout_targets, pairwise_sign_accuracy, poise_advantages, probe_layer_index,
                   probe_quality, rollout_features, think_spans)


def leave_one_out_reference(values, group_index):
    """Plain-loop mean over siblings, the definition the vectorised code must match."""
    out = []
    for i in range(len(values)):
        siblings = [float(values[j]) for j in range(len(values))
                    if j != i and group_index[j] == group_index[i]]
        out.append(sum(siblings) / len(siblings))
    return torch.tensor(out)


def random_step(gen, prompts=8, group_size=2, hidden=8):
    """Features [N, 2H+3] whose response block carries the reward, rewards [N], group_index [N]."""
    n = prompts * group_size
    prompt_block = torch.randn(prompts, hidden, generator=gen).repeat_interleave(group_size, 0)
    skill = prompt_block[:, 0].sigmoid()
    rewards = (torch.rand(n, generator=gen) < skill).float()
    response_block = torch.randn(n, hidden, generator=gen) + rewards[:, None]
    entropies = torch.rand(n, 3, generator=gen)
    features = torch.cat([prompt_block, response_block, entropies], 1)
    return features, rewards, torch.arange(prompts).repeat_interleave(group_size)


# ----------------------------------------------------------------------------------------------
# Layer choice and features


def test_probe_layer_index():
    assert probe_layer_index(36) == 19  # authors' Qwen3-4B layer
    assert probe_layer_index(30) == 16  # SmolLM2-135M
    assert probe_layer_index(1) == 0


def test_rollout_features_hand_made():
    H, T, pad = 2, 40, 1e6
    position = torch.arange(T, dtype=torch.float32)
    hidden = torch.stack([position, 100 + position], dim=1).repeat(4, 1, 1)  # [4, T, 2]: channel = pos
    prompt_lens = torch.tensor([12, 4, 5, 6])
    response_lens = torch.tensor([15, 20, 30, 0])
    reasoning_end = torch.tensor([15, 8, 14, 0])  # row 0: no marker; rows 1-2: marker; row 3: empty
    spans = torch.tensor([[0, 0, 15], [0, 6, 8], [3, 12, 14], [0, 0, 0]])  # (s, e, a): reasoning [s, e), answer [a, R)
    for i in range(4):  # padding past the response must never be read
        hidden[i, prompt_lens[i] + response_lens[i]:] = pad
    entropy = torch.full((4, 32), 999.0)  # garbage past each response
    entropy[0, :15] = torch.arange(15.0)
    entropy[1, :20] = torch.cat([torch.full((8,), 1.0), torch.full((12,), 3.0)])
    entropy[2, :30] = torch.cat([torch.full((3,), 5.0), torch.full((11,), 2.0), torch.full((16,), 4.0)])

    z = rollout_features(hidden.bfloat16(), prompt_lens, response_lens, entropy, reasoning_end, spans)
    assert z.shape == (4, 2 * H + 3) and z.dtype == torch.float32
    # prompt: last 10 prompt tokens (fewer when the prompt is shorter)
    torch.testing.assert_close(z[:, 0], torch.tensor([6.5, 1.5, 2.0, 2.5]))  # (2..11), (0..3), (0..4), (0..5)
    torch.testing.assert_close(z[:, 1], 100 + torch.tensor([6.5, 1.5, 2.0, 2.5]))
    # response: last 10 tokens ending at reasoning_end (positions prompt_len + [E−10, E))
    torch.testing.assert_close(z[:, 2], torch.tensor([21.5, 7.5, 13.5, 0.0]))  # (17..26), (4..11), (9..18), ∅
    torch.testing.assert_close(z[3, 3], torch.tensor(0.0))  # zero-length response: zeros, not NaN
    # entropies: whole response, reasoning span [s, e), answer span [a, R); a missing span is 0.0
    torch.testing.assert_close(z[0, 4:], torch.tensor([7.0, 0.0, 0.0]))  # no marker
    torch.testing.assert_close(z[1, 4:], torch.tensor([(8 + 36) / 20, 1.0, 3.0]))
    torch.testing.assert_close(z[2, 4:], torch.tensor([(15 + 22 + 64) / 30, 2.0, 4.0]))  # tags (3, 2 tokens) excluded
    torch.testing.assert_close(z[3, 4:], torch.zeros(3))
    assert torch.isfinite(z).all()


def test_rollout_features_rejects_bad_marker():
    hidden = torch.zeros(1, 10, 2)
    with pytest.raises(ValueError):
        rollout_features(hidden, torch.tensor([3]), torch.tensor([4]), torch.zeros(1, 4), torch.tensor([5]),
                         torch.tensor([[0, 0, 4]]))
    with pytest.raises(ValueError):  # an answer span starting before the reasoning span ends
        rollout_features(hidden, torch.tensor([3]), torch.tensor([4]), torch.zeros(1, 4), torch.tensor([4]),
                         torch.tensor([[0, 3, 2]]))


@pytest.fixture(scope="module")
def smollm2_tokenizer(default_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_model)


def poise_algorithm(tokenizer, *flags):
    """POISE from train.py's real flags, with a real tokenizer and a stand-in actor (its config only)."""
    import train
    args = train.parse_args(["--algo", "poise", *flags])
    actor = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=30, hidden_size=8))
    return POISE(args, actor, tokenizer, "cpu", 1)


def test_think_marker_searched_as_token_sequence(smollm2_tokenizer):
    """SmolLM2 has no `</think>` vocabulary entry: it encodes as '</' 'think' '>'. The authors' trainer
    searches that token sequence anyway; E must end right after it (and be R without a marker)."""
    tok = smollm2_tokenizer
    poise = poise_algorithm(tok)
    marker = tok.encode("</think>", add_special_tokens=False)
    assert len(marker) > 1 and "</think>" not in tok.get_vocab()
    assert poise.marker == marker
    with_marker = tok.encode("Let me think. 2+2 is 4.</think> The answer is 4.", add_special_tokens=False)
    without = tok.encode("The answer is 4.", add_special_tokens=False)
    cut = next(j for j in range(len(with_marker)) if with_marker[j:j + len(marker)] == marker)
    assert tok.decode(with_marker[:cut + len(marker)]).endswith("</think>")
    R = max(len(with_marker), len(without))
    mb = SimpleNamespace(response_ids=torch.tensor([with_marker, without + [0] * (R - len(without))]),
                         response_lens=torch.tensor([len(with_marker), len(without)]))
    ends, spans = think_spans(mb, poise.open_marker, poise.marker)
    assert ends.tolist() == [cut + len(marker), len(without)]
    assert spans.tolist() == [[0, cut, cut + len(marker)], [0, 0, len(without)]]


OPEN, CLOSE = [7, 8], [9, 8]  # multi-token markers, like SmolLM2's '<', 'think', '>'


@pytest.mark.parametrize("response,reasoning,answer", [
    # 0 markers: no reasoning and no answer span -> 0.0 each (not the whole response)
    ([1, 2, 3, 4], 0.0, 0.0),
    # 1 marker pair: reasoning = tokens 2, 3 (entropies 3, 4); answer = tokens 6, 7, 8 (7, 8, 9); tags excluded
    (OPEN + [1, 2] + CLOSE + [3, 4, 5], (3 + 4) / 2, (7 + 8 + 9) / 3),
    # 2 `</think>`: the FIRST one splits; reasoning = token 2 (3); answer = tokens 5..8 incl. the 2nd marker (6..9)
    (OPEN + [1] + CLOSE + [2] + CLOSE + [3], 3.0, (6 + 7 + 8 + 9) / 4),
    # a `</think>` without `<think>` (opened by the chat template): reasoning from token 0 (1, 2); answer token 4 (5)
    ([1, 2] + CLOSE + [3], (1 + 2) / 2, 5.0),
    # `</think>` as the very last tokens: the answer span is missing -> 0.0
    (OPEN + [1, 2, 3] + CLOSE, (3 + 4 + 5) / 3, 0.0),
])
def test_entropy_spans_follow_the_authors_split(response, reasoning, answer):
    R = len(response)
    mb = SimpleNamespace(response_ids=torch.tensor([response + [0] * 3]), response_lens=torch.tensor([R]))
    ends, spans = think_spans(mb, OPEN, CLOSE)
    entropy = torch.arange(1.0, R + 4).unsqueeze(0)  # token t has entropy t + 1 (3 padding values never read)
    hidden = torch.zeros(1, 2 + R, 2)
    z = rollout_features(hidden, torch.tensor([2]), torch.tensor([R]), entropy, ends, spans)
    torch.testing.assert_close(z[0, 4:], torch.tensor([(R + 1) / 2, reasoning, answer]))


def test_poise_flags_clip_higher_and_standardize_hidden(smollm2_tokenizer):
    """POISE defaults to the authors' clip-higher 0.28 (other algorithms keep 0.2; an explicit flag wins),
    and `--probe-standardize-hidden` reaches the probe (default off: the authors' PCA on raw states)."""
    import train
    assert train.parse_args(["--algo", "poise"]).clip_high == 0.28
    assert train.parse_args(["--algo", "grpo"]).clip_high == 0.2
    assert train.parse_args(["--algo", "poise", "--clip-high", "0.2"]).clip_high == 0.2
    poise, grpo = train.parse_args(["--algo", "poise"]), train.parse_args(["--algo", "grpo"])
    assert (poise.clip_ratio_c, poise.mini_batches) == (10.0, 8) and (grpo.clip_ratio_c, grpo.mini_batches) == (3.0, 2)
    assert poise_algorithm(smollm2_tokenizer).baseline.probe.standardize_hidden is False
    assert poise_algorithm(smollm2_tokenizer, "--probe-standardize-hidden").baseline.probe.standardize_hidden is True


# ----------------------------------------------------------------------------------------------
# The probe: PCA + ridge against float64 references


def numpy_reference_probe(x, y, x_new, H, k_prompt, k_response, alpha, standardize_hidden=True):
    """Independent numpy version: standardise, PCA via SVD, unit-variance scores, ridge, clip."""
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)
    if not standardize_hidden:
        std[:2 * H] = 1.0
    z, z_new = (x - mean) / std, (x_new - mean) / std

    def scores(block, block_new, k):
        _, s, vt = np.linalg.svd(block, full_matrices=False)
        scale = s[:k] / np.sqrt(len(block))
        return block @ vt[:k].T / scale, block_new @ vt[:k].T / scale

    p, p_new = scores(z[:, :H], z_new[:, :H], k_prompt)
    r, r_new = scores(z[:, H:2 * H], z_new[:, H:2 * H], k_response)
    d = np.concatenate([p, r, z[:, 2 * H:]], 1)
    d_new = np.concatenate([p_new, r_new, z_new[:, 2 * H:]], 1)
    dm, ym = d.mean(0), y.mean()
    w = np.linalg.solve((d - dm).T @ (d - dm) + alpha * np.eye(d.shape[1]), (d - dm).T @ (y - ym))
    return np.clip(d_new @ w + ym - dm @ w, 0, 1)


def low_rank_features(gen, n, H):
    """Features with a decaying spectrum so the top principal axes are well separated."""
    factors = torch.randn(n, 12, generator=gen) * torch.logspace(0.5, -1, 12)
    x = factors @ torch.randn(12, 2 * H + 3, generator=gen) + 0.05 * torch.randn(n, 2 * H + 3, generator=gen)
    y = (0.5 + 0.15 * factors[:, 0] - 0.1 * factors[:, 3] + 0.05 * torch.randn(n, generator=gen)).clamp(0, 1)
    return x.double(), y.double()


def test_ridge_probe_matches_numpy_closed_form():
    gen = torch.Generator().manual_seed(1)
    H = 30
    x, y = low_rank_features(gen, 400, H)
    x_new, _ = low_rank_features(gen, 50, H)
    x32, x_new32 = x.float(), x_new.float()
    for standardize_hidden in (True, False):  # standardise then PCA, and the authors' order (PCA on raw states)
        probe = RidgeProbe(H, 5, 8, ridge_alpha=100.0, standardize_hidden=standardize_hidden).fit(x32, y)
        expected = numpy_reference_probe(x32.double().numpy(), y.numpy(), x_new32.double().numpy(),
                                         H, 5, 8, 100.0, standardize_hidden)
        np.testing.assert_allclose(probe.predict(x_new32).numpy(), expected, atol=1e-5)
    probe = RidgeProbe(H, pca_prompt=5, pca_response=8, ridge_alpha=100.0).fit(x32, y)
    # a different α must give a different answer (the comparison above is not vacuous)
    other = RidgeProbe(H, pca_prompt=5, pca_response=8, ridge_alpha=1e4).fit(x32, y)
    assert (other.predict(x_new32) - probe.predict(x_new32)).abs().max() > 1e-3


def authors_order_probe(x, y, x_new, H, k_prompt, k_response, alpha):
    """The authors' pipeline by hand in numpy: centre each raw hidden block -> PCA (SVD) -> StandardScaler on
    [prompt scores | response scores | entropies] -> ridge with an unpenalised intercept -> clip."""
    def pca_scores(block, block_new, k):
        mean = block.mean(0)
        _, _, vt = np.linalg.svd(block - mean, full_matrices=False)
        return (block - mean) @ vt[:k].T, (block_new - mean) @ vt[:k].T

    p, p_new = pca_scores(x[:, :H], x_new[:, :H], k_prompt)
    r, r_new = pca_scores(x[:, H:2 * H], x_new[:, H:2 * H], k_response)
    d, d_new = np.concatenate([p, r, x[:, 2 * H:]], 1), np.concatenate([p_new, r_new, x_new[:, 2 * H:]], 1)
    mean, std = d.mean(0), d.std(0)
    d, d_new = (d - mean) / std, (d_new - mean) / std  # every design column now has mean 0, std 1
    w = np.linalg.solve(d.T @ d + alpha * np.eye(d.shape[1]), d.T @ (y - y.mean()))
    return np.clip(d_new @ w + y.mean(), 0, 1)


def test_ridge_probe_default_is_authors_order_pca_on_raw_states():
    """Hidden dims on scales 0.01..100: the default probe must equal centre -> PCA -> standardise scores ->
    ridge (the authors' order), and differ from standardising every hidden dim before PCA."""
    gen = torch.Generator().manual_seed(11)
    H, n = 20, 300
    factors = torch.randn(n + 60, 6, generator=gen, dtype=torch.float64)
    hidden = factors @ torch.randn(6, 2 * H, generator=gen, dtype=torch.float64)
    hidden = (hidden + 0.1 * torch.randn(n + 60, 2 * H, generator=gen, dtype=torch.float64))
    hidden = hidden * torch.logspace(-2, 2, H, dtype=torch.float64).repeat(2)  # very unequal scales
    x = torch.cat([hidden, torch.rand(n + 60, 3, generator=gen, dtype=torch.float64)], 1).float()
    y = (0.5 + 0.2 * factors[:n, 0].tanh() - 0.1 * factors[:n, 4].tanh()).clamp(0, 1)
    x_fit, x_new = x[:n], x[n:]
    expected = authors_order_probe(x_fit.double().numpy(), y.numpy(), x_new.double().numpy(), H, 3, 4, 10.0)
    default = RidgeProbe(H, pca_prompt=3, pca_response=4, ridge_alpha=10.0).fit(x_fit, y).predict(x_new)
    np.testing.assert_allclose(default.numpy(), expected, atol=1e-5)
    scaled_first = RidgeProbe(H, 3, 4, 10.0, standardize_hidden=True).fit(x_fit, y).predict(x_new)
    assert (scaled_first - default).abs().max() > 1e-2  # the other order is a different probe here
    assert PoiseBaseline(prompt_dim=H).probe.standardize_hidden is False  # POISE's probe uses the same default


def test_ridge_probe_with_all_dims_and_tiny_alpha_is_least_squares():
    gen = torch.Generator().manual_seed(2)
    H, n = 5, 200
    x = torch.randn(n + 40, 2 * H + 3, generator=gen, dtype=torch.float64)
    y = 0.5 + 0.03 * (x @ torch.randn(2 * H + 3, generator=gen, dtype=torch.float64))
    y = (y + 0.02 * torch.randn(n + 40, generator=gen, dtype=torch.float64)).clamp(0, 1)
    probe = RidgeProbe(H, pca_prompt=H, pca_response=H, ridge_alpha=1e-9).fit(x[:n].float(), y[:n])
    a = np.concatenate([np.ones((n, 1)), x[:n].float().double().numpy()], 1)
    coef, *_ = np.linalg.lstsq(a, y[:n].numpy(), rcond=None)
    test = np.concatenate([np.ones((40, 1)), x[n:].float().double().numpy()], 1)
    np.testing.assert_allclose(probe.predict(x[n:].float()).numpy(), np.clip(test @ coef, 0, 1), atol=1e-5)


def test_ridge_probe_caps_dims_by_rows_and_rank():
    gen = torch.Generator().manual_seed(3)
    features, rewards, group = random_step(gen, prompts=3, hidden=16)  # 6 rows, 3 distinct prompts
    probe = RidgeProbe(16).fit(features, cross_rollout_targets(rewards, group))
    assert probe.params["prompt_axes"].shape == (16, 2)  # rank of 3 centred distinct prompts
    assert probe.params["response_axes"].shape == (16, 5)  # rows − 1
    prediction = probe.predict(features)
    assert torch.isfinite(prediction).all() and (prediction >= 0).all() and (prediction <= 1).all()


# ----------------------------------------------------------------------------------------------
# Buffer, targets, baselines, metrics


def test_feature_buffer_fifo():
    buffer = FeatureBuffer(capacity=5)
    rows = torch.arange(9, dtype=torch.float32)
    buffer.append(rows[:3, None].repeat(1, 2), rows[:3])
    assert len(buffer) == 3
    buffer.append(rows[3:7, None].repeat(1, 2), rows[3:7])
    assert buffer.targets().tolist() == [2, 3, 4, 5, 6]  # oldest two dropped, order kept
    assert buffer.features()[:, 0].tolist() == [2, 3, 4, 5, 6]
    buffer.append(rows[:, None].repeat(1, 2), rows)  # more than the capacity at once
    assert buffer.targets().tolist() == [4, 5, 6, 7, 8]


def test_cross_rollout_targets_and_baselines_uneven_groups():
    values = torch.tensor([0.1, 0.9, 0.4, 1.0, 0.0, 0.0, 0.5, 0.7, 0.2])
    group = torch.tensor([7, 3, 7, 3, 3, 11, 11, 11, 11])  # sizes 2, 3, 4; ids not contiguous
    expected = leave_one_out_reference(values, group)
    torch.testing.assert_close(cross_rollout_targets(values, group), expected)
    torch.testing.assert_close(cross_rollout_baselines(values, group), expected)
    torch.testing.assert_close(poise_advantages(values, expected), values - expected)
    with pytest.raises(ValueError, match="at least 2"):
        cross_rollout_targets(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


def test_own_features_never_enter_own_baseline():
    gen = torch.Generator().manual_seed(5)
    poise = PoiseBaseline(prompt_dim=8, bootstrap_steps=1)
    poise.advantages(*random_step(gen, prompts=8, group_size=3))  # bootstrap step; probe now fitted
    features, rewards, group = random_step(gen, prompts=8, group_size=3)
    saved = copy.deepcopy(poise.state_dict())
    adv, metrics = poise.advantages(features, rewards, group)
    assert metrics["probe/used"] == 1.0
    perturbed = features.clone()
    perturbed[0] += 3 * torch.randn(features.shape[1], generator=gen)
    poise.load_state_dict(saved)
    adv_perturbed, _ = poise.advantages(perturbed, rewards, group)
    torch.testing.assert_close(adv_perturbed[0], adv[0], atol=1e-6, rtol=0)  # b_0 ignores z_0
    assert (adv_perturbed[1:3] - adv[1:3]).abs().min() > 1e-4  # siblings' baselines use z_0
    torch.testing.assert_close(adv_perturbed[3:], adv[3:])  # other prompts untouched


def test_probe_quality_and_pair_sign_accuracy():
    quality = probe_quality(torch.tensor([0.0, 0.5, 1.0, float("nan")]), torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert quality["mae"] == pytest.approx(1 / 6)
    assert quality["rmse"] == pytest.approx(math.sqrt(0.25 / 3))
    assert quality["pearson"] == pytest.approx(np.corrcoef([0, 0.5, 1], [0, 1, 1])[0, 1])
    assert math.isnan(probe_quality(torch.ones(4), torch.tensor([0.0, 1, 0, 1]))["pearson"])
    values = torch.tensor([0.2, 0.8, 0.6, 0.4, 0.3, 0.3, 0.5, 0.5])
    targets = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    group = torch.arange(4).repeat_interleave(2)  # right, wrong, tie in both = right, tie in g only = wrong
    assert pairwise_sign_accuracy(values, targets, group) == pytest.approx(2 / 4)


def test_pair_sign_accuracy_counts_tied_targets_like_the_authors():
    """Every sibling pair counts (the authors' `cross_rollout_pairwise_sign_matches`): equal targets are
    right only when g is exactly equal too. Hand count over 1 + 1 + 3 pairs."""
    values = torch.tensor([0.3, 0.3, 0.1, 0.9, 0.2, 0.7, 0.7])
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.5, 0.5])  # G = 3 group: targets 0, 0.5, 0.5
    group = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    # (0,1) tied both: right; (2,3) tied targets, g differs: wrong;
    # group 2: (4,5) 0.2<0.7 & 0<0.5 right, (4,6) right, (5,6) tied both: right  -> 4 of 5
    assert pairwise_sign_accuracy(values, targets, group) == pytest.approx(4 / 5)
    assert pairwise_sign_accuracy(values[2:4], targets[2:4], group[2:4]) == 0.0  # only a tied-target pair
    assert math.isnan(pairwise_sign_accuracy(values[:1], targets[:1], group[:1]))  # no pair at all


def test_brier_skill_is_against_the_same_rows_mean():
    """Brier skill = 1 − mean((g − y)²) / mean((y − ȳ)²) with ȳ the mean of THESE rows (the authors'
    `regression_diagnostic_values`: 0.1, 0.4, 0.9 vs 0, 0.5, 1 -> 1 − 0.01 / (1/6) = 0.94), whatever
    the buffer's base rate (all-zero targets here), and nan when these targets are constant."""
    poise = PoiseBaseline(prompt_dim=2)
    poise.buffer.append(torch.zeros(4, 7), torch.zeros(4))  # base rate 0 would give 1 − 0.01 / (1.25/3)
    metrics = poise._quality_metrics(torch.tensor([0.1, 0.4, 0.9]), torch.tensor([0.0, 0.5, 1.0]),
                                     torch.zeros(3, dtype=torch.long))
    assert metrics["probe/brier_skill"] == pytest.approx(0.94, abs=1e-6)
    assert metrics["probe/pair_sign_acc"] == 1.0
    constant = poise._quality_metrics(torch.tensor([0.2, 0.4]), torch.tensor([0.5, 0.5]),
                                      torch.zeros(2, dtype=torch.long))
    assert math.isnan(constant["probe/brier_skill"])


# ----------------------------------------------------------------------------------------------
# The schedule


def test_bootstrap_then_probe_fitted_on_earlier_steps():
    gen = torch.Generator().manual_seed(6)
    poise = PoiseBaseline(prompt_dim=8)  # bootstrap_steps = 16
    for step in range(1, 17):
        features, rewards, group = random_step(gen)
        adv, metrics = poise.advantages(features, rewards, group)
        torch.testing.assert_close(adv, rewards - leave_one_out_reference(rewards, group))  # RLOO
        assert metrics["probe/used"] == 0.0 and metrics["probe/buffer_rows"] == 16 * step
    buffer_features, buffer_targets = poise.buffer.features().clone(), poise.buffer.targets().clone()
    features, rewards, group = random_step(gen)
    adv, metrics = poise.advantages(features, rewards, group)  # step 17
    assert metrics["probe/used"] == 1.0 and metrics["probe/refit_s"] > 0
    before = RidgeProbe(8).fit(buffer_features, buffer_targets)  # probe of steps 1..16 only
    values = before.predict(features)
    torch.testing.assert_close(adv, rewards - leave_one_out_reference(values, group))
    assert (adv - (rewards - leave_one_out_reference(rewards, group))).abs().max() > 1e-3  # not RLOO
    targets = cross_rollout_targets(rewards, group)
    after = RidgeProbe(8).fit(torch.cat([buffer_features, features]), torch.cat([buffer_targets, targets]))
    assert (cross_rollout_baselines(after.predict(features), group) - (rewards - adv)).abs().max() > 1e-4
    torch.testing.assert_close(poise.predict_values(features), after.predict(features))  # refit happened
    # metrics are the pre-update probe's, on this step's rows
    assert metrics["probe/mae"] == pytest.approx(float((values - targets).abs().mean()), abs=1e-6)
    brier = float((values - targets).square().mean())
    constant_brier = float((targets - targets.mean()).square().mean())  # these rows' own mean
    assert metrics["probe/brier_skill"] == pytest.approx(1 - brier / constant_brier, abs=1e-5)


def test_state_dict_round_trip_resumes_exactly():
    gen = torch.Generator().manual_seed(7)
    steps = [random_step(gen) for _ in range(4)]
    poise = PoiseBaseline(prompt_dim=8, bootstrap_steps=2, buffer_size=40)
    for step in steps[:3]:
        poise.advantages(*step)
    stream = io.BytesIO()
    torch.save(poise.state_dict(), stream)
    stream.seek(0)
    resumed = PoiseBaseline(prompt_dim=8, bootstrap_steps=2, buffer_size=40)
    resumed.load_state_dict(torch.load(stream, weights_only=True))
    adv, metrics = poise.advantages(*steps[3])
    adv_resumed, metrics_resumed = resumed.advantages(*steps[3])
    assert torch.equal(adv, adv_resumed) and metrics["probe/used"] == 1.0
    metrics.pop("probe/refit_s"), metrics_resumed.pop("probe/refit_s")
    assert metrics == metrics_resumed
    assert torch.equal(poise.buffer.features(), resumed.buffer.features()) and len(resumed.buffer) == 40


# ----------------------------------------------------------------------------------------------
# Unbiasedness on a toy bandit


def test_cross_rollout_gradient_unbiased_own_feature_baseline_biased():
    """Prompts x (4), softmax policy over 3 actions, Bernoulli rewards with known p(x, a), G = 2.
    Features: prompt embedding | action embedding + a direction scaled by the reward + noise | noise.
    A probe g trained to read each rollout's OWN reward from its features is used two ways:
    b_i = g(z_sibling) (POISE) and b_i = g(z_i) (own features). Exact gradient of
    J = mean_x Σ_a π(a|x) p(x, a) w.r.t. the logits: ∂J/∂θ[x, a] = π(a|x)(p(x, a) − V(x)) / 4."""
    gen = torch.Generator().manual_seed(8)
    K, A, G, H = 4, 3, 2, 3
    pi = torch.randn(K, A, generator=gen).softmax(-1, dtype=torch.float64)  # [K, A]
    success = 0.05 + 0.9 * torch.rand(K, A, generator=gen, dtype=torch.float64)  # [K, A]
    exact = pi * (success - (pi * success).sum(1, keepdim=True)) / K  # [K, A]
    prompt_embed, action_embed = torch.randn(K, H, generator=gen), torch.randn(A, H, generator=gen)
    leak = torch.randn(H, generator=gen)

    def sample(S):
        x = torch.randint(K, (S,), generator=gen)  # [S]
        a = torch.multinomial(pi[x], G, replacement=True, generator=gen)  # [S, G]
        r = (torch.rand(S, G, generator=gen, dtype=torch.float64) < success[x[:, None], a]).float()
        response = action_embed[a] + 2.0 * r[..., None] * leak + 0.5 * torch.randn(S, G, H, generator=gen)
        features = torch.cat([prompt_embed[x][:, None].expand(S, G, H), response,
                              torch.randn(S, G, 3, generator=gen)], -1).reshape(S * G, 2 * H + 3)
        return x, a, r.reshape(-1), features, torch.arange(S).repeat_interleave(G)

    _, _, r_fit, features_fit, _ = sample(4000)
    own_reward_probe = RidgeProbe(H, pca_prompt=H, pca_response=H, ridge_alpha=1.0).fit(features_fit, r_fit)

    S = 100_000
    x, a, r, features, group = sample(S)
    g = own_reward_probe.predict(features)  # [S·G]
    score = torch.nn.functional.one_hot(a, A).double() - pi[x][:, None]  # [S, G, A] ∇_θ[x] log π(a|x)

    def z_scores(baselines):  # per-coordinate (MC mean − exact) / standard error
        adv = poise_advantages(r, baselines).double().reshape(S, G)
        per_prompt = (adv[..., None] * score).mean(1)  # [S, A]
        draws = torch.nn.functional.one_hot(x, K).double()[:, :, None] * per_prompt[:, None]  # [S, K, A]
        return (draws.mean(0) - exact) / (draws.std(0) / math.sqrt(S))

    z_cross = z_scores(cross_rollout_baselines(g, group))
    z_own = z_scores(g)
    assert z_cross.abs().max() < 4.5, z_cross  # unbiased within Monte-Carlo error (12 coordinates)
    assert z_own.abs().max() > 10, z_own  # reading the rollout's own outcome biases the gradient


def test_the_probes_feature_settings_travel_with_its_state_and_its_run(smollm2_tokenizer, tmp_path):
    """A run trained with --probe-layer 5: its state says so, and a POISE built otherwise refuses it naming the flag.
    tools/values (eval.py probe) builds POISE from the run's arguments (run_arguments: run.json's args with every
    resume's changed flags; without run.json, train.py's defaults), so it reads the run's --probe-layer and
    --probe-standardize-hidden, and a checkpoint whose features were made otherwise is refused naming the flag."""
    import json

    import train
    from tools.values import run_arguments
    actor = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=30, hidden_size=8))
    trained = poise_algorithm(smollm2_tokenizer, "--probe-layer", "5")
    state = trained.state_dict()
    assert state["features"] == {"probe_layer": 5, "probe_standardize_hidden": False}
    with pytest.raises(ValueError, match="--probe-layer 5"):
        poise_algorithm(smollm2_tokenizer).load_state_dict(state)  # the default layer: 16 of 30
    poise_algorithm(smollm2_tokenizer, "--probe-layer", "5").load_state_dict(state)
    # no run.json: train.py's defaults for --algo poise (layer 16 of 30, raw hidden states)
    default = POISE(run_arguments(tmp_path, "poise"), actor, smollm2_tokenizer, "cpu", 1)
    assert default.feature_settings() == {"probe_layer": 16, "probe_standardize_hidden": False}
    with pytest.raises(ValueError, match="--probe-layer 5"):
        default.load_state_dict(state)
    # a run started with --probe-layer 3 --probe-standardize-hidden, resumed with --probe-layer 4: what it ended with
    args = vars(train.parse_args(["--algo", "poise", "--probe-layer", "3", "--probe-standardize-hidden"]))
    (tmp_path / "run.json").write_text(json.dumps({"args": args, "resumes": [{"changed_args": {"probe_layer": 4}}]}))
    ran = run_arguments(tmp_path, "poise")
    assert (ran.probe_layer, ran.probe_standardize_hidden) == (4, True)
    built = POISE(ran, actor, smollm2_tokenizer, "cpu", 1)
    assert built.layer == 4 and built.baseline.probe.standardize_hidden is True
    assert built.feature_settings() == {"probe_layer": 4, "probe_standardize_hidden": True}
    with pytest.raises(ValueError, match="--probe-layer 5"):
        built.load_state_dict(state)  # the run's layer is 4, the checkpoint's features came from layer 5
    same_layer = poise_algorithm(smollm2_tokenizer, "--probe-layer", "4").state_dict()  # raw hidden states
    with pytest.raises(ValueError, match="--probe-standardize-hidden False"):
        built.load_state_dict(same_layer)
    matching = poise_algorithm(smollm2_tokenizer, "--probe-layer", "4", "--probe-standardize-hidden").state_dict()
    built.load_state_dict(matching)  # the same feature settings: accepted
    built.load_state_dict({"poise": state["poise"]})  # a checkpoint from before the settings were saved: accepted
