"""Grading accuracy: the math reward against hand-labelled (response, gold, correct) pairs.

`grading_pairs.py` holds 234 pairs in 14 categories (integers, fractions vs decimals, units,
percents, dollars, intervals, scientific notation, several boxes, sets/tuples, ...), each labelled by
what a careful human grader would say. Measured with math-verify 0.9.0: 227/234 = 0.970; the seven
misses are all false negatives (listed in docs/running.md's Grading accuracy). The threshold sits a bit below.
"""
import collections
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data import Problem
from verifier import MathVerifier, score_responses

sys.path.insert(0, str(Path(__file__).parent))
from grading_pairs import PAIRS  # noqa: E402

MIN_ACCURACY = 0.95  # measured 0.970 (227/234)
CATEGORIES = {"integer", "fraction_decimal", "latex_fraction", "units", "percent", "dollar", "interval", "scientific",
              "several_boxes", "negative", "set_tuple", "expression", "non_equivalent", "no_box"}


@pytest.fixture(scope="module")
def pairs() -> list[dict]:
    rows = [dict(zip(("category", "gold", "response", "correct"), pair)) for pair in PAIRS]
    for row in rows:
        assert set(row) == {"category", "gold", "response", "correct"} and isinstance(row["correct"], bool), row
    return rows


def test_pairs_cover_every_category(pairs):
    counts = collections.Counter(r["category"] for r in pairs)
    assert len(pairs) >= 150 and set(counts) == CATEGORIES and min(counts.values()) >= 10
    assert 0.2 < sum(not r["correct"] for r in pairs) / len(pairs) < 0.8  # both labels well represented


def test_grading_accuracy_on_labelled_pairs(pairs):
    verifier = MathVerifier(workers=2, timeout_s=5.0)
    try:
        rewards, stats = score_responses([r["response"] for r in pairs], [Problem("q", r["gold"]) for r in pairs],
                                         verifier)
    finally:
        verifier.close()
    wrong = [(r, got) for r, got in zip(pairs, rewards) if (got == 1.0) != r["correct"]]
    accuracy = 1 - len(wrong) / len(pairs)
    report = "\n".join(f"  [{r['category']}] expected {'correct' if r['correct'] else 'wrong'}, graded {got:.0f}: "
                       f"gold {r['gold']!r}, response {r['response']!r}" for r, got in wrong)
    print(f"\ngrading accuracy {accuracy:.3f} ({len(pairs) - len(wrong)}/{len(pairs)}), disagreements:\n{report}")
    assert stats.timeouts == 0
    assert accuracy >= MIN_ACCURACY, f"accuracy {accuracy:.3f} < {MIN_ACCURACY}; disagreements:\n{report}"


# ----------------------------------------------------------------------------------------------
# The integer reward pays only an unambiguous answer: one row per form of reward.integer_in_box's table

