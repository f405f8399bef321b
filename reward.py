"""Responses -> rewards: the integer reward of the arithmetic task, math-verify in worker processes with a
per-answer timeout, and `score_responses`, which counts timeouts, empty and truncated responses.

    >>> reward_for("8 * 4 = 32, so the answer is \\boxed{32}.", type("P", (), {"answer": "32"})())
    1.0
"""

from __future__ import annotations

import multiprocessing as mp
import re
import signal
from dataclasses import dataclass


BOXED_START = re.compile(r"\\boxed\s*\{")
INTEGER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")  # 12, -3, 1,000, 12.0, 12.5
UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def last_boxed(text: str) -> str | None:
    """The content of the last-opened non-empty \\boxed{...}, braces matched; None without one.

    `a \\boxed{5}, again \\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`; escaped braces (`\\{1, 2\\}`) do not
    count, and a box left open (a truncated response) is skipped. One pass: linear in len(text).
    """
    box_braces = {m.end() - 1 for m in BOXED_START.finditer(text)}  # index of each box's "{"
    open_braces, best = [], None  # best: (index of "{", index of "}")
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 1  # skip the escaped character: \{ \} \\
        elif text[i] == "{":
            open_braces.append(i)
        elif text[i] == "}" and open_braces:
            at = open_braces.pop()
            if at in box_braces and (best is None or at > best[0]) and text[at + 1:i].strip():
                best = (at, i)
        i += 1
    return None if best is None else text[best[0] + 1:best[1]]


def _exact_integer(token: str) -> int | None:
    """An INTEGER match as an exact int, never via float: '1,000' -> 1000, '-12.00' -> -12, '12.5' -> None.

    None past Python's 4300-digit str -> int limit too: no integer reference is that long.
    """
    whole, _, fraction = token.replace(",", "").partition(".")
    if fraction.strip("0"):
        return None
    try:
        return int(whole)
    except ValueError:
        return None


def extract_integer_answer(text: str) -> int | None:
    """The last non-empty \\boxed{...} as an integer; without a box, the last integer in the text.

    The fallback exists because a 135M model often writes "The answer is 12." next to an empty
    \\boxed{}; the reward still asks for the right number. `x = 3`, `$12$`, `1,000`, `12.0` parse;
    `12.5` is no integer (None). Any length is exact, and no input raises.
    """
    box = last_boxed(text)
    candidates = INTEGER.findall(text if box is None else box)
    return _exact_integer(candidates[-1]) if candidates else None


def reward_for(response: str, problem: Problem) -> float:
    """1.0 if the response's answer equals the integer reference (kind "int"), else 0.0."""
    got = extract_integer_answer(response)
    gold = problem.answer.strip()
    return float(got is not None and INTEGER.fullmatch(gold) is not None and got == _exact_integer(gold))


def _gold_latex(gold: str) -> str:
    """The reference as math-verify input: its last box if boxed, kept if $-delimited, else wrapped in $...$.

    An escaped dollar is currency, not a delimiter: `\\$18.90` -> `$\\$18.90$` (parses to 18.9).
    """
    box = last_boxed(gold)
    if box is not None:
        return f"\\boxed{{{box}}}"
    return gold if UNESCAPED_DOLLAR.search(gold) else f"${gold}$"


def _response_latex(response: str) -> str:
    """The response as math-verify input: only its last box when it has one (`\\boxed{5} ... \\boxed{7}` -> 7)."""
    box = last_boxed(response)
    return response if box is None else f"\\boxed{{{box}}}"


class _VerifierTimeout(BaseException):
    """SIGALRM's per-answer timeout. A BaseException, so math-verify's `except Exception` cannot swallow it."""


def _raise_timeout(signum, frame):
    raise _VerifierTimeout()


def _math_verify_worker(args: tuple[str, str, float]) -> str:
    """Runs in a worker process's main thread, where SIGALRM timeouts work. -> 'correct'|'wrong'|'timeout'."""
    gold, response, timeout_s = args
    from math_verify import parse, verify
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            gold_parsed = parse(_gold_latex(gold), parsing_timeout=None)
            ok = verify(gold_parsed, parse(_response_latex(response), parsing_timeout=None), timeout_seconds=None)
            return "correct" if ok else "wrong"
        except Exception:  # noqa: BLE001 - an unparsable answer is wrong, not a crash
            return "wrong"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _VerifierTimeout:  # outside the `finally`, so an alarm landing while it disarms is caught too
        return "timeout"
    finally:
        signal.signal(signal.SIGALRM, previous)


class MathVerifier:
    """math-verify in worker processes: a per-answer timeout scores 0 and is counted; never hangs.

    Each answer has a SIGALRM budget inside its worker; a worker stuck in C code past twice that
    budget is killed with its whole pool, which is rebuilt.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0):
        self.workers, self.timeout_s = workers, timeout_s
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            self._pool = mp.get_context("spawn").Pool(self.workers)
        return self._pool

    def close(self):
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    def __call__(self, responses: list[str], golds: list[str]) -> tuple[list[float], int]:
        """-> (rewards, number of timeouts). A worker stuck past its budget is killed with its pool, and
        the answers queued behind it are resubmitted to a fresh pool (they keep their full budget)."""
        tasks = [(g, r, self.timeout_s) for r, g in zip(responses, golds)]
        verdicts: list[str] = []
        while len(verdicts) < len(tasks):
            pool = self._get_pool()
            pending = [pool.apply_async(_math_verify_worker, (t,)) for t in tasks[len(verdicts):]]
            for job in pending:
                try:
                    verdicts.append(job.get(timeout=2 * self.timeout_s + 5))
                except mp.TimeoutError:
                    verdicts.append("timeout")
                    self.close()  # kills the stuck worker; the rest are resubmitted
                    break
        return [float(v == "correct") for v in verdicts], sum(v == "timeout" for v in verdicts)


@dataclass
class ScoreStats:
    timeouts: int = 0  # math answers whose check ran past the verifier's budget (each scored 0)
    empty_responses: int = 0
    truncated: int = 0


def score_responses(responses: list[str], problems: list[Problem], verifier: MathVerifier | None,
                    finish_reasons: list[str] | None = None) -> tuple[list[float], ScoreStats]:
    """Reward 1/0 for each response. Integer tasks are compared in-process; math ones via workers."""
    stats = ScoreStats()
    rewards = [0.0] * len(responses)
    math_idx = []
    for i, (text, prob) in enumerate(zip(responses, problems)):
        if not text.strip():
            stats.empty_responses += 1
            continue
        if prob.kind == "int":
            rewards[i] = reward_for(text, prob)
        else:
            math_idx.append(i)
    if math_idx:
        if verifier is None:
            raise ValueError("math problems need a MathVerifier")
        math_rewards, stats.timeouts = verifier([responses[i] for i in math_idx], [problems[i].answer for i in math_idx])
        for i, r in zip(math_idx, math_rewards):
            rewards[i] = r
    if finish_reasons:
        stats.truncated = sum(f == "length" for f in finish_reasons)
    return rewards, stats
