"""Tasks and data: the problems a run trains and evaluates on, and the prompt each one becomes.

Data flows one way through this project:

    load_problems -> format_prompt -> Engine.generate -> score_responses -> build_rollout_batch
    (this file)                       (rollout.py)       (verifier.py)      (rollout.py) -> train.py / eval.py

A `Problem` comes from the built-in arithmetic task (seeded, four levels, a train / held-out split by a hash of the
question), a JSONL file, or a Hugging Face dataset; bad input raises `DataError` naming the file, line and field.

Worked example (the offline default task):

    >>> problems = load_problems("arithmetic", split="train", seed=0)
    >>> problems[0].problem, problems[0].answer
    ('What is 8 * 4?', '32')
    >>> from reward import reward_for
    >>> reward_for("8 * 4 = 32, so the answer is \\boxed{32}.", problems[0])
    1.0
"""

from __future__ import annotations

import json
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

# ----------------------------------------------------------------------------------------------
# Problems


@dataclass
class Problem:
    problem: str  # the question shown to the model
    answer: str  # the reference answer
    kind: str = "math"  # "int" -> exact integer compare; "math" -> math-verify
    id: str = ""


class DataError(ValueError):
    """Bad task input (file, row or field); the message names the file and line."""


ARITHMETIC_LEVELS = (1, 2, 3, 4)


def _arithmetic_level(level: int) -> list[tuple[str, int]]:
    """All (question, answer) pairs of one difficulty level, in a fixed order."""
    out = []
    if level == 1:  # single-digit-ish: a+b, a-b (a>=b), a*b with a, b in 0..12
        for a in range(13):
            for b in range(13):
                out.append((f"What is {a} + {b}?", a + b))
                out.append((f"What is {a} * {b}?", a * b))
                if a >= b:
                    out.append((f"What is {a} - {b}?", a - b))
    elif level == 2:  # two-digit with one-digit
        for a in range(10, 100):
            for b in range(1, 10):
                out.append((f"What is {a} + {b}?", a + b))
                out.append((f"What is {a} - {b}?", a - b))
                if a <= 20:
                    out.append((f"What is {a} * {b}?", a * b))
    elif level == 3:  # two-digit with two-digit
        for a in range(10, 100):
            for b in range(10, 100):
                out.append((f"What is {a} + {b}?", a + b))
                out.append((f"What is {a} - {b}?", a - b))
    elif level == 4:  # three operands, mixed operators
        for a in range(2, 20):
            for b in range(2, 10):
                for c in range(1, 20):
                    out.append((f"What is {a} * {b} + {c}?", a * b + c))
                    out.append((f"What is {a} + {b} * {c}?", a + b * c))
    else:
        raise DataError(f"unknown arithmetic level {level}; levels are {ARITHMETIC_LEVELS}")
    return out


def arithmetic_problems(levels: tuple[int, ...], split: str, seed: int) -> list[Problem]:
    """Seeded arithmetic problems with integer answers; `train` and `heldout` are disjoint.

    A problem is held out iff crc32(question) is even, so the split never depends on the seed or on
    which levels are mixed. Levels are interleaved round-robin after a seeded shuffle of each level,
    so every prefix of the list has the levels in equal shares.
    """
    if split not in ("train", "heldout"):
        raise DataError(f"arithmetic split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(seed)
    per_level = []
    for level in levels:
        rows = [(q, a) for q, a in _arithmetic_level(level)
                if (zlib.crc32(q.encode()) % 2 == 0) == (split == "heldout")]
        rng.shuffle(rows)
        per_level.append([Problem(q, str(a), "int", f"arith-l{level}-{q}") for q, a in rows])
    mixed = []
    for i in range(max(len(p) for p in per_level)):
        mixed.extend(p[i] for p in per_level if i < len(p))
    return mixed


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _checked_fields(row: dict, where: str, problem_key: str, answer_key: str) -> tuple[str, str]:
    """-> (problem, answer) as strings, or a DataError saying at `where` (e.g. "d.jsonl:3") what is wrong.

    The problem must be a non-empty string; the answer a non-empty string or a finite number (42 -> "42").
    A list of answers (several accepted forms) gives its first one.
    """
    for key in (problem_key, answer_key):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (fields: {sorted(row)}); "
                            f"map names with --problem-key/--answer-key")
    problem, answer = row[problem_key], row[answer_key]
    if not isinstance(problem, str):
        raise DataError(f"{where}: {problem_key!r} must be a string, got {type(problem).__name__} {_short(problem)}")
    if not problem.strip():
        raise DataError(f"{where}: {problem_key!r} is empty")
    if isinstance(answer, list):
        answer = answer[0] if answer else ""
    if answer is None:
        raise DataError(f"{where}: {answer_key!r} is null")
    number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    non_finite = isinstance(answer, float) and not abs(answer) < float("inf")  # NaN, inf (JSON allows both)
    if not (isinstance(answer, str) or number) or non_finite:
        raise DataError(f"{where}: {answer_key!r} must be a string or a finite number, "
                        f"got {type(answer).__name__} {_short(answer)}")
    if not str(answer).strip():
        raise DataError(f"{where}: {answer_key!r} is empty")
    return problem, str(answer)