INTEGER_FORMS = [  # (response, gold, reward)
    ("\\boxed{12}", "12", 1.0), ("\\boxed{+12}", "12", 1.0), ("\\boxed{012}", "12", 1.0), ("\\boxed{12.}", "12", 1.0),
    ("\\boxed{12.0}", "12", 1.0), ("\\boxed{12.00}", "12", 1.0), ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0), ("\\boxed{x = 12}", "12", 1.0), ("\\boxed{n_1 = 12}", "12", 1.0),
    ("$\\boxed{12}$", "12", 1.0), ("\\boxed{$12$}", "12", 1.0), ("\\boxed{\\mathbf{12}}", "12", 1.0),
    ("\\boxed{\\text{12}}", "12", 1.0), ("\\boxed{{12}}", "12", 1.0), ("\\boxed{12 \\text{ apples}}", "12", 1.0),
    ("\\boxed{12 apples}", "12", 1.0), ("\\boxed{\\$12}", "12", 1.0),
    ("\\boxed{-12}", "-12", 1.0), ("\\boxed{\u221212}", "-12", 1.0), ("\\boxed{\u2212 12}", "-12", 1.0),
    ("\\boxed{- 12}", "-12", 1.0), ("\\boxed{-(12)}", "-12", 1.0), ("\\boxed{(-12)}", "-12", 1.0),
    ("\\boxed{\u221212}", "12", 0.0), ("\\boxed{- 12}", "12", 0.0), ("\\boxed{-(12)}", "12", 0.0),  # signs are read
    # the hedges the old rule paid as their last item
    ("\\boxed{11, 12}", "12", 0.0), ("\\boxed{13 or 12}", "12", 0.0), ("Possible values: 9, 10, 11, 12", "12", 0.0),
    ("\\boxed{11} or \\boxed{12}", "12", 0.0), ("\\boxed{11}, \\boxed{12}", "12", 0.0), ("\\boxed{11,12}", "12", 0.0),
    ("\\boxed{11; 12}", "12", 0.0), ("\\boxed{\\{11, 12\\}}", "12", 0.0), ("\\boxed{12 \\text{ or } 13}", "12", 0.0),
    ("\\boxed{12 \\lor 13}", "12", 0.0), ("\\boxed{12 \\text{ or more}}", "12", 0.0), ("\\boxed{about 12}", "12", 0.0),
    ("\\boxed{12 \\pm 1}", "12", 0.0),
    # ranges, fractions, powers, roots, factorials, expressions
    ("\\boxed{10-12}", "12", 0.0), ("\\boxed{10 \\text{ to } 12}", "12", 0.0),
    ("\\boxed{10 \\le x \\le 12}", "12", 0.0),
    ("\\boxed{12.5}", "12", 0.0), ("\\boxed{3/12}", "12", 0.0), ("\\boxed{\\frac{24}{2}}", "12", 0.0),
    ("\\boxed{2^{12}}", "12", 0.0), ("\\boxed{12^2}", "144", 0.0), ("\\boxed{\\sqrt{12}}", "12", 0.0),
    ("\\boxed{12!}", "12", 0.0), ("\\boxed{x + 12}", "12", 0.0), ("\\boxed{x = 3 + 9}", "12", 0.0),
    ("\\boxed{--12}", "-12", 0.0),
    # issue 36: honest final answers, each paid
    ("\\boxed{12 \\text{ cm}^2}", "12", 1.0), ("\\boxed{12 \\text{ m}^{3}}", "12", 1.0),
    ("\\boxed{12 cm^2}", "12", 1.0),
    ("\\boxed{12^\\circ}", "12", 1.0), ("\\boxed{12^{\\circ}}", "12", 1.0), ("\\boxed{12\u00b0}", "12", 1.0),
    ("\\boxed{12^\\circ \\text{C}}", "12", 1.0), ("\\boxed{12 \\text{ (after 3 days)}}", "12", 1.0),
    ("\\boxed{12 \\text{ (after 3 days)}}", "3", 0.0), ("\\boxed{\\text{Answer: } 12}", "12", 1.0),
    ("\\boxed{\\text{The answer is } 12}", "12", 1.0), ("\\boxed{\\color{blue}{12}}", "12", 1.0),
    ("\\boxed{\\textcolor{red}{12}}", "12", 1.0), ("\\boxed{{\\color{red} 12}}", "12", 1.0),
    ("\\boxed{\\textbf{12}}", "12", 1.0), ("\\boxed{\\underline{12}}", "12", 1.0), ("\\boxed{\\boxed{12}}", "12", 1.0),
    ("\\boxed{12 = x}", "12", 1.0), ("\\boxed{1\\,000}", "1000", 1.0), ("\\boxed{1 000}", "1000", 1.0),
    ("\\boxed{1\\,000\\,000}", "1000000", 1.0), ("\\boxed{\uff11\uff12}", "12", 1.0),
    ("The answer is \uff11\uff12.", "12", 1.0),
    ("\\boxed{\uff11,\uff10\uff10\uff10}", "1000", 1.0), ("Let me compute.\n7 + 5\n12", "12", 1.0), ("12", "12", 1.0),
    ("The answer is 12. (Checked it 2 ways.)", "12", 1.0), ("The answer is 12.\n(Checked it 2 ways.)", "12", 1.0),
    ("The answer is 12 (checked twice).", "12", 1.0), ("\\boxed{10 + 2 = 12}", "12", 1.0),
    ("\\boxed{x = 10 + 2 = 12}", "12", 1.0), ("\\boxed{3 \\times 4 = 12}", "12", 1.0),
    ("\\boxed{\\frac{24}{2} = 12}", "12", 1.0), ("\\boxed{2^3 + 4 = 12}", "12", 1.0),
    ("\\boxed{(10+2) = 12}", "12", 1.0),
    ("\\boxed{12 = 12}", "12", 1.0), ("\\boxed{x = 12 = 12}", "12", 1.0),  # one value stated twice (0 before issue 36)
    # ... and every hedge, list, range or expression without a final value still 0
    ("\\boxed{11 \\text{ or } \\boxed{12}}", "12", 0.0), ("\\boxed{11, \\boxed{12}}", "12", 0.0),
    ("\\boxed{12 \\text{ (or 13)}}", "12", 0.0), ("\\boxed{12 (or 13)}", "12", 0.0),
    ("\\boxed{12 \\text{ (approximately)}}", "12", 0.0), ("\\boxed{\\color{blue}{11 \\text{ or } 12}}", "12", 0.0),
    ("\\boxed{\\text{Answer: } 11, 12}", "12", 0.0), ("\\boxed{12^\\circ \\text{ or } 13^\\circ}", "12", 0.0),
    ("\\boxed{10^\\circ - 12^\\circ}", "12", 0.0), ("\\boxed{12 \\text{ cm}^2 \\text{ or } 13}", "12", 0.0),
    ("\\boxed{1,000 000}", "1000000", 0.0), ("\\boxed{11 12}", "12", 0.0), ("\\boxed{11 = 12}", "12", 0.0),
    ("\\boxed{10 + 3 = 12}", "12", 0.0), ("\\boxed{2x = 12}", "12", 0.0), ("\\boxed{x + 2 = 12}", "12", 0.0),
    ("\\boxed{12 = 10 + 2}", "12", 0.0), ("\\boxed{x = 12 = y}", "12", 0.0), ("\\boxed{9^{9^{9}} = 12}", "12", 0.0),
    ("11\n12", "12", 0.0), ("11,\n12", "12", 0.0), ("It is 11 or\n12", "12", 0.0), ("Values:\n- 11\n- 12", "-12", 0.0),
    ("The answer is 12. (Or 13.)", "12", 0.0), ("The answer is 12. (Actually 13.)", "12", 0.0),
    ("The answer is 12. (The answer is 13.)", "12", 0.0), ("The answer is 12 (or 13).", "12", 0.0),
    # no box: the last sentence with a digit must state one integer (`= N`, `equals N`, `is N`, `answer: N`)
    ("The answer is 12.", "12", 1.0), ("\\boxed{} so the answer is 12", "12", 1.0), ("7 + 5 = 12.", "12", 1.0),
    ("7 + 5 equals 12.", "12", 1.0), ("7 + 5 = 12\n\nThe answer is: 12", "12", 1.0),
    ("7 + 5 is equal to 12.", "12", 1.0), ("7 * 4 = 28\n\nThis is the final answer.", "28", 1.0),
    ("x = -12", "-12", 1.0),
    ("x = 11 or x = 12", "12", 0.0), ("The answer is 11, 12", "12", 0.0), ("the answer is 11. Or 12", "12", 0.0),
    ("The answer is between 10 and 12.", "12", 0.0), ("I got 8 apples and 4 more: 12 apples in total.", "12", 0.0),
    ("The answer is 12.5", "12", 0.0), ("So 7 + 5 is simply 12.", "12", 0.0),
    # a revision after words is an answer; the last box counts
    ("I got \\boxed{11}, no wait, it is \\boxed{12}", "12", 1.0), ("\\boxed{12} wait, \\boxed{13}", "12", 0.0),
    ("\\boxed{12} checking: yes, \\boxed{12}", "12", 1.0),
]


