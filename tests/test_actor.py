"""The shared update's micro-batching (update.py, packing.py: the gradient does not depend on the split; mini-batches
hold whole prompts), the trainer's tempered log-probs (actor.py), and the on-policy shortcut that takes old log-probs
from the first step."""
from types import SimpleNamespace

import pytest
import torch

import advantage as A


@pytest.mark.parametrize("mode", A.LOSS_AGG_MODES)


def test_gradient_independent_of_micro_batch_split(tiny_model, mode):
    """The shared update's gradient is identical for micro-batches of 1, 3 and 8 rollouts, with and
    without shared-prompt packing."""
    from transformers import AutoModelForCausalLM

    import update
    from engine import Sample
    from rollout import build_rollout_batch
    torch.manual_seed(1)
    prompts = [[1, 5, 9, 13], [2, 7, 11]]
    samples = [[Sample(torch.randint(10, 400, (n,)).tolist(), [0.0] * n, "", "stop") for n in (3, 7, 1, 5)]
               for _ in prompts]
    batch = build_rollout_batch(prompts, samples, [1, 0, 0, 1, 1, 1, 0, 0], pad_id=2)
    batch.old_logprobs = -torch.rand(batch.response_mask.shape) * batch.response_mask
    batch.advantages = torch.randn(len(batch))[:, None] * batch.response_mask
    grads = []
    for share in (False, True):
        for mbs in (1, 3, 8):
            model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
            args = SimpleNamespace(ppo_epochs=1, mini_batches=1, micro_batch_size=mbs, loss_agg=mode, clip_low=0.2,
                                   clip_high=0.2, kl_coef=0.0, grad_clip=1e9, dtype="fp32", seed=0, share_prompts=share,
                                   temperature=1.0, clip_ratio_c=3.0)
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            # the gradient as the optimizer step sees it (the update frees gradients after its last step)
            opt.register_step_pre_hook(
                lambda o, *_: grads.append(torch.cat([p.grad.flatten() for p in o.param_groups[0]["params"]])))
            update.ppo_update(model, opt, batch, update.UpdateSettings.of(args), torch.device("cpu"), world=1)
            assert all(p.grad is None for p in model.parameters())  # freed: not held through generation and sync
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert torch.allclose(g, grads[0], atol=1e-6, rtol=1e-5)


def test_mini_batches_hold_whole_prompts():
    """Each optimizer step's mini-batch holds all rollouts of its prompts (verl's layout); every rollout once."""
    import update
    from engine import Sample
    from rollout import build_rollout_batch
    batch = build_rollout_batch([[1], [2], [3], [4], [5]], [[Sample([7], [0.0], "", "stop")] * 4 for _ in range(5)],
                                [0.0] * 20, pad_id=0)
    parts = update.mini_batch_indices(batch, 2, torch.Generator().manual_seed(0))
    assert len(parts) == 2 and sorted(torch.cat(parts).tolist()) == list(range(20))
    assert sorted(len(p) for p in parts) == [8, 12]
    assert set(batch.group_index[parts[0]].tolist()).isdisjoint(batch.group_index[parts[1]].tolist())
    assert update.mini_batch_indices(batch, 1, torch.Generator())[0].tolist() == list(range(20))
    # 2 prompts, 4 steps
    few = update.mini_batch_indices(batch.select(torch.arange(8)), 4, torch.Generator().manual_seed(0))
    assert [len(p) for p in few] == [2, 2, 2, 2]


def test_shared_prompt_micro_batches_keep_a_prompts_rollouts_together():
    """With packing, a micro-batch holds at most `size` rollouts, every rollout once, and a prompt's
    rollouts are split only into chunks of `size`."""
    import packing
    from engine import Sample
    from rollout import build_rollout_batch
    lens = [[3, 7, 1, 5, 2], [4, 4], [9], [1, 1, 1]]
    batch = build_rollout_batch([[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]],
                                [[Sample([5] * n, [0.0] * n, "", "stop") for n in ls] for ls in lens], [0.0] * 11,
                                pad_id=0)
    for size in (1, 2, 3, 4, 16):
        parts = packing.rollout_micro_batches(batch, size, share_prompts=True)
        assert sorted(torch.cat(parts).tolist()) == list(range(11)) and max(len(p) for p in parts) <= size
        for prompt, count in enumerate(map(len, lens)):
            pieces = [int((batch.group_index[p] == prompt).sum()) for p in parts]
            assert sorted(x for x in pieces if x) == sorted([size] * (count // size)
                                                            + ([count % size] if count % size else []))


def test_micro_batches_cover_rows_once_and_keep_long_rows_apart():
    """Length-aware micro-batches: an exact cover with at most `size` rows each; a few truncated
    128-token rollouts do not pad 13 short ones; and the split is optimal (brute force on small n)."""
    import itertools

    import packing
    lengths = torch.tensor([67, 177, 67, 67, 177, 67, 67, 67, 67, 177, 67, 67, 67, 67, 67, 67])
    groups = packing.micro_batches(lengths, 16, overhead_tokens=256)
    assert sorted(torch.cat(groups).tolist()) == list(range(16))
    # 1402 padded tokens, not 2832
    assert sorted(lengths[g].max().item() * len(g) for g in groups) == [3 * 177, 13 * 67]

    def cost(gs, overhead):
        return sum(len(g) * int(lengths_[g].max()) + overhead for g in gs)

    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        n, size, overhead = (7, int(torch.randint(1, 5, (1,), generator=gen)),
                             int(torch.randint(0, 300, (1,), generator=gen)))
        lengths_ = torch.randint(10, 200, (n,), generator=gen)
        groups = packing.micro_batches(lengths_, size, overhead_tokens=overhead)
        assert sorted(torch.cat(groups).tolist()) == list(range(n)) and max(len(g) for g in groups) <= size
        order = torch.argsort(lengths_, descending=True, stable=True)
        brute = min(cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (n,))], overhead)
                    for k in range(n) for cuts in itertools.combinations(range(1, n), k)
                    if all(b - a <= size for a, b in zip((0,) + cuts, cuts + (n,))))
        assert cost(groups, overhead) == brute


