"""Responses -> rewards: the integer reward of the arithmetic task, math-verify in worker processes with a
per-answer timeout, and `score_responses`, which counts timeouts, empty and truncated responses.

    >>> reward_for("8 * 4 = 32, so the answer is \\boxed{32}.", type("P", (), {"answer": "32"})())
    1.0

The policy is optimised against these rules, so they pay only an answer that commits to one value: a hedge
(`\\boxed{11, 12}`, `\\boxed{13 or 12}`, `\\boxed{11} or \\boxed{12}`) scores 0 whatever it contains.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

BOXED_START = re.compile(r"\\boxed\s*\{")
UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")

# ----------------------------------------------------------------------------------------------
# The final box


@dataclass
class Box:
    start: int  # index of the backslash of "\boxed"
    close: int  # index of its closing "}"
    content: str


def completed_boxes(text: str) -> list[Box]:
    """Every closed, non-empty \\boxed{...} in order of its opening brace, braces matched.

    Escaped braces (`\\{1, 2\\}`) do not count, and a box left open (a truncated response) is skipped.
    One pass: linear in len(text).
    """
    box_at = {m.end() - 1: m.start() for m in BOXED_START.finditer(text)}  # index of a box's "{" -> its "\boxed"
    open_braces, boxes = [], []
    i = 0
    while i < len(text):
        if text[i] == "\\":
            i += 1  # skip the escaped character: \{ \} \\
        elif text[i] == "{":
            open_braces.append(i)
        elif text[i] == "}" and open_braces:
            at = open_braces.pop()
            if at in box_at and text[at + 1:i].strip():
                boxes.append((at, Box(box_at[at], i, text[at + 1:i])))
        i += 1
    return [box for _, box in sorted(boxes, key=lambda pair: pair[0])]


def last_boxed(text: str) -> str | None:
    """The content of the last-opened non-empty \\boxed{...}; None without one.

    `a \\boxed{5}, again \\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`.
    """
    boxes = completed_boxes(text)
    return boxes[-1].content if boxes else None


CONNECTIVE = re.compile(r"\\(?:text|mbox|textrm|mathrm)\s*\{|\\q?quad|\\[,;:! ]|\\[()]|[\s$,;:.{}]"
                        r"|\b(?:or|and|either|maybe)\b", re.IGNORECASE)


def boxes_are_alternatives(text: str) -> bool:
    """True when the last box sits next to an earlier box with a different answer, joined by nothing but a
    connective: `\\boxed{11} or \\boxed{12}`, `\\boxed{11}, \\boxed{12}`,
    `\\boxed{\\frac12} \\text{ or } \\boxed{\\frac13}`.

    A later box after words (`I got \\boxed{2}, no wait, it is \\boxed{3}`, `Step 2: \\boxed{2}. Final: \\boxed{3}`)
    is a revision, and the last box is the answer.
    """
    boxes = completed_boxes(text)
    last = boxes[-1] if boxes else None
    earlier = [b for b in boxes if last is not None and b.close < last.start]  # not nested in the last box
    if not earlier:
        return False
    before = earlier[-1]
    if "".join(before.content.split()) == "".join(last.content.split()):
        return False  # the same answer twice
    return not CONNECTIVE.sub("", text[before.close + 1:last.start])


# ----------------------------------------------------------------------------------------------
# The integer reward (the arithmetic task)

MINUS_SIGNS = str.maketrans({c: "-" for c in "\u2212\u2012\u2013\u2014\ufe63\uff0d"})  # − ‒ – — ﹣ －
SPACING = re.compile(r"\\[,;:! ]|\\q?quad\b|~|\\\$|\$|\\left\b|\\right\b|\\displaystyle\b")
HEDGE_WORDS = re.compile(r"\b(?:or|and|to|than|more|less|about|approx\w*|around|least|most|between|either|nor|plus|"
                         r"minus|times|over|divided|per|cent|percent)\b", re.IGNORECASE)
UNIT_TEXT = re.compile(r"\s*\\(?:text|mbox|textrm|mathrm)\s*\{([A-Za-z .]*)\}\s*$")  # `12 \text{ apples}`
UNIT_WORDS = re.compile(r"\s+([A-Za-z][A-Za-z .]*)$")  # `12 apples`
FORMATTING = re.compile(r"\\(?:mathbf|textbf|boldsymbol|bm|mathrm|text|textrm|mbox)\s*\{([^{}]*)\}")
ASSIGNMENT = re.compile(r"^\s*[A-Za-z](?:_\{?\w+\}?)?\s*=(?!=)")  # `x = `, `n_1 = `
SIGNED_INTEGER = re.compile(r"\s*(?P<sign>[+-]?)\s*(?P<open>\(?)\s*(?P<inner>[+-]?)\s*"
                            r"(?P<digits>\d{1,3}(?:,\d{3})+|\d+)(?:\.0*)?\s*(?P<close>\)?)\s*\.?\s*")


def integer_in_box(content: str) -> int | None:
    """The one integer a box holds, or None when it holds anything else. Never raises; any length is exact.

    Accepted (each row a test in tests/test_grading.py)      Refused (None)
      12   +12   012   12.   12.0   12.00                       12.5   1/2   3/12   \\frac{24}{2}
      1,000   1{,}000                                           11, 12   11,12   11; 12   {11, 12}
      x = 12   n_1 = 12                                         x = 3 + 9   12 = 12   x = 12 = 12
      $12$   \\mathbf{12}   \\text{12}   {12}                     13 or 12   12 \\text{ or } 13   12 \\lor 13
      12 \\text{ apples}   12 apples                             12 \\text{ or more}   about 12   12 \\pm 1
      -12   − 12 (Unicode minus)   - 12   -(12)   (-12)         10-12   10 \\text{ to } 12   10 \\le x \\le 12
                                                                2^{12}   12^2   \\sqrt{12}   12!   x + 12   --12
    """
    s = content.translate(MINUS_SIGNS).replace("{,}", ",")
    s = SPACING.sub(" ", s)
    for unit in (UNIT_TEXT, UNIT_WORDS):  # one trailing unit, never a hedge (`\text{ or more}`)
        m = unit.search(s, max(len(s) - 200, 0))  # units are short: the search stays linear in a long box
        if m and not HEDGE_WORDS.search(m.group(1)) and not re.search(r"\d", s[m.end():]):
            s = s[:m.start()]
            break
    while (unwrapped := FORMATTING.sub(r"\1", s)) != s:
        s = unwrapped
    s = ASSIGNMENT.sub("", s, count=1)
    while s.strip().startswith("{") and s.strip().endswith("}") and s.count("{") == 1:
        s = s.strip()[1:-1]
    m = SIGNED_INTEGER.fullmatch(s)
    if m is None or bool(m["open"]) != bool(m["close"]) or (m["sign"] and m["inner"]):
        return None
    try:
        value = int(m["digits"].replace(",", ""))
    except ValueError:  # past Python's 4300-digit str -> int limit: no reference is that long
        return None
    return -value if "-" in (m["sign"], m["inner"]) else value


SENTENCE_END = re.compile(r"\n|[.!?;](?=\s|$)")
STATEMENT_HEDGE = re.compile(r"\b(?:or|either|between|about|approx\w*|around|roughly|maybe|possibly|perhaps)\b",
                             re.IGNORECASE)
ANSWER_MARKER = re.compile(r"(?:=|\bequals\b|\bis(?:\s+equal\s+to)?\b|\banswer\b)\s*:?", re.IGNORECASE)  # `is: N`


def stated_integer(text: str) -> int | None:
    """Without a box: the answer the response's last sentence with a digit states after its last `=`, `equals`,
    `is`, `is equal to` or `answer:` (N one integer by `integer_in_box`'s rules, nothing after it); None for anything
    else, or a hedge word (or, between, about, ...) in that sentence.

    "4 + 9 = 13.", "So, the answer is 13.", "11 * 3 equals 33.", "14 * 4 = 56\\n\\nThis is the final answer." state
    13, 13, 33, 56;
    "Possible values: 9, 10, 11, 12" (no statement), "x = 11 or x = 12" (a hedge), "The answer is 12, 13" and
    "the answer is 12. Or 13" (the last sentence with a digit states nothing) state none.
    """
    sentences = [s for s in SENTENCE_END.split(text) if re.search(r"\d", s)]
    if not sentences or STATEMENT_HEDGE.search(sentences[-1]):
        return None
    markers = list(ANSWER_MARKER.finditer(sentences[-1]))
    return integer_in_box(sentences[-1][markers[-1].end():]) if markers else None


def extract_integer_answer(text: str) -> int | None:
    """The integer in the response's final box; None for a hedged pair of boxes or when the box holds anything but
    one integer (`integer_in_box`). Without a box, the integer its last sentence states (`stated_integer`).

    The no-box rule reads a statement, never a number found somewhere: "the last integer in the text" paid
    "Possible values: 9, 10, 11, 12" for gold 12. It stays because SmolLM2-135M, asked for \\boxed{}, boxes
    almost never: of its 800 held-out answers at step 0 of the default run, 0.1% score on boxes alone, 29.1% with
    this rule (the last integer anywhere: 32.6%).
    """
    box = last_boxed(text)
    if box is None:
        return stated_integer(text)
    return None if boxes_are_alternatives(text) else integer_in_box(box)


def reward_for(response: str, problem) -> float:
    """1.0 if the response's answer equals the integer reference (kind "int"), else 0.0. problem: a data.Problem
    (its .answer; this module imports nothing of the project's)."""
    got = extract_integer_answer(response)
    return float(got is not None and got == integer_in_box(problem.answer.strip()))


# ----------------------------------------------------------------------------------------------
# math-verify (every other task): refusals first, then the check in a warm worker process

ALTERNATIVES = re.compile(r"\bor\b|\\lor\b|\\vee\b|\\text\s*\{\s*either", re.IGNORECASE)
EQUATION_SIDE = re.compile(r"\s*(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?(?:\s*\([^()]*\))?'*\s*")  # x, a_1, \theta, f(x)


def _top_level_parts(box: str) -> list[str]:
    """The box split at commas outside braces, brackets and parentheses: `x=2, y=3` -> [`x=2`, ` y=3`]."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(box):
        depth += ch in "{[(" and box[i - 1:i] != "\\"
        depth -= ch in "}])" and box[i - 1:i] != "\\"
        if ch == "," and depth == 0:
            parts.append(box[start:i])
            start = i + 1
    return parts + [box[start:]]


def refused_box(box: str) -> str | None:
    """Why a final box is no single answer (-> scored 0 before verification), or None.

    Alternatives: `\\frac12 \\text{ or } \\frac13`, `1 \\lor 2`. An equation: any comma-separated part with two `=`,
    or with one whose left side is not a name (`\\frac13 = \\frac12`, `2x + 3 = 7`); `x = 3`, `y = 2x + 3`,
    `x=2, y=3` and `f(x) = x^2` are answers.
    """
    if ALTERNATIVES.search(box):
        return "alternatives"
    for part in _top_level_parts(box):
        sides = part.split("=")
        if len(sides) > 2 or (len(sides) == 2 and not EQUATION_SIDE.fullmatch(sides[0])):
            return "equation"
    return None


def _gold_latex(gold: str) -> str:
    """The reference as math-verify input: its last box if boxed, kept if $-delimited, else wrapped in $...$.

    An escaped dollar is currency, not a delimiter: `\\$18.90` -> `$\\$18.90$` (parses to 18.9).
    """
    box = last_boxed(gold)
    if box is not None:
        return f"\\boxed{{{box}}}"
    return gold if UNESCAPED_DOLLAR.search(gold) else f"${gold}$"


def _response_latex(response: str) -> str | None:
    """The response as math-verify input: only its last box when it has one (`\\boxed{5} ... \\boxed{7}` -> 7);
    None when that box is refused (`refused_box`) or sits next to a different one (`boxes_are_alternatives`)."""
    box = last_boxed(response)
    if box is None:
        return response
    if refused_box(box) or boxes_are_alternatives(response):
        return None
    return f"\\boxed{{{box}}}"


class _VerifierTimeout(BaseException):
    """SIGALRM's per-answer timeout. A BaseException, so math-verify's `except Exception` cannot swallow it."""


def _raise_timeout(signum, frame):
    raise _VerifierTimeout()


def _math_verify_worker(args: tuple[str, str, float]) -> str:
    """Runs in a worker process's main thread, where SIGALRM timeouts work. -> 'correct'|'wrong'|'timeout'."""
    gold, response, timeout_s = args
    response_latex = _response_latex(response)
    if response_latex is None:
        return "wrong"
    from math_verify import parse, verify
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            gold_parsed = parse(_gold_latex(gold), parsing_timeout=None)
            ok = verify(gold_parsed, parse(response_latex, parsing_timeout=None), timeout_seconds=None)
            return "correct" if ok else "wrong"
        except Exception:  # noqa: BLE001 - an unparsable answer is wrong, not a crash
            return "wrong"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _VerifierTimeout:  # outside the `finally`, so an alarm landing while it disarms is caught too
        return "timeout"
    finally:
        signal.signal(signal.SIGALRM, previous)


def serve_verifier() -> None:
    """A worker's main loop: warm up, say "ready", then one JSON line [gold, response, timeout_s] in -> one verdict
    line out, until stdin closes. Started by MathVerifier as `python -c` importing only this module (the entry
    point that created the verifier -- train.py, seconds of imports -- is never imported again)."""
    answers = os.fdopen(os.dup(1), "w")  # the protocol's channel; stray prints of libraries go to stderr
    os.dup2(2, 1)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "Timeout is disabled": the alarm above is ours
    _math_verify_worker(("1", "\\boxed{1}", 60.0))  # imports math-verify and sympy, warms their parsers
    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        print(_math_verify_worker(tuple(json.loads(line))), file=answers, flush=True)


WORKER_COMMAND = "import sys; sys.path.insert(0, {folder!r}); import reward; reward.serve_verifier()"


class _Worker:
    """One verifier process. `ready` once warm; `task`/`deadline` while it checks an answer."""

    def __init__(self):
        folder = os.path.dirname(os.path.abspath(__file__))
        self.process = subprocess.Popen([sys.executable, "-c", WORKER_COMMAND.format(folder=folder)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.ready, self.task, self.deadline = False, None, 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            pipe.close()


class MathVerifier:
    """math-verify in warm worker processes: a per-answer timeout scores 0 and is counted; never hangs.

    Each answer has a SIGALRM budget of `timeout_s` inside its worker; a worker stuck in C code past
    2 * timeout_s + 1 s is killed and replaced. A budget starts only when a warm worker receives the answer:
    starting a worker (Python, math-verify, sympy: seconds on a loaded machine) never counts against it.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, start_timeout_s: float = 300.0):
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self._workers = [_Worker() for _ in range(workers)]  # start warming now, while the caller loads its model

    def close(self):
        for worker in self._workers:
            worker.kill()
        self._workers = []

    def _wait_until_ready(self, worker: _Worker) -> None:
        """Blocks (no answer's deadline runs) until the worker is warm; a worker that cannot start is an error."""
        if not select.select([worker.process.stdout], [], [], self.start_timeout_s)[0]:
            raise RuntimeError(f"a math-verify worker did not start within {self.start_timeout_s:.0f} s")
        if worker.process.stdout.readline().strip() != "ready":
            raise RuntimeError("a math-verify worker failed to start (is math-verify installed? see its error above)")
        worker.ready = True

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def __call__(self, responses: list[str], golds: list[str]) -> tuple[list[float], int]:
        """-> (rewards, number of timeouts). Each worker checks one answer at a time; a dead or stuck worker is
        replaced, and the replacement is warm before it gets the next answer (and its deadline)."""
        if not self._workers:
            raise RuntimeError("MathVerifier was closed")
        for worker in list(self._workers):
            if worker.process.poll() is not None:  # died between calls
                worker = self._replace(worker)
            if not worker.ready:
                self._wait_until_ready(worker)
        queue, verdicts = list(range(len(responses)))[::-1], [""] * len(responses)
        while queue or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.task is None and queue:
                    worker.task = queue.pop()
                    task = [golds[worker.task], responses[worker.task], self.timeout_s]
                    worker.process.stdin.write(json.dumps(task) + "\n")
                    worker.process.stdin.flush()
                    worker.deadline = time.monotonic() + 2 * self.timeout_s + 1
            busy = [w for w in self._workers if w.task is not None]
            waiting = [w for w in self._workers if not w.ready]  # replacements warming up: no deadline
            wait_s = min((w.deadline for w in busy), default=time.monotonic() + 1) - time.monotonic()
            readable = select.select([w.process.stdout for w in busy + waiting], [], [], max(wait_s, 0))[0]
            for worker in busy + waiting:
                if worker.process.stdout in readable:
                    line = worker.process.stdout.readline().strip()
                    if not worker.ready:
                        if line != "ready":
                            raise RuntimeError("a math-verify worker failed to start (see its error above)")
                        worker.ready = True
                    elif line:
                        verdicts[worker.task], worker.task = line, None
                    else:  # the worker died on this answer (killed, out of memory): scored 0, counted
                        verdicts[worker.task] = "timeout"
                        self._replace(worker)
                elif worker.task is not None and time.monotonic() > worker.deadline:  # stuck in C code
                    verdicts[worker.task] = "timeout"
                    self._replace(worker)
        return [float(v == "correct") for v in verdicts], sum(v == "timeout" for v in verdicts)


@dataclass
class ScoreStats:
    timeouts: int = 0  # math answers whose check ran past the verifier's budget (each scored 0)
    empty_responses: int = 0
    truncated: int = 0


def score_responses(responses: list[str], problems: list, verifier: MathVerifier | None,
                    finish_reasons: list[str] | None = None) -> tuple[list[float], ScoreStats]:
    """Reward 1/0 for each response (problems: data.Problem, by .kind and .answer). Integer tasks are compared
    in-process; math ones via workers."""
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
        math_rewards, stats.timeouts = verifier([responses[i] for i in math_idx],
                                                [problems[i].answer for i in math_idx])
        for i, r in zip(math_idx, math_rewards):
            rewards[i] = r
    if finish_reasons:
        stats.truncated = sum(f == "length" for f in finish_reasons)
    return rewards, stats