@pytest.mark.parametrize("response,gold,reward", INTEGER_FORMS)
def test_integer_reward_table(response, gold, reward):
    from reward import reward_for
    assert reward_for(response, Problem("q", gold, "int")) == reward


def test_integer_table_covers_the_issue_forms():
    assert len(INTEGER_FORMS) >= 20 and sum(r == 1.0 for _, _, r in INTEGER_FORMS) >= 10


# ----------------------------------------------------------------------------------------------
# math-verify: alternatives, equations and hedged boxes are refused before verification


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(workers=2, timeout_s=5.0)
    yield v
    v.close()


def test_math_path_refuses_alternatives_and_equations(verifier):
    hedge = "\\boxed{\\frac12} \\text{ or } \\boxed{\\frac13}"
    cases = [("\\frac{1}{2}", "\\boxed{\\frac13 = \\frac12}", 0.0), ("\\frac{1}{2}", hedge, 0.0),
             ("\\frac{1}{3}", hedge, 0.0), ("2", "\\boxed{1 \\text{ or } 2}", 0.0),
             ("2", "\\boxed{1 \\lor 2}", 0.0), ("7", "\\boxed{2x + 3 = 7}", 0.0), ("7", "\\boxed{5}, \\boxed{7}", 0.0),
             # answers that look alike and are fine
             ("3", "\\boxed{x = 3}", 1.0), ("y = 2x + 3", "\\boxed{y = 2x + 3}", 1.0),
             ("(2, 3)", "\\boxed{x=2, y=3}", 1.0), ("7", "first \\boxed{5}, checking again \\boxed{7}", 1.0),
             ("\\frac{1}{2}", "\\boxed{\\frac12} so \\boxed{\\frac12}", 1.0)]
    rewards, timeouts = verifier([c[1] for c in cases], [c[0] for c in cases])
    assert rewards == [c[2] for c in cases] and timeouts == 0