def test_trainer_logprobs_are_those_of_the_tempered_distribution(tiny_model):
    """policy_forward at temperature T returns log softmax(logits / T) of each sampled token, packed or not."""
    from transformers import AutoModelForCausalLM

    import actor
    from engine import Sample
    from rollout import build_rollout_batch
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    samples = [[Sample([5, 6, 7], [0.0] * 3, "", "stop"), Sample([8, 9], [0.0] * 2, "", "stop")]]
    batch = build_rollout_batch([[1, 2, 3, 4]], samples, [0.0, 1.0], pad_id=0)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7]])).logits[0, 3:6].float()  # [3, V] predicts 5, 6, 7
        expected = (full / 0.7).log_softmax(-1)[torch.arange(3), torch.tensor([5, 6, 7])]
        for share in (False, True):
            lp, ent, _ = actor.policy_forward(model, batch, with_entropy=True, share_prompts=share, temperature=0.7)
            assert torch.allclose(lp[0, :3], expected, atol=1e-5), share
            p = (full / 0.7).softmax(-1)
            assert torch.allclose(ent[0, :3], -(p * p.log()).sum(-1), atol=1e-4)


@pytest.mark.parametrize("mini_batches,epochs,share",
                         [(1, 1, False), (1, 1, True), (2, 1, True), (1, 2, False), (2, 2, False)])


def test_update_takes_old_logprobs_from_its_first_step_with_the_same_result(tiny_model, mini_batches, epochs, share):
    """batch.old_logprobs = None (the loop's default): the first optimizer step's rows take pi_old from the step's own
    forward and only later mini-batches get a no-grad pass. Parameters after the update, every metric, the filled
    old log-probs and entropies equal those of a separate pass first; the forward count shows the pass skipped."""
    from transformers import AutoModelForCausalLM

    import actor
    import packing
    import update
    from engine import Sample
    from rollout import build_rollout_batch

    def make_batch():
        torch.manual_seed(3)
        prompts = [[1, 5, 9, 13], [2, 7, 11], [4, 8]]
        samples = [[Sample(torch.randint(10, 400, (n,)).tolist(), [0.0] * n, "", "stop") for n in (3, 7, 5)]
                   for _ in prompts]
        batch = build_rollout_batch(prompts, samples, [1, 0, 0, 1, 1, 0, 0, 1, 0], pad_id=2)
        batch.advantages = torch.randn(len(batch))[:, None] * batch.response_mask
        return batch

    args = SimpleNamespace(ppo_epochs=epochs, mini_batches=mini_batches, micro_batch_size=4, loss_agg="token-mean",
                           clip_low=0.2, clip_high=0.2, kl_coef=0.0, grad_clip=1e9, dtype="fp32", seed=0,
                           share_prompts=share, temperature=0.7, clip_ratio_c=3.0)
    settings = update.UpdateSettings.of(args)
    results = []
    for separate_pass in (True, False):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        calls = []
        model.register_forward_hook(lambda module, inputs, output: calls.append(1))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        batch = make_batch()
        if separate_pass:
            actor.compute_old_logprobs(model.eval(), batch, settings, torch.device("cpu"))
        metrics = update.ppo_update(model.train(), opt, batch, settings, torch.device("cpu"), world=1, step=0)
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), metrics, batch, len(calls)))
    (params_a, m_a, batch_a, calls_a), (params_b, m_b, batch_b, calls_b) = results
    # later steps are off-policy
    assert m_a["approx_kl"] > 0 if (mini_batches, epochs) != (1, 1) else m_a["approx_kl"] < 1e-12
    assert torch.allclose(params_a, params_b, atol=1e-6, rtol=1e-5)
    for name in ("policy_loss", "clip_frac", "approx_kl", "grad_norm", "optimizer_steps"):
        assert m_b[name] == pytest.approx(m_a[name], rel=1e-5, abs=1e-9), name
    assert torch.allclose(batch_a.old_logprobs, batch_b.old_logprobs, atol=1e-6)
    assert torch.allclose(batch_a.entropies, batch_b.entropies, atol=1e-6)
    first_step = len(packing.rollout_micro_batches(make_batch().select(update.mini_batch_indices(
        make_batch(), mini_batches, torch.Generator().manual_seed(0))[0]), 4, share))  # seed 0 + 7919 x step 0
    assert calls_a - calls_b == first_step  # the no-grad forwards the first step's own forward replaced
