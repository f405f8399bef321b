"""An algorithm may change the actor's loss (train.py's interface: the optional `token_losses`): a GSPO-style
sequence ratio from tests/_sequence_ratio.py, registered as a user would (one entry of flags.ALGORITHMS), trained
by the real loop; the default loss is PPO-clip's, unchanged."""
import json

import torch

import flags
import update


def test_a_loss_changing_algorithm_trains_through_the_real_loop(monkeypatch, tiny_model, tmp_path):
    """One step of two mini-batches: the loop hands the algorithm's loss every micro-batch with its response mask, the
    second mini-batch sees a ratio moved by the first step, and the default loss is never called."""
    import _sequence_ratio
    import train
    monkeypatch.setitem(flags.ALGORITHMS, "seqratio", "_sequence_ratio.SequenceRatioGRPO")
    monkeypatch.setattr(_sequence_ratio.SequenceRatioGRPO, "calls", [])
    default_calls = []
    monkeypatch.setattr(update, "ppo_clip_losses", lambda *a: default_calls.append(1) or None)
    out = tmp_path / "run"
    train.main(["--algo", "seqratio", "--model", tiny_model, "--out", str(out), "--prompts-per-step", "2",
                "--rollouts-per-prompt", "4", "--max-new-tokens", "8", "--steps", "1", "--no-eval", "--engine", "hf",
                "--mini-batches", "2", "--micro-batch-size", "2", "--dtype", "fp32", "--lr", "1e-3",
                "--weight-decay", "0.1"])  # the tiny model's rewards are 0 here: weight decay alone moves the policy
    calls = _sequence_ratio.SequenceRatioGRPO.calls
    assert default_calls == [] and len(calls) == 4  # 2 optimizer steps x 2 micro-batches of 2 rollouts
    assert all(shape[0] == 2 and tokens > 0 for shape, tokens, _ in calls)
    assert [ratio == 1.0 for _, _, ratio in calls] == [True, True, False, False]  # pi_old, then a moved policy
    record = json.loads((out / "run.json").read_text())
    assert record["args"]["loss_agg"] == "seq-mean-token-mean"  # the algorithm's default travels with the run
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["optimizer_steps"] == 2 and row["policy_loss"] == row["policy_loss"]  # a number, not NaN


def test_the_default_loss_is_ppo_clip_with_verls_guards():
    """update.ppo_clip_losses = advantage.ppo_token_losses at the run's clip flags (what every built-in uses)."""
    from types import SimpleNamespace

    from advantage import ppo_token_losses
    g = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(3, 5, generator=g) for _ in range(3))
    args = SimpleNamespace(clip_low=0.2, clip_high=0.28, clip_ratio_c=3.0)
    got = update.ppo_clip_losses(logp, old, adv, torch.ones(3, 5), args)
    want = ppo_token_losses(logp, old, adv, 0.2, 0.28, 3.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
