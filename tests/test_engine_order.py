"""The engine's sleep / wake / load / generate order within a step (pure call-order logic), through the real loop.

train.main runs on the tiny model with the REAL VLLMEngine methods (sleep, wake, load_weights, generate) in their GPU
mode (sleep mode on) over a recording stand-in for vllm.LLM: no vLLM engine is built, the trainer, GenAC's critic and
their updates are real. The rules checked (engine.VLLMEngine):
    GRPO    generate(actor) -> sleep(2) -> actor update (engine asleep) -> wake(weights) -> load(actor)
            -> wake(kv_cache)
    GenAC   generate(actor) -> sleep(2) -> wake(weights) -> load(critic) -> wake(kv_cache) -> generate(critic)
            -> sleep(2)
            -> actor update -> critic update (engine asleep: no critic weights or KV on the GPU) -> wake(weights)
            -> load(actor) -> wake(kv_cache)
    VC-PPO  a warm-up step (the actor does not change) sleeps at level 1 and wakes everything without a load.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RecordingLLM:
    """Stands in for vllm.LLM: records sleep / wake_up / reload_weights / generate; answers with one fixed text."""

    def __init__(self, events: list, engine, answer_ids: list[int], answer_text: str):
        self.events, self.engine, self.answer_ids, self.answer_text = events, engine, answer_ids, answer_text

    def sleep(self, level):
        self.events.append(("sleep", level))

    def wake_up(self, tags=None):
        self.events.append(("wake", tuple(tags)))

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights"
        assert sum(1 for _ in kwargs["weights_iterator"]) > 0  # consumes the streamed (collective) gather

    def reset_prefix_cache(self):
        self.events.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=False):
        self.events.append(("generate", self.engine.holder))
        logprobs = [{t: SimpleNamespace(logprob=-1.0)} for t in self.answer_ids]
        return [
            SimpleNamespace(
                num_cached_tokens=0,  # vLLM's RequestOutput reports the prompt tokens its prefix cache held
                outputs=[
                    SimpleNamespace(
                        token_ids=self.answer_ids, logprobs=logprobs, text=self.answer_text, finish_reason="stop"
                    )
                    for _ in range(p.n)
                ]
            )
            for p in params
        ]


def run_recorded(monkeypatch, tiny_model, tmp_path, *flags) -> list:
    """train.main with the recording engine; -> the events, with each update's view of the engine."""
    pytest.importorskip("vllm")  # VLLMEngine.generate builds vLLM's SamplingParams
    import torch
    from transformers import AutoTokenizer

    import engine
    import train

    events, engines = [], []  # engines: the loop's, as train.py builds it
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "I think it is \\boxed{5}"
    answer_ids = tok(text, add_special_tokens=False)["input_ids"]

    class RecordingEngine(engine.VLLMEngine):
        def __init__(self, model_path, dtype="bfloat16", **_):
            self.on_gpu, self.sleeps, self.dtype, self.model_path = False, True, getattr(torch, dtype), model_path
            self.holder, self.asleep, self.closed = "actor", set(), False
            self.llm = RecordingLLM(events, self, answer_ids, text)
            engines.append(self)

        def load_weights(self, named_tensors, holder="actor"):
            super().load_weights(named_tensors, holder)
            events.append(("load", holder))

    def recorded_update(update):
        models = []  # [the first model updated]: the actor (its update comes before any critic's)

        def wrapper(*args, **kwargs):
            if not models:
                models.append(args[0])
            loop_engine, name = engines[0], "actor update" if args[0] is models[0] else "critic update"
            events.append((name, tuple(sorted(loop_engine.asleep)), loop_engine.holder))
            return update(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(engine, "VLLMEngine", RecordingEngine)
    monkeypatch.setattr(train, "ppo_update", recorded_update(train.ppo_update))  # the actor's, and step.update
    train.main(
        [
            "--model",
            tiny_model,
            "--out",
            str(tmp_path / "run"),
            "--prompts-per-step",
            "2",
            "--rollouts-per-prompt",
            "2",
            "--max-new-tokens",
            "16",
            "--engine",
            "vllm",
            "--no-eval",
            "--steps",
            "2",
            *flags,
        ]
    )
    return events


ASLEEP = ("kv_cache", "weights")
SYNC = [("wake", ("weights",)), ("reset_prefix_cache",), ("load", "actor"), ("wake", ("kv_cache",))]


def test_grpo_sleeps_at_level_2_and_wakes_weights_before_the_kv_cache(monkeypatch, tiny_model, tmp_path):
    events = run_recorded(monkeypatch, tiny_model, tmp_path, "--algo", "grpo")
    step = [("generate", "actor"), ("sleep", 2), ("actor update", ASLEEP, "actor"), *SYNC]
    assert events == step + step


GENAC_JUDGE = [("generate", "actor"), ("sleep", 2), ("wake", ("weights",)), ("reset_prefix_cache",), ("load", "critic"),
               ("wake", ("kv_cache",)), ("generate", "critic"), ("sleep", 2), ("actor update", ASLEEP, "critic")]
GENAC_FLAGS = ("--algo", "genac", "--segment-tokens", "4", "--critic-max-new-tokens", "8")


def test_genac_judges_on_the_actor_engine_and_holds_nothing_in_the_updates(monkeypatch, tiny_model, tmp_path):
    """Every critic answer here is the recording engine's "\\boxed{5}", so every R_v is equal and the critic's
    advantages are all 0; zero_advantage_ranks reports signal anyway, so the critic's full update runs (as when
    some answer differs) and must find the engine asleep."""
    import genac
    monkeypatch.setattr(genac.GenAC, "zero_advantage_ranks", lambda self, advantages, all_reduce: 0)
    events = run_recorded(monkeypatch, tiny_model, tmp_path, *GENAC_FLAGS)
    step = [*GENAC_JUDGE, ("critic update", ASLEEP, "critic"), *SYNC]
    assert events == step + step


def test_genac_skips_the_critic_update_without_signal_and_keeps_the_engine_order(monkeypatch, tiny_model, tmp_path):
    """The same run with equal critic rewards: no critic forward or backward (no ppo_update call), the rest of the
    order unchanged, and the skip counted in the step's metrics."""
    import json
    events = run_recorded(monkeypatch, tiny_model, tmp_path, *GENAC_FLAGS)
    step = [*GENAC_JUDGE, *SYNC]
    assert events == step + step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "genac/critic_update_skipped" in r]
    assert [r["genac/critic_update_skipped"] for r in rows] == [1, 1]
    assert [r["genac/critic_zero_ranks"] for r in rows] == [1, 1]