def load_jsonl(path: str, problem_key: str = "problem", answer_key: str = "answer") -> list[Problem]:
    """Rows `{"problem": ..., "answer": ...}` (other names via the key flags); errors name file:line.

    A null, empty or non-scalar answer, or a problem that is not a non-empty string, is an error (it
    would otherwise train silently on reward 0). Numeric answers become strings: 42 -> "42".
    """
    if os.path.isdir(path):
        raise DataError(f"{path} is a folder; give a JSONL file (one JSON object per line)")
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    problems = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            problem, answer = _checked_fields(row, f"{path}:{line_no}", problem_key, answer_key)
            problems.append(Problem(problem, answer, "math", str(row.get("id", f"{Path(path).stem}-{line_no}"))))
    if not problems:
        raise DataError(f"{path}: no rows")
    return problems


def load_problems(spec: str, split: str = "train", seed: int = 0, problem_key: str = "problem",
                  answer_key: str = "answer") -> list[Problem]:
    """`arithmetic` / `arithmetic:1,2,3` (levels), a JSONL path, or a Hugging Face dataset name.

    split: "train"; "heldout", disjoint from "train" (only the arithmetic task has one: a file or a HF
    dataset raises DataError rather than hand back its training rows); "benchmark", the rows to evaluate on
    (a whole file, a HF dataset's test split, the arithmetic held-out split).
    """
    if split not in ("train", "heldout", "benchmark"):
        raise ValueError(f"split must be 'train', 'heldout' or 'benchmark', got {split!r}")
    if spec == "arithmetic" or spec.startswith("arithmetic:"):
        given = spec.split(":", 1)[1].split(",") if ":" in spec else ["1", "2"]
        if not all(x.strip().isdigit() for x in given):
            raise DataError(f"{spec!r}: levels are integers, e.g. 'arithmetic:1,2' (levels {ARITHMETIC_LEVELS})")
        levels = tuple(int(x) for x in given)
        return arithmetic_problems(levels, "train" if split == "train" else "heldout", seed)
    if split == "heldout":
        raise DataError(f"{spec!r} has no held-out split (only the built-in arithmetic task has one); "
                        "pass a separate file of held-out problems with --eval-data FILE")
    if spec.endswith(".jsonl") or os.path.exists(spec):
        return load_jsonl(spec, problem_key, answer_key)
    try:  # a hub dataset name: only works where a network (or a local HF cache) is there
        import datasets
    except ImportError:
        raise DataError(f"{spec!r} is not a file, not 'arithmetic', and `datasets` is not installed") from None
    try:
        rows = datasets.load_dataset(spec, split="test" if split == "benchmark" else split)
    except Exception as e:  # noqa: BLE001 - hub errors vary; name the input instead of a deep traceback
        raise DataError(f"could not load {spec!r} as a file or a Hugging Face dataset: {e}") from None
    return [Problem(*_checked_fields(r, f"{spec}[{i}]", problem_key, answer_key), "math", f"{spec}-{i}")
            for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------------------------
# Prompts

INSTRUCTION = "Put your final answer in \\boxed{}."


def format_prompt(tokenizer, problem: Problem) -> list[int]:
    """Chat-template token ids asking for the final answer in \\boxed{}."""
    messages = [{"role": "user", "content": f"{problem.problem} {INSTRUCTION}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


# ----------------------------------------------------------------------------------------------
# The data position of a run (resumable)


class PromptStream:
    """A seeded shuffle of the training problems per epoch; (epoch, position) is the resumable state."""

    def __init__(self, problems: list[Problem], seed: int):
        self.problems, self.seed, self.epoch, self.position = problems, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):  # epoch boundary
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.problems[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle()
