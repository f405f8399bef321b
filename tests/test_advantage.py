"""advantage.py (and the critics' GAE, value loss and whitening) against hand-computed numbers."""
import math

import pytest
import torch

import advantage as A
import critic as C
from _helpers import masked_whiten


def test_grpo_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = A.grpo_advantages(r, g)
    s = math.sqrt(1 / 3)  # unbiased std of [1,0,0,1]
    assert torch.allclose(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-6), atol=1e-6)
    s2 = math.sqrt(0.75 / 3)  # [1,1,1,0]: mean .75, sum sq dev .75
    assert torch.allclose(adv[4:], torch.tensor([0.25, 0.25, 0.25, -0.75]) / (s2 + 1e-6), atol=1e-6)


def test_grpo_no_std_all_equal_and_singleton():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    g = torch.tensor([0, 0, 1, 1, 2])
    assert torch.allclose(A.grpo_advantages(r, g, use_std=False), torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0]))
    adv = A.grpo_advantages(r, g)
    assert adv[2] == 0 and adv[3] == 0 and adv[4] == 0  # identical rewards / a group of one -> no signal


def test_rloo_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5])
    g = torch.tensor([0, 0, 0, 0, 1])
    assert torch.allclose(A.rloo_advantages(r, g), torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0]), atol=1e-6)


@pytest.mark.parametrize("flags", [[], ["--no-std"]])
def test_grpo_class_follows_no_std_flag_as_train_parses_it(flags):
    """GRPO.advantages with train.py's parsed flags: (r - mean) / (std + 1e-6) by default, Dr.GRPO's r - mean under
    --no-std, on every real response token. Two groups of unequal spread, so std-normalisation changes the values."""
    import train
    from engine import Sample
    from rollout import Step, build_rollout_batch
    args = train.parse_args(["--algo", "grpo", *flags])
    assert args.no_std == bool(flags)
    lengths = [3, 1, 2, 4, 2, 3, 1, 4]
    samples = [[Sample([7] * n, [0.0] * n, "", "stop") for n in lengths[:4]],
               [Sample([7] * n, [0.0] * n, "", "stop") for n in lengths[4:]]]
    batch = build_rollout_batch([[1, 2], [3]], samples, [1, 0, 0, 0, 1, 0, 1, 0], pad_id=0)
    centred = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, -0.5, 0.5, -0.5])  # group means 0.25 and 0.5
    std = torch.tensor([0.5] * 4 + [math.sqrt(1 / 3)] * 4)  # unbiased: sqrt(0.75 / 3), sqrt(1 / 3)
    expected = centred if flags else centred / (std + 1e-6)
    step = Step(index=0, seed=0, generate=None, actor_passes=None, engine=None)
    adv, metrics = A.GRPO(args, None, None, torch.device("cpu"), 1).advantages(batch, None, step)
    assert adv.shape == (8, 4) and metrics == {}
    for i, n in enumerate(lengths):
        assert torch.allclose(adv[i, :n], expected[i].expand(n), atol=1e-6), (i, adv[i])
        assert float(adv[i, n:].abs().sum()) == 0  # padding carries no advantage


def test_rloo_class_takes_the_loops_step_and_gives_leave_one_out_advantages():
    """RLOO through the algorithm interface as train.run_step calls it, advantages(batch, problems, step): r_i minus
    the mean of its siblings on every real response token, 0 on padding."""
    import train
    from engine import Sample
    from rollout import Step, build_rollout_batch
    args = train.parse_args(["--algo", "rloo"])
    lengths = [2, 1, 3, 2, 1]
    samples = [[Sample([7] * n, [0.0] * n, "", "stop") for n in lengths[:3]],
               [Sample([7] * n, [0.0] * n, "", "stop") for n in lengths[3:]]]
    batch = build_rollout_batch([[1, 2], [3]], samples, [1, 0, 0, 1, 0], pad_id=0)
    step = Step(index=0, seed=0, generate=None, actor_passes=None, engine=None)
    adv, metrics = A.RLOO(args, None, None, torch.device("cpu"), 1).advantages(batch, None, step)
    expected = torch.tensor([1.0, -0.5, -0.5, 1.0, -1.0])  # group 0: 1 - 0, 0 - 0.5, 0 - 0.5; group 1: 1 - 0, 0 - 1
    assert adv.shape == (5, 3) and metrics == {}
    for i, n in enumerate(lengths):
        assert torch.allclose(adv[i, :n], expected[i].expand(n), atol=1e-6), (i, adv[i])
        assert float(adv[i, n:].abs().sum()) == 0


def test_ppo_token_losses_and_clipping():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.7]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, -2.0, 1.0]])
    loss, clipped = A.ppo_token_losses(logp, old, adv, 0.2, 0.2)
    # ratio 1.5, A>0 -> min(1.5, 1.2) = 1.2; ratio .5, A<0 -> min(-.5, -.8) = -.8; 1.1,A=-2 -> -2.2; .7,A=1 -> .7
    assert torch.allclose(loss, -torch.tensor([[1.2, -0.8, -2.2, 0.7]]), atol=1e-6)
    assert clipped.tolist() == [[True, True, False, False]]
    loss_hi, _ = A.ppo_token_losses(logp, old, adv, 0.2, 0.28)  # DAPO clip-higher lets 1.5 -> 1.28
    assert torch.allclose(loss_hi[0, 0], torch.tensor(-1.28))