def test_math_path_one_percent_reading_full_width_thousands_and_equation_references(verifier):
    """A percent sign is a unit (reward._math_text): `2\\%` pays for reference `2` or `2\\%`, never for `0.02` (it
    paid for both). An equation is compared, not refused, when the reference is one. A box in a hedge is the hedge."""
    eq = "x^{\\prime}+\\frac{r}{V} x-r c=0"
    cases = [("2", "\\boxed{2\\%}", 1.0), ("2\\%", "\\boxed{2\\%}", 1.0), ("0.02", "\\boxed{2\\%}", 0.0),
             ("2\\%", "\\boxed{0.02}", 0.0), ("2\\%", "\\boxed{2}", 1.0), ("12.5\\%", "\\boxed{12.5}", 1.0),
             ("12", "\\boxed{\uff11\uff12}", 1.0), ("1000", "\\boxed{1\\,000}", 1.0), ("1000", "\\boxed{1 000}", 1.0),
             ("1000", "The answer is 1\\,000.", 1.0), ("12", "\\boxed{\\color{blue}{12}}", 1.0),
             ("12", "\\boxed{\\text{Answer: } 12}", 1.0), ("12", "\\boxed{12 = x}", 1.0),
             ("13", "\\boxed{12 = x}", 0.0),
             (eq, f"\\boxed{{{eq}}}", 1.0), (eq, "\\boxed{x^{\\prime}+\\frac{r}{V} x+r c=0}", 0.0),
             ("2x + 3 = 7", "\\boxed{2x + 3 = 7}", 1.0), ("7", "\\boxed{2x + 3 = 7}", 0.0),
             ("12", "\\boxed{11 \\text{ or } \\boxed{12}}", 0.0),
             ("\\frac{1}{2}", "\\boxed{\\frac13 \\text{ or } \\boxed{\\frac12}}", 0.0)]
    rewards, timeouts = verifier([c[1] for c in cases], [c[0] for c in cases])
    assert rewards == [c[2] for c in cases] and timeouts == 0


