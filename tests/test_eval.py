"""Unbiased pass@k, and plots and the benchmark summary from a metrics file."""
import json
import math

import pytest

from eval import plot_run, run_summary
from rollout import pass_at_k


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 4)


def test_plot_run_writes_pngs(tmp_path):
    rows = [{"step": 0, "eval/avg_at_k": 0.3, "eval/pass_at_k": 0.5}] + [
        {"step": s, "reward": 0.1 * s, "response_length": 50 - s, "entropy": 1.0, "time/generate": 3.0,
         "time/update": 9.0} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_run(str(tmp_path))
    names = {p.name for p in written}
    assert {"reward.png", "heldout_accuracy.png", "response_length.png", "entropy.png", "phase_seconds.png"} <= names
    assert all(p.stat().st_size > 1000 for p in written)


def test_plot_run_missing_metrics(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot_run(str(tmp_path))


def test_run_summary_weighs_steps_by_their_seconds(tmp_path):
    """tokens/s over the run = all tokens / all seconds (a slow step weighs more), next to the mean of steps;
    VC-PPO's critic-warmup steps and evaluation rows are not RL steps."""
    def step(s, gen_tokens, t_gen, trained, t_update, sync):
        return {"step": s, "phase": "rl", "generated_tokens": gen_tokens, "trained_tokens": trained,
                "time/generate": t_gen, "time/score": 0.0, "time/old_logprob": 1.0, "time/update": t_update,
                "time/sync": sync, "time/step": t_gen + t_update + 1, "tokens_per_s/generate": gen_tokens / t_gen,
                "tokens_per_s/train": trained / t_update, "response_length": 10.0,
                "logprob_diff_engine_trainer": 0.02}
    rows = [{"step": 0, "eval/avg_at_k": 0.25, "eval/pass_at_k": 0.5, "eval/k": 4, "eval/problems": 200},
            {"step": 1, "phase": "critic_warmup", "time/step": 99.0, "time/sync": 0.0},
            step(2, 100, 1.0, 1000, 10.0, 0.2), step(3, 900, 3.0, 3000, 10.0, 0.6),
            {"step": 3, "eval/avg_at_k": 0.5, "eval/pass_at_k": 0.75, "eval/k": 4, "eval/problems": 200}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = run_summary(str(tmp_path))
    assert s["steps"] == 2 and s["generate_tokens_per_s"] == pytest.approx(1000 / 4.0)
    assert s["generate_tokens_per_s_step_mean"] == pytest.approx((100 + 300) / 2)
    assert s["train_tokens_per_s"] == pytest.approx(200.0) and s["sync_max"] == 0.6
    assert s["seconds_per_step/update"] == 10.0 and (s["avg_at_k_before"], s["avg_at_k_after"]) == (0.25, 0.5)


def test_speed_rejects_a_malformed_shape(capsys):
    import eval as eval_module
    with pytest.raises(SystemExit, match="expected prompts x samples"):
        eval_module.main(["speed", "--shapes", "4x8,16"])


def test_speed_runs_on_a_math_jsonl(tiny_model, tmp_path, capsys):
    """`eval.py speed --data FILE.jsonl` scores math answers with math-verify (it stopped with 'math problems need a
    MathVerifier' before) and prints both tables: generation loop vs bare vLLM, update loop vs bare forward+backward."""
    import eval as eval_module
    rows = [{"problem": f"What is {a} + {a}? Put the answer in \\boxed{{}}.", "answer": str(2 * a)}
            for a in range(1, 5)]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    eval_module.main(["speed", "--model", tiny_model, "--data", str(data), "--shapes", "2x2", "--max-new-tokens", "8",
                      "--repeats", "1", "--micro-batch-size", "4"])
    out = capsys.readouterr().out
    assert ("| 2 x 2 |" in out and "bare vLLM" in out and "| bare forward + backward" in out
            and "(update.ppo_update) |" in out)
