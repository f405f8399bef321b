"""Math answers graded by math-verify in warm worker processes, each answer under its own timeout, and
`score_responses`, which scores a batch (integer tasks in-process by reward.reward_for) and counts timeouts, empty
and truncated responses.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from reward import _gold_latex, _response_latex, reward_for


class _VerifierTimeout(BaseException):
    """SIGALRM's per-answer timeout. A BaseException, so math-verify's `except Exception` cannot swallow it."""


_ALARMS = [0]  # SIGALRMs received in this worker: a library's bare `except:` can swallow the exception, not this


def _raise_timeout(signum, frame):
    _ALARMS[0] += 1
    raise _VerifierTimeout()


def _math_verify_worker(args: tuple[str, str, float]) -> str:
    """Runs in a worker process's main thread, where SIGALRM timeouts work. -> 'correct'|'wrong'|'timeout'."""
    gold, response, timeout_s = args
    response_latex = _response_latex(response, gold)
    if response_latex is None:
        return "wrong"
    from math_verify import parse, verify
    previous, alarms = signal.signal(signal.SIGALRM, _raise_timeout), _ALARMS[0]
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            gold_parsed = parse(_gold_latex(gold), parsing_timeout=None)
            ok = verify(gold_parsed, parse(response_latex, parsing_timeout=None), timeout_seconds=None)
            verdict = "correct" if ok else "wrong"
        except Exception:  # noqa: BLE001 - an unparsable answer is wrong, not a crash
            verdict = "wrong"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return "timeout" if _ALARMS[0] != alarms else verdict  # an alarm sympy swallowed is still a timeout
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


WORKER_COMMAND = "import sys; sys.path.insert(0, {folder!r}); import verifier; verifier.serve_verifier()"


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
