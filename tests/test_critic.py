"""The discriminative critic (PPO, VC-PPO): GAE over a ragged batch, value positions, the update, the loop."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from _helpers import masked_whiten
from advantage import gae_advantages
from critic import PPO, discriminative_value_fn, value_clip_active, value_forward
from engine import Sample
from rollout import Step, build_rollout_batch

ROOT = Path(__file__).resolve().parents[1]


def test_gae_ragged_batch_lambda_below_one():
    # two rollouts of lengths 3 and 1 (padding after), gamma 1, lambda 0.5
    v = torch.tensor([[0.5, 0.4, 0.2], [0.3, 9.0, 9.0]])  # padding values must not leak in
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv, ret = gae_advantages(v, torch.tensor([1.0, 0.0]), m, gamma=1.0, lam=0.5)
    d = [0.4 - 0.5, 0.2 - 0.4, 1.0 - 0.2]  # delta_t = r_t + V_{t+1} - V_t, V after the end = 0
    a2 = d[2]
    a1 = d[1] + 0.5 * a2
    a0 = d[0] + 0.5 * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2], [-0.3, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.2], [0.0, 0.0, 0.0]]), atol=1e-6)


def _batch():
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]  # different lengths -> left padding on row 0
    samples = [[Sample([20, 21, 22, 23], [0.0] * 4, "", "stop"), Sample([24], [0.0], "", "stop")],
               [Sample([25, 26], [0.0] * 2, "", "length")]]
    return build_rollout_batch(prompts, samples, [1.0, 0.0, 1.0], pad_id=0), prompts, samples


def _args(**kw):
    base = dict(micro_batch_size=2, dtype="fp32", ppo_epochs=1, mini_batches=1, seed=0, value_clip=0.5, grad_clip=1.0,
                gamma=1.0, lam=1.0, critic_lam=None, critic_lr=5e-6, weight_decay=0.01, critic_warmup_steps=0,
                critic_model=None, out="unused", share_prompts=True, gradient_checkpointing=False)
    return SimpleNamespace(**{**base, **kw})


def _step(index: int = 0) -> Step:
    """What the loop hands the algorithm in iteration `index` (PPO reads only the index: its mini-batch order)."""
    return Step(index=index, seed=0, generate=None, actor_passes=None, engine=None)


def _ppo(tiny_model, **kw):
    """The PPO algorithm with a critic started from the tiny model."""
    return PPO(_args(critic_model=tiny_model, model=tiny_model, **kw), None, None, torch.device("cpu"), 1)


@pytest.mark.parametrize("share", [True, False])
def test_critic_values_line_up_with_response_tokens(tiny_model, share):
    """V_t = head output at the last token of x ∘ y_<t, whatever the padding, the micro-batching and the
    shared-prompt packing (prompt 0's two rollouts run as one packed row)."""
    critic = _ppo(tiny_model, share_prompts=share, micro_batch_size=3)
    batch, prompts, samples = _batch()
    batch.old_values = critic.values(batch)
    rows = [(p, s) for p, group in zip(prompts, samples) for s in group]
    for i, (prompt, sample) in enumerate(rows):
        for t in range(len(sample.token_ids)):
            state = torch.tensor([prompt + sample.token_ids[:t]])
            with torch.no_grad():
                expected = critic.model(input_ids=state).logits[0, -1, 0]
            assert float(batch.old_values[i, t]) == pytest.approx(float(expected), abs=1e-5), (i, t)
        assert float(batch.old_values[i, len(sample.token_ids):].abs().sum()) == 0  # padding carries no value
    mb = batch.select(torch.tensor([1]))  # a trimmed single row reads the same values
    assert torch.allclose(value_forward(critic.model, mb)[0], batch.old_values[1, :1], atol=1e-5)


def test_critic_update_fits_returns_and_gae_whitening(tiny_model):
    critic = _ppo(tiny_model, critic_lr=1e-3)
    batch, _, _ = _batch()
    adv, metrics = critic.advantages(batch, None, _step(0))
    raw, returns = gae_advantages(batch.old_values, batch.rewards, batch.response_mask)
    assert torch.allclose(adv, masked_whiten(raw, batch.response_mask), atol=1e-5)  # one rank: the same whitening
    # lambda = 1: returns = r
    assert torch.allclose(batch.returns, returns) and torch.allclose(returns[0, :4], torch.ones(4))
    first = critic.after_update(batch, _step(0))["critic/mse_to_returns"]
    for step in range(1, 16):
        batch.old_values = critic.values(batch)
        last = critic.after_update(batch, _step(step))["critic/mse_to_returns"]
    assert last < 0.5 * first, (first, last)
    assert metrics["critic/values_mse"] == pytest.approx(first, rel=1e-4)


def test_value_head_is_one_output_without_dropout(tiny_model):
    """A value regressor: one output, and no dropout in front of it even in train mode (a Llama config has no
    classifier_dropout, so transformers' default 0.1 would apply unless the loader sets it on the config)."""
    model = _ppo(tiny_model).model.train()
    assert model.score.out_features == 1 and model.dropout.p == 0.0
    state = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(input_ids=state).logits, model(input_ids=state).logits)


def test_discriminative_value_fn_in_unit_interval(tiny_model, default_model):
    from transformers import AutoTokenizer
    critic = _ppo(tiny_model)
    tok = AutoTokenizer.from_pretrained(default_model)
    values = discriminative_value_fn(critic.model, tok, torch.device("cpu"), batch_size=2)(
        ["What is 2 + 2?", "What is 3 + 4?", "What is 1 + 1?"], ["", "3 + 4 = 7", "Let me think"])
    assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values)


