"""The engine's sleep / wake / load / generate order within a step (pure call-order logic), through the real loop.

train.main runs on the tiny model with the REAL VLLMEngine methods (sleep, wake, load_weights, generate) in their GPU
mode (sleep mode on) over a recording stand-in for vllm.LLM: no vLLM engine is built, the trainer, GenAC's critic and
their updates are real. The rules checked (rollout.VLLMEngine):
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

    import genac
    import rollout
    import train

    events = []
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = "I think it is \\boxed{5}"
    answer_ids = tok(text, add_special_tokens=False)["input_ids"]

    class RecordingEngine(rollout.VLLMEngine):
        def __init__(self, model_path, dtype="bfloat16", **_):
            self.on_gpu, self.sleeps, self.dtype, self.model_path = False, True, getattr(torch, dtype), model_path
            self.holder, self.asleep, self.closed = "actor", set(), False
            self.llm = RecordingLLM(events, self, answer_ids, text)

        def load_weights(self, named_tensors, holder="actor"):
            super().load_weights(named_tensors, holder)
            events.append(("load", holder))

    def recorded_update(name, update):
        def wrapper(*args, **kwargs):
            engine = rollout.trainer_engine()
            events.append((name, tuple(sorted(engine.asleep)), engine.holder))
            return update(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(rollout, "VLLMEngine", RecordingEngine)
    monkeypatch.setattr(train, "ppo_update", recorded_update("actor update", train.ppo_update))
    monkeypatch.setattr(genac, "ppo_update", recorded_update("critic update", genac.ppo_update))
    monkeypatch.setattr(rollout, "_TRAINER_ENGINE", [])
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


def test_genac_judges_on_the_actor_engine_and_holds_nothing_in_the_updates(monkeypatch, tiny_model, tmp_path):
    events = run_recorded(
        monkeypatch, tiny_model, tmp_path, "--algo", "genac", "--segment-tokens", "4", "--critic-max-new-tokens", "8"
    )
    step = [
        ("generate", "actor"),
        ("sleep", 2),
        ("wake", ("weights",)),
        ("reset_prefix_cache",),
        ("load", "critic"),
        ("wake", ("kv_cache",)),
        ("generate", "critic"),
        ("sleep", 2),
        ("actor update", ASLEEP, "critic"),
        ("critic update", ASLEEP, "critic"),
        *SYNC,
    ]
    assert events == step + step


def test_a_warmup_step_sleeps_at_level_1_and_loads_nothing(monkeypatch, tiny_model, tmp_path):
    events = run_recorded(monkeypatch, tiny_model, tmp_path, "--algo", "vcppo", "--critic-warmup-steps", "1")
    warmup = [("generate", "actor"), ("sleep", 1), ("wake", ("weights", "kv_cache"))]
    rl = [("generate", "actor"), ("sleep", 2), ("actor update", ASLEEP, "actor"), *SYNC]
    assert events == warmup + rl + rl


def test_a_second_sleep_capable_engine_in_one_process_is_refused():
    import rollout

    first = SimpleNamespace(closed=False, model_path="/models/actor")
    with pytest.raises(RuntimeError, match="one per process"):
        rollout._claim_sleep_mode(first, "/models/other-critic")
    rollout._claim_sleep_mode(
        SimpleNamespace(closed=True, model_path="/models/actor"), "/models/critic"
    )  # closed: fine
    rollout._claim_sleep_mode(None, "/models/actor")


def test_a_prefix_cache_that_was_not_reset_stops_the_run():
    """vLLM's reset_prefix_cache() answers False when it could not reset (requests still hold blocks): old-weight KV
    would then serve the new weights, so the load stops with a message instead of going on."""
    from types import SimpleNamespace

    import torch

    from rollout import VLLMEngine
    engine = VLLMEngine.__new__(VLLMEngine)
    engine.asleep, engine.dtype, engine.holder = set(), torch.float32, "actor"
    for answer, fails in ((False, True), (True, False), (None, False)):
        engine.llm = SimpleNamespace(collective_rpc=lambda *a, **k: None, reset_prefix_cache=lambda: answer)
        if fails:
            with pytest.raises(RuntimeError, match="did not reset its prefix cache"):
                engine.load_weights([("w", torch.zeros(1))], holder="critic")
            assert engine.holder == "actor"
        else:
            engine.load_weights([("w", torch.zeros(1))], holder="critic")
            assert engine.holder == "critic"


@pytest.mark.slow  # imports vLLM
def test_the_engine_is_configured_for_the_device_it_is_given(monkeypatch):
    """Sleep mode, CUDA graphs and the memory budget follow `device_type`, not torch.cuda.is_available() (False on
    this CPU): a CUDA engine asks vLLM for them, a CPU engine for none. vLLM's LLM is a recorder here (no GPU)."""
    import vllm

    import rollout
    seen = []
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: seen.append(kwargs) or SimpleNamespace())
    monkeypatch.setattr(rollout.VLLMEngine, "_sleep_capable_in_process", None)
    gpu = rollout.VLLMEngine("m", device_type="cuda", gpu_memory_utilization=0.55)
    assert gpu.on_gpu and gpu.sleeps
    assert seen[-1]["enable_sleep_mode"] and seen[-1]["gpu_memory_utilization"] == 0.55
    assert not seen[-1]["enforce_eager"]  # CUDA graphs on a GPU
    monkeypatch.setattr(rollout.VLLMEngine, "_sleep_capable_in_process", None)
    cpu = rollout.VLLMEngine("m", device_type="cpu", gpu_memory_utilization=0.55)
    assert not cpu.on_gpu and not cpu.sleeps
    assert "gpu_memory_utilization" not in seen[-1] and "enable_sleep_mode" not in seen[-1]
    assert seen[-1]["enforce_eager"]