def test_kl_k3():
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.0, -1.5]])
    assert torch.allclose(A.kl_k3(lp, ref), torch.tensor([[0.0, math.exp(0.5) - 0.5 - 1]]))


def test_aggregation_modes():
    L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert A.aggregate_loss(L, m, "token-mean", A.loss_normaliser(m, "token-mean")) == pytest.approx(10 / 4)
    assert A.aggregate_loss(L, m, "seq-mean-token-mean",
                            A.loss_normaliser(m, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert A.aggregate_loss(L, m, "seq-mean-token-sum",
                            A.loss_normaliser(m, "seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        A.loss_normaliser(m, "mean")


def test_gae_lambda_one_is_reward_minus_value():
    v = torch.tensor([[0.2, 0.4, 0.9, 0.0], [0.5, 0.1, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = A.gae_advantages(v, torch.tensor([1.0, 0.0]), m)
    assert torch.allclose(adv, torch.tensor([[0.8, 0.6, 0.1, 0.0], [-0.5, -0.1, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), atol=1e-6)


def test_gae_lambda_below_one_hand_computed():
    v = torch.tensor([[0.5, 0.2, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    adv, _ = A.gae_advantages(v, torch.tensor([1.0]), m, gamma=0.9, lam=0.5)
    d1 = 1.0 + 0.0 - 0.2  # last token: reward 1, V after end = 0
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    assert torch.allclose(adv, torch.tensor([[d0 + 0.45 * d1, d1, 0.0]]), atol=1e-6)


def test_clipped_value_loss():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss = C.clipped_value_loss(v, old, ret, clip=0.5)
    # token 0: max((1-0)^2, (0.5-0)^2) = 1 -> 0.5; token 1: max(1, 1) -> 0.5
    assert torch.allclose(loss, torch.tensor([[0.5, 0.5]]))
    loss2 = C.clipped_value_loss(torch.tensor([[0.9]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), clip=0.5)
    assert torch.allclose(loss2, torch.tensor([[0.5 * 0.25]]))  # clipped branch (0.5 -> 1) is worse: taken


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, 99.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    w = masked_whiten(x, m)
    assert w[:, 2].abs().max() == 0 and abs(float((w * m).sum())) < 1e-6
    assert float(((w * m) ** 2).sum() / 3) == pytest.approx(1.0, rel=1e-5)


def test_gae_is_defined_once_for_every_critic():
    """PPO, VC-PPO and GenAC whiten the same GAE: one definition (advantage.py), no copy to drift."""
    import genac
    assert C.whitened_gae is genac.whitened_gae is A.whitened_gae
    assert not hasattr(C, "gae_advantages") and not hasattr(genac, "gae_advantages")


def test_ppo_loss_guards_at_extreme_ratios():
    """verl's guards: the log-ratio is clamped to ±20 (no inf/NaN), negative advantages are dual-clipped at c = 3."""
    logp, old = torch.tensor([[100.0, 100.0, 100.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    adv = torch.tensor([[-1.0, 0.0, 1.0, -1.0]])
    loss, _ = A.ppo_token_losses(logp, old, adv, 0.2, 0.2, clip_ratio_c=3.0)
    assert torch.isfinite(loss).all()  # before: inf (A = -1) and NaN (A = 0)
    # -1: capped at c; +1: clipped at 1.2; ratio 1: -A
    assert loss.flatten().tolist() == pytest.approx([3.0, 0.0, -1.2, 1.0])
    moderate, _ = A.ppo_token_losses(torch.tensor([[math.log(2.0)]]), torch.tensor([[0.0]]), torch.tensor([[-1.0]]),
                                     0.2, 0.2, 3.0)
    assert moderate.item() == pytest.approx(2.0)  # rho = 2 < c: the ordinary clipped loss max(2, 1.2) * 1
    logp.requires_grad_(True)
    A.ppo_token_losses(logp, old, adv, 0.2, 0.2, 3.0)[0].sum().backward()
    assert torch.isfinite(logp.grad).all()


def test_kl_k3_is_clamped_like_verl():
    g = torch.Generator().manual_seed(0)
    lp, ref = torch.zeros(1000), 5 * torch.randn(1000, generator=g)  # a log-ratio gap ~ N(0, 5)
    kl = A.kl_k3(lp, ref)
    assert float(kl.max()) <= 10.0 and float(kl.min()) >= 0.0  # before: up to ~5e6
    assert A.kl_k3(torch.tensor([0.0]), torch.tensor([100.0])).item() == 10.0


def test_seq_mean_modes_leave_empty_responses_out_of_the_mean():
    """verl's agg_loss averages over non-empty responses only; an empty one used to dilute the loss."""
    losses = torch.tensor([[1.0, 3.0, 0.0], [5.0, 0.0, 0.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 2: an empty response
    assert A.loss_normaliser(mask, "token-mean") == 3.0
    assert A.loss_normaliser(mask, "seq-mean-token-mean") == 2.0 == A.loss_normaliser(mask, "seq-mean-token-sum")
    mean = A.aggregate_loss(losses, mask, "seq-mean-token-mean", A.loss_normaliser(mask, "seq-mean-token-mean"))
    total = A.aggregate_loss(losses, mask, "seq-mean-token-sum", A.loss_normaliser(mask, "seq-mean-token-sum"))
    assert float(mean) == pytest.approx((2.0 + 5.0) / 2) and float(total) == pytest.approx((4.0 + 5.0) / 2)