def test_discriminative_value_fn_reads_each_states_last_real_token_in_a_padded_batch(tiny_model):
    """The value benchmarks' critic values (tools/values.py and tools/baselines.critic_values call
    critic.discriminative_value_fn at its default batch size): states of different lengths batched together (padded)
    get the value each gets alone, the head's output at the state's last real token (fp32, 1e-5)."""
    from transformers import AutoTokenizer

    from critic import load_value_model
    from data import Problem, format_prompt
    from tools.baselines import critic_values
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = load_value_model(tiny_model, torch.device("cpu"), 1)  # fp32, fresh head, as tools/values.py loads it
    with torch.no_grad():
        model.score.bias.fill_(0.5)  # values inside (0, 1): the [0, 1] clip hides no difference
    problems = ["What is 2 + 2?", "What is 123 * 45 + 6789 - 10?", "What is 1 + 1?", "Compute 7 * 8."]
    partials = ["", "First, 123 * 45 = 5535. Then 5535 + 6789 = 12324, minus 10 is 12314.", "Let me think", "56"]
    value_fn = discriminative_value_fn(model, tok, torch.device("cpu"))
    batched = value_fn(problems, partials)
    assert critic_values(model, tok, problems, partials) == batched
    states = [format_prompt(tok, Problem(problem=q, answer="")) + tok.encode(y, add_special_tokens=False)
              for q, y in zip(problems, partials)]
    assert len({len(s) for s in states}) == len(states)  # every state padded differently in the batch
    for i, (state, value) in enumerate(zip(states, batched)):
        with torch.no_grad():
            last = float(model(input_ids=torch.tensor([state])).logits[0, -1, 0])
        assert 0.0 < last < 1.0, (i, last)
        assert value == pytest.approx(last, abs=1e-5), i
        assert value_fn([problems[i]], [partials[i]])[0] == pytest.approx(value, abs=1e-5), i  # a batch of one
    assert max(batched) - min(batched) > 1e-3  # the states' values differ: a mix-up would show


def test_vcppo_warmup_trains_only_the_critic(tiny_model, tmp_path):
    """--steps 0 with 2 warmup iterations: the actor's weights are untouched, the critic's moved, and the
    value-pretrained critic is saved as a model folder next to the checkpoint."""
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "train.py"), "--algo", "vcppo", "--model", tiny_model, "--out", str(out),
           "--steps", "0", "--critic-warmup-steps", "2", "--prompts-per-step", "2", "--rollouts-per-prompt", "2",
           "--max-new-tokens", "8", "--no-eval", "--dtype", "fp32", "--critic-lr", "1e-3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["warmup", "warmup"]
    assert all("critic/value_loss" in r and "policy_loss" not in r for r in rows)
    actor = load_file(out / "checkpoint-000002" / "model.safetensors")
    start = load_file(Path(tiny_model) / "model.safetensors")
    assert all(torch.equal(actor[k], start[k]) for k in start)
    critic = load_file(out / "checkpoint-000002" / "critic" / "model.safetensors")
    pretrained = load_file(out / "critic-pretrained" / "model.safetensors")
    assert max(float((critic[k] - start[k]).abs().max()) for k in start if k in critic) > 1e-6
    assert all(torch.equal(critic[k], pretrained[k]) for k in critic)
    assert "score.weight" in critic


def test_critic_update_is_the_same_with_shared_prompt_packing(tiny_model):
    """The value update's gradients and metrics with packed prompts equal those of one row per rollout."""
    results = []
    for share in (True, False):
        critic = _ppo(tiny_model, share_prompts=share, micro_batch_size=3)
        critic.optimizer = torch.optim.SGD(critic.model.parameters(), lr=0.0)
        steps = []  # the gradient each optimizer step sees (the update frees gradients after its last step)
        critic.optimizer.register_step_pre_hook(
            lambda o, *_: steps.append(torch.cat([p.grad.flatten() for p in o.param_groups[0]["params"]])))
        batch, _, _ = _batch()
        critic.advantages(batch, None, _step(0))
        metrics = critic.after_update(batch, _step(0))
        results.append((torch.cat(steps), metrics))
    (grad_a, m_a), (grad_b, m_b) = results
    assert grad_a.abs().max() > 1e-3 and torch.allclose(grad_a, grad_b, atol=1e-6)
    for name in ("critic/value_loss", "critic/mse_to_returns", "critic/grad_norm"):
        assert m_a[name] == pytest.approx(m_b[name], rel=1e-5), name


def test_value_clip_fraction_counts_where_the_clipped_term_wins_as_verl():
    """verl's vf_clipfrac: the clipped squared error strictly larger. Old 0, clip 0.5, return 1."""
    values = torch.tensor([[2.0, 0.8, -1.0, 0.3, 0.5]])
    active = value_clip_active(values, torch.zeros(1, 5), torch.ones(1, 5), clip=0.5)
    # 2.0 moved past the range toward and beyond the return: unclipped error 1 > clipped 0.25 -> not counted;
    # 0.8: clipped 0.25 > 0.04 -> counted; -1.0: moved away, unclipped 4 > 2.25 -> not counted; 0.3, 0.5: in range
    assert active.tolist() == [[False, True, False, False, False]]


def test_vcppo_decouples_gae_lambdas_as_its_paper():
    """arXiv:2503.01491: critic lambda 1.0, actor lambda 0.95 (PPO keeps 1.0 for both)."""
    import train
    vc, ppo = train.parse_args(["--algo", "vcppo"]), train.parse_args(["--algo", "ppo"])
    assert (vc.lam, vc.critic_lam, ppo.lam, ppo.critic_lam) == (0.95, 1.0, 1.0, None)
    assert train.parse_args(["--algo", "vcppo", "--lam", "0.9"]).lam == 0.9