# ----------------------------------------------------------------------------------------------
# The verifier's timeout counts only the answer's own time

SLOW_ENTRY_POINT = """
import sys, time
sys.path.insert(0, {root!r})
if __name__ != "__main__":  # imported again by a worker (multiprocessing's spawn re-imports the main module)
    open({marker!r}, "w").write(__name__)
    time.sleep(20)
from verifier import MathVerifier

if __name__ == "__main__":
    verifier = MathVerifier(workers=2, timeout_s=1.0)
    print(verifier(["\\\\boxed{{12}}", "\\\\boxed{{\\\\frac{{1}}{{2}}}}", "\\\\boxed{{0.5}}", "x = \\\\boxed{{3}}"] * 2,
                   ["12", "0.5", "\\\\frac{{1}}{{2}}", "3"] * 2))
    verifier.close()
"""


def test_timeout_counts_the_answer_not_the_worker_start(tmp_path):
    """With a 1 s budget and an entry point whose import takes 20 s, every correct answer scores 1: the workers
    import verifier.py and reward.py only, and they are warm before any answer's deadline starts."""
    entry, marker = tmp_path / "slow_entry.py", tmp_path / "reimported"
    entry.write_text(SLOW_ENTRY_POINT.format(root=str(Path(__file__).resolve().parents[1]), marker=str(marker)))
    p = subprocess.run([sys.executable, str(entry)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == str(([1.0] * 8, 0))
    assert not marker.exists()  # the entry point was never imported again


def test_a_killed_worker_is_replaced_warm_before_the_next_deadline():
    v = MathVerifier(workers=1, timeout_s=1.0)
    try:
        assert v(["\\boxed{2}"], ["2"]) == ([1.0], 0)
        v._workers[0].process.kill()  # dies between calls (out of memory, a stray signal)
        v._workers[0].process.wait()
        assert v(["\\boxed{2}", "\\boxed{\\frac{1}{2}}"], ["2", "0.5"]) == ([1.0, 1.0], 0)
        t = time.time()
        rewards, timeouts = v(["\\boxed{9^{9^{9}}}", "\\boxed{3}"], ["2", "3"])  # stuck in C: killed after 2 * 1 + 1 s
        assert (rewards, timeouts) == ([0.0, 1.0], 1) and time.time() - t < 30  # the replacement scored the 2nd answer
    finally:
        v.close()


def test_evaluate_counts_timeouts_as_wrong_samples():
    """A timed-out answer is a wrong sample in avg@k and is counted (it used to vanish from the report)."""
    from rollout import evaluate
    from engine import Sample

    class ScriptedEngine:  # a fake engine: only evaluate's bookkeeping is under test
        def generate(self, prompt_ids, n, max_tokens, temperature, top_p, seed):
            texts = [["\\boxed{(x+y+z+1)^{15}}", "\\boxed{2}"], ["\\boxed{3}", "\\boxed{4}"]]  # sympy: ~2 s on the 1st
            return [[Sample([1, 2], [0.0, 0.0], t, "stop") for t in group] for group in texts]

    class Tokenizer:
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return [1, 2, 3]

    v = MathVerifier(workers=1, timeout_s=0.2)
    try:
        out = evaluate(ScriptedEngine(), Tokenizer(), [Problem("q", "2"), Problem("q", "4")], 2, 8, v)
    finally:
        v.close()
    assert out["timeouts"] == 1 and out["samples"] == 4 and out["avg_at_k"] == 0.5
