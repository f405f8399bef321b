"""`eval.py values`: Monte-Carlo ground truth, ranking accuracy, metrics, the cached state set, the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.values import ranking_top1, value_quality, value_targets
from data import Problem, format_prompt
from engine import Sample

ROOT = Path(__file__).resolve().parents[1]


class ScriptedEngine:
    """Pure-logic stand-in for the engine: continuation i of every prompt is `script[i]` (tokenized)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompt_ids, n, max_tokens, temperature, top_p, seed):
        self.calls.append((prompt_ids, n, max_tokens))
        out = []
        for _ in prompt_ids:
            group = []
            for i in range(n):
                ids = self.tokenizer.encode(self.script[i % len(self.script)], add_special_tokens=False)
                group.append(Sample(ids, [0.0] * len(ids), self.tokenizer.decode(ids), "stop"))
            out.append(group)
        return out


def test_ground_truth_is_the_mean_of_sampled_continuations(default_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model)
    problems = [Problem("What is 2 + 3?", "5", kind="int")]
    prompt_ids = [format_prompt(tok, problems[0])]
    open_prefix = tok.encode("2 + 3 is", add_special_tokens=False)
    done_prefix = tok.encode("2 + 3 = \\boxed{6}", add_special_tokens=False)
    states = [{"problem_index": 0, "prefix_ids": open_prefix, "finished": False},
              {"problem_index": 0, "prefix_ids": done_prefix, "finished": True}]
    engine = ScriptedEngine(tok, [" \\boxed{5}", " \\boxed{6}", " 6", " 5."])  # correct, wrong, wrong, correct
    value_targets(engine, tok, problems, prompt_ids, states, m=8, max_new_tokens=64, verifier=None, seed=0)
    assert states[0]["continuation_rewards"] == [1.0, 0.0, 0.0, 1.0] * 2
    assert states[0]["value"] == pytest.approx(sum(states[0]["continuation_rewards"]) / 8) == 0.5
    assert states[1]["value"] == 0.0 and states[1]["continuation_rewards"] == [0.0]  # finished: its own reward
    # ONE call, only for the open state, from prompt + prefix, with the budget left
    [(asked, n, budgets)] = engine.calls
    assert asked == [prompt_ids[0] + open_prefix] and n == 8 and budgets == [64 - len(open_prefix)]


def test_ranking_top1_hand_cases():
    assert ranking_top1([0.1, 0.9, 0.5], [0.2, 0.8, 0.9], 2) == pytest.approx(2 / 3)
    assert ranking_top1([0.1, 0.9, 0.5], [0.2, 0.8, 0.9], 3) == 0.0
    assert ranking_top1([0.1, 0.9, 0.5], [0.0, 1.0, 0.5], 2) == 1.0  # the right order is always right
    # a constant model picks uniformly among tied predictions: chance level
    assert ranking_top1([1.0, 0.0, 0.0, 0.0], [0.5] * 4, 2) == pytest.approx((3 * 0.5 + 3 * 1.0) / 6)
    assert ranking_top1([1.0, 0.0, 0.0, 0.0], [0.5] * 4, 4) == pytest.approx(0.25)


def test_value_quality_metrics():
    states = [{"kind": "path", "value": v} for v in (0.0, 0.5, 1.0)] + [
        {"kind": "candidate", "group": 0, "value": v} for v in (0.2, 0.8)]
    q = value_quality(states, [0.1, 0.5, 0.7, 0.3, 0.6])
    assert q["states"] == 3
    assert q["mse"] == pytest.approx((0.01 + 0 + 0.09) / 3) and q["mae"] == pytest.approx(0.4 / 3)
    assert q["pearson"] == pytest.approx(0.3 / (0.5 ** 0.5 * (0.56 / 3) ** 0.5))  # cov 0.3 / (|x - x̄| |y - ȳ|)
    assert q["top1@2"] == 1.0 and q["top1@4"] != q["top1@4"]  # no group of 4: nan


def test_values_cli_builds_caches_and_scores(tiny_model, tmp_path):
    pytest.importorskip("vllm")
    cache = tmp_path / "states.json"
    base = [sys.executable, str(ROOT / "eval.py"), "values", "--policy", tiny_model, "-n", "3", "-m", "2",
            "--candidates", "2", "--rank-prompts", "2", "--max-new-tokens", "12", "--segment-tokens", "4",
            "--cache", str(cache)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(base + ["--critic", "init"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| oracle state-zero value |" in first.stdout and "| dataset mean |" in first.stdout
    assert "| critic init (fresh head) |" in first.stdout and "built" in first.stderr
    saved = json.loads(cache.read_text())
    path_states = [s for s in saved["states"] if s["kind"] == "path"]
    assert {s["problem_index"] for s in path_states} == {0, 1, 2} and all(s["segment"] >= 0 for s in path_states)
    assert len([s for s in saved["states"] if s["kind"] == "candidate"]) == 4  # 2 prompts x 2 candidates
    for s in saved["states"]:
        assert s["value"] == pytest.approx(sum(s["continuation_rewards"]) / len(s["continuation_rewards"]))
        assert len(s["continuation_rewards"]) == (1 if s["finished"] else 2)
    again = subprocess.run(base + ["--genac", "base"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "cached states" in again.stderr, again.stderr[-3000:]
    assert "| generative critic base |" in again.stdout and "unparsable" in again.stderr  # a random model never parses
    other = subprocess.run(base[:-2] + ["--cache", str(cache), "-m", "3"], cwd=ROOT, capture_output=True, text=True,
                           timeout=600, env=env)
    assert other.returncode != 0 and "built with other settings" in other.stderr
