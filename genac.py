"""GenAC end to end: a generative critic that reasons in text before it values a state.

Paper: "Bringing Value Models Back: Generative Critics for Value Modeling in LLM Reinforcement Learning"
(Zhong et al., 2026, arXiv:2604.10701; §5, Algorithm 1 in App. B). The critic is a causal LM that reads
a state — the problem and the actor's partial solution — and reasons before it states an integer 0-10
(value v = n / 10). One iteration of `python train.py --algo genac`:

    1. the actor samples responses y; the verifier scores them (r ∈ {0, 1}); the ICC hint tau follows
       the actor's success rate:  tau <- c tau + (1 - c) r                          (Alg. 1 l. 7) `GenAC.segment_values`
    2. each response is cut into segments y_1 .. y_T (~ --segment-tokens each, token-exact); the
       critic states are s_k = x ∘ y_<k (s_1 = the bare prompt)                     (l. 12)  `genac_segments`
    3. ONE engine call: the critic answers the ICC prompt (Fig. 3) of every state -> v_k = n / 10
       (unparsable -> tau, counted); prompts built from tokens, so the states of one response share
       the exact prefix template head + problem + y_<k (the engine's prefix cache reuses it)
                                                                                    (l. 14-16) `GenAC.judge_prompts`
    4. v_k on every token of segment k, token-level GAE (lambda = 1: A_t = r - v_k), whitened; the actor
       takes the shared PPO update                                                  (l. 19-22) `GenAC.advantages`
    5. the critic's reward is R_v = 1 - (r - v_k)^2 (0 when unparsable); it takes ONE REINFORCE step
       -(R_v - b) log pi_phi(z_t | s_k, z_<t) (--critic-mini-batches 1), b = batch mean of R_v, all states of one
       response in one packed row (the response once, not once per state); its engine gets the new weights.
       Every advantage exactly 0 (all R_v equal): the optimizer steps on zero gradients, no forward or backward
                                                                                    (l. 17, 23) `GenAC.after_update`
Defaults: `GenAC.check_arguments` picks the paper's (L1 ~ 120, no segment cap, 1024 critic tokens, free answers) for
any --model, CPU-sized ones (32, 8, 128, answers guided to \boxed{0..10}: the untrained 135M critic never boxes one) for
the offline default model; tau starts at 0 (Alg. 1 l. 1) unless --icc-carry-over. A parse rate below 0.5 for 3 steps
in a row prints one warning naming the fix.

Training pipeline (paper §5.2): SFT from a teacher and RL pretraining with the actor frozen are the
commands of genac_stages.py; joint training is this file through the loop:
    python genac_stages.py sft --teacher MODEL          # teacher answers ICC prompts -> JSONL -> SFT the critic
    python genac_stages.py pretrain --critic DIR        # RL pretraining, actor frozen, until value MSE stops falling
    python train.py --algo genac --critic DIR           # joint training
    python genac_stages.py explain --critic DIR         # one response's segments, values and advantages, printed
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from actor import (adamw, all_gather_objects, all_reduce, load_actor, mini_batch_indices, ppo_update,
                   shared_prefix_tokens, stream_full_parameters)
from advantage import whitened_gae
from checkpoint import load_sharded, save_model_folder
from flags import GenACFlags
from genac_segments import retokenized_prefixes, segment_boundaries, segment_values_to_tokens, token_texts
from rollout import build_rollout_batch, make_engine, resolve_model_path, same_architecture

# Guided answers (answer_regex) bound the reasoning by a repetition {0, 2 x budget}: xgrammar compiles the cpu profile's
# in 1-4 s on a 2-core CPU, longer under load (measured: past 5 s with two ranks on 2 cores) and at the paper's 1024
# tokens. vLLM refuses a regex that takes over VLLM_REGEX_COMPILATION_TIMEOUT_S (5 s, a guard against hostile
# patterns) and the call's answers fail (parse failures). Ours is fixed: set before any engine reads it (vLLM caches its
# environment once an engine runs); a value already set wins.
os.environ.setdefault("VLLM_REGEX_COMPILATION_TIMEOUT_S", "120")

# ---------------------------------------------------------------------------------------------
# 1. The critic's prompt, its answer, its reward, and the ICC hint tau


def format_actor_size(num_parameters: int) -> str:
    """134_515_008 -> '135M', 1_543_714_304 -> '1.5B', 8_030_261_248 -> '8B'."""
    if num_parameters >= 1e9:
        b = num_parameters / 1e9
        return f"{b:.0f}B" if b >= 10 or abs(b - round(b)) < 0.05 else f"{b:.1f}B"
    return f"{num_parameters / 1e6:.0f}M"


def icc_prompt(problem: str, partial_solution: str, actor_size: str | None, success_rate: float | None) -> str:
    """The critic's prompt (paper Fig. 3). The ICC hints — actor size and running success rate — are
    dropped when None (`--no-icc`, the paper's Table 2 ablation); the rest of the template stays."""
    who = f"A {actor_size} language model" if actor_size else "A language model"
    rate = (f" For your reference, the average success rate of the model on the dataset is {success_rate:.2f}."
            if success_rate is not None else "")
    return (f"{who} is solving a math problem. Your job is to evaluate its probability of success, given the partial "
            f"solution it has already generated.{rate}\n\n"
            f"<problem>{problem}</problem>\n\n"
            f"<partial_solution>{partial_solution}</partial_solution>\n\n"
            "Instructions:\n"
            "1. Evaluate the difficulty of the problem.\n"
            "2. Recover the capabilities of the model based on the partial solution.\n"
            "3. Skim through the partial solution and detect any progress, error, or confusion.\n"
            "4. Analyze the probability of success if the model finishes the solution.\n"
            "5. Output the final answer as an integer between 0 and 10 inclusive (10 most likely), inside \\boxed{}.")


_BOXED = re.compile(r"\\boxed\s*\{")


def parse_critic_value(text: str) -> float | None:
    """The last \\boxed{n} with an integer 0 <= n <= 10 -> n / 10; anything else -> None (a parse failure):
    '... \\boxed{3} then \\boxed{7}' -> 0.7;  '\\boxed{11}' -> None;  '\\boxed{7.5}' -> None;  no box -> None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    i, depth = (starts[-1] if starts else len(text)), 1  # no box: the loop does not run
    for j in range(i, len(text)):  # match braces so \\boxed{\\text{7}} is read whole
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            content = text[i:j].strip()
            return int(content) / 10 if re.fullmatch(r"\d{1,2}", content) and int(content) <= 10 else None
    return None


def answer_regex(max_new_tokens: int) -> str:
    """The critic's answer format as a regex for the engine's guided decoding (`--critic-guided`, and the SFT
    teacher by default): reasoning without backslashes, at most 2 characters per token of budget, then
    \\boxed{0..10}. Small models rarely box a score unprompted (SmolLM2-135M: 0 of 372); this makes every answer
    parse, except one out of tokens first (a counted parse failure)."""
    return r"[^\\]{0,%d}\\boxed\{(10|[0-9])\}" % (2 * max_new_tokens)


def critic_reward(actor_reward: float, value: float | None) -> float:
    """R_v = 1 - (r - v)^2 (paper §5.2); 0 when the critic's answer did not parse."""
    return 0.0 if value is None else 1.0 - (actor_reward - value) ** 2


def critic_advantages(critic_rewards: torch.Tensor, baseline: str = "mean",
                      batch_mean: float | None = None) -> torch.Tensor:
    """REINFORCE-with-baseline advantage of each critic answer: R_v - b with b the batch mean of R_v ('mean'; pass
    `batch_mean` when the batch spans ranks), or R_v ('none'). [M] -> [M]."""
    if baseline not in ("mean", "none"):
        raise ValueError(f"unknown critic baseline {baseline!r}; choose 'mean' or 'none'")
    return (critic_rewards - (critic_rewards.mean() if batch_mean is None else batch_mean) if baseline == "mean"
            else critic_rewards.clone())


class RunningSuccessRate:
    """The ICC hint tau (Alg. 1 l. 7): tau <- c tau + (1 - c) r per sample, tau_0 = 0; reported bias-corrected
    as tau / (1 - c^n) after n samples (so a constant stream reads as that constant from the first sample)."""

    def __init__(self, momentum: float = 0.999):
        self.momentum, self.tau, self.count = momentum, 0.0, 0

    def update(self, rewards) -> None:
        for r in rewards:
            self.tau = self.momentum * self.tau + (1.0 - self.momentum) * float(r)
            self.count += 1

    @property
    def value(self) -> float | None:
        return None if self.count == 0 else self.tau / (1.0 - self.momentum ** self.count)

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "tau": self.tau, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.momentum, self.tau, self.count = state["momentum"], state["tau"], state["count"]


# ---------------------------------------------------------------------------------------------
# 2. The algorithm: the critic (its own model, optimizer, engine and tau), its values, its update


def flops_vs_ppo(actor_tokens: float, critic_tokens: float, critic_trained_tokens: float | None = None) -> float:
    """Training FLOPs over PPO's, same-size critic (App. C): PPO = 10 P T + 8 P T (its critic's forward + update on the
    actor's T tokens), GenAC = 10 P T + 8 P T_c -> (10 T + 8 T_c) / (18 T), where the critic's 8 P per token is 2 P to
    judge (prefill or generate) and 6 P to train. With the critic's judged tokens J and trained tokens U counted apart:
    (10 T + 2 J + 6 U) / (18 T) (U = J when not given). We log J = the prompt tokens the engine computed + the generated
    ones, U = the tokens the critic's update runs (measured), and the paper's T_c = T + (T / L1) L2 = T + generated
    tokens (estimate). (100, 250) -> 1.667; (100, 250, 100) -> 1.167."""
    trained = critic_tokens if critic_trained_tokens is None else critic_trained_tokens
    return (10 * actor_tokens + 2 * critic_tokens + 6 * trained) / (18 * max(actor_tokens, 1.0))


class GenAC(GenACFlags):
    """GenAC as train.py's algorithm interface; genac_stages.py uses it with the actor frozen. Its flags and the
    defaults that follow --model (PROFILES, check_arguments): flags.GenACFlags, torch-free."""

    memory_parts = frozenset({"generative critic"})  # what the memory plan (memory.py) counts beside the actor
    PARSE_WARNING = (0.5, 3)  # parse rate below 0.5 for 3 steps in a row -> one warning line per run

    def __init__(self, args, actor, tokenizer, device, world: int, checkpoint: Path | None = None):
        """actor: only its parameter count is read (the ICC size hint); tokenizer: the actor's. Critic prompts hold
        self.max_prompt_tokens (--critic-max-prompt-tokens, default: the actor's prompt + response limits + the ICC
        template in critic tokens); ValueError if that + --critic-max-new-tokens exceeds the critic's context."""
        from transformers import AutoConfig, AutoTokenizer
        self.args, self.device, self.world, self.actor_tokenizer = args, device, world, tokenizer
        path = resolve_model_path(args.critic_model or args.model)  # a resumed run's shards are read over it below
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.tokenizer.eos_token_id)
        self.reads_actor_tokens = self.tokenizer.get_vocab() == tokenizer.get_vocab()  # else: retokenized_prefixes
        actor_parameters = sum(p.numel() for p in actor.parameters())
        self.actor_size = None if args.no_icc or not actor_parameters else format_actor_size(actor_parameters)
        template = len(self.chat_ids(icc_prompt("", "", self.actor_size, None if args.no_icc else 0.0)))
        self.max_prompt_tokens = (args.critic_max_prompt_tokens
                                  or args.max_prompt_tokens + args.max_new_tokens + template)
        self.max_model_len, self.prompts_cut = self.max_prompt_tokens + args.critic_max_new_tokens, 0
        limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        if limit and self.max_model_len > limit:
            raise ValueError(f"critic prompts of {self.max_prompt_tokens} tokens (--critic-max-prompt-tokens; "
                             f"default: --max-prompt-tokens + --max-new-tokens + {template} ICC template tokens) "
                             f"+ --critic-max-new-tokens "
                             f"{args.critic_max_new_tokens} > the critic's {limit} positions (max_position_embeddings)")
        self.model = load_actor(path, device, world, args)
        self.optimizer = adamw(self.model.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
        if checkpoint:
            load_sharded(checkpoint / "critic" / "sharded", self.model, self.optimizer)
        # The critic's engine [design: one sleep-capable vLLM engine per process, rollout.VLLMEngine]. A critic of
        # the actor's architecture (the default: it starts from the actor's base model) judges on the training loop's
        # engine with its weights swapped in (`judge`): no second KV cache, nothing of the critic's on the GPU in the
        # actor's update. That engine must hold the critic's prompts too: `engine_max_model_len` tells train.py (it
        # builds the engine after this and hands it over: `use_engine`). Tools without a loop engine (genac_stages.py,
        # tools/values.py), or a critic of another architecture on the CPU, get an engine of their own, built at first
        # use (`engine`); on a GPU the latter is refused there.
        self.path, self._engine, self.shares_engine, self.loop_engine = path, None, False, None
        self.same_architecture = same_architecture(path, resolve_model_path(args.model))
        self.engine_max_model_len = self.max_model_len if self.same_architecture else 0
        self._rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        # tau: resumed; a stage's: --icc-carry-over
        icc_state = Path(checkpoint / "critic" if checkpoint else path) / "genac_state.json"
        self.success_rate = RunningSuccessRate(args.icc_momentum)
        carry = icc_state.is_file() and (checkpoint is not None or args.icc_carry_over)
        if carry:
            self.success_rate.load_state_dict(json.loads(icc_state.read_text())["success_rate"])
        # answers: this iteration's, from `segment_values`
        self.warmup_steps, self.hidden_features, self.answers = 0, None, None
        self.low_parse_steps, self.parse_warned = 0, False  # `warn_on_parse_failures`
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"[genac] {args.genac_profile} profile: segment_tokens={args.segment_tokens} "
                  f"max_segments={args.max_segments} critic_max_new_tokens={args.critic_max_new_tokens} "
                  f"critic_max_prompt_tokens={self.max_prompt_tokens} (ICC template {template}); answers "
                  f"{'guided (--no-critic-guided: free, as the paper)' if args.critic_guided else 'free'}; "
                  f"tau {'from ' + str(icc_state) if carry else 'starts at 0'}", file=sys.stderr, flush=True)

    def use_engine(self, engine) -> None:
        """The training loop's engine, handed over once it is built (train.py's interface): the critic judges on it."""
        self.loop_engine = engine

    @property
    def engine(self):
        """The engine the critic judges on: the loop's (weights swapped, `judge`) when the architectures match, else
        its own (sleep mode off), built on first use. A loop engine with sleep mode (GPU) and a critic of another
        architecture: refused (vLLM allows one sleep-capable engine per process)."""
        if self._engine is None:
            shared = self.loop_engine
            if shared is not None and self.same_architecture:
                self._engine, self.shares_engine = shared, True
            elif shared is not None and getattr(shared, "sleeps", False):
                raise RuntimeError(f"the critic {self.path} has another architecture than the actor {self.args.model}: "
                                   "it would need a second vLLM engine, which cannot sleep beside the actor's (one "
                                   "sleep-capable engine per process) and would hold its memory through the actor's "
                                   "update. Start the critic from the actor's base model (genac_stages.py sft/pretrain "
                                   "with --model set to the actor), or use --engine hf")
            else:
                args = self.args
                self._engine = make_engine(args.engine or "vllm", self.path, dtype=args.engine_dtype,
                                           seed=args.seed + 1, sleep_mode=False, max_model_len=self.max_model_len,
                                           gpu_memory_utilization=args.gpu_memory_utilization, world_size=self.world)
                weights = stream_full_parameters(self.model, args.sync_bucket_mb, self._engine.dtype)
                self._engine.load_weights(weights, holder="critic")
        return self._engine

    @engine.setter
    def engine(self, engine) -> None:  # genac_stages.py lends the critic a teacher's engine for a while
        self._engine = engine

    def sample(self, problems, prompt_ids, generate, seed: int):
        return (*generate([self.args.rollouts_per_prompt] * len(prompt_ids), seed), {})

    def chat_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True)
        return list(ids["input_ids"] if not isinstance(ids, list) else ids)

    def icc_text(self, problem: str, partial_solution: str) -> str:
        """The ICC prompt of one state (no hints under --no-icc), tau as it is now."""
        rate = None if self.args.no_icc else (self.success_rate.value if self.success_rate.value is not None else 0.0)
        return icc_prompt(problem, partial_solution, None if self.args.no_icc else self.actor_size, rate)

    def fit_prompt(self, ids: list[int]) -> list[int]:
        """A prompt longer than self.max_prompt_tokens (only with a small --critic-max-prompt-tokens) keeps its last
        tokens and is counted in self.prompts_cut."""
        self.prompts_cut += len(ids) > self.max_prompt_tokens
        return ids[-self.max_prompt_tokens:]

    def prompt_ids(self, problem: str, partial_solution: str) -> list[int]:
        """The chat-formatted ICC prompt of one state, tokenized from its text (the stages' states, tools/values.py)."""
        return self.fit_prompt(self.chat_ids(self.icc_text(problem, partial_solution)))

    def prompt_parts(self, problem: str) -> tuple[list[int], list[int]]:
        """The chat-formatted ICC prompt cut where the partial solution goes -> (head ids, closing ids), each tokenized
        alone: the prompt of state k is head + y_<k + closing, token-exact, so all states of a response (and all
        responses to one problem) share the prefix head + y_<k. Tokenizing each state's text differs: SmolLM2's BPE
        reads the empty partial solution's '></' as one token, and a decoded prefix need not re-encode to the actor's
        tokens."""
        slot = "\x00partial-solution\x00"
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": self.icc_text(problem, slot)}],
                                                  add_generation_prompt=True, tokenize=False)
        head, closing = text.split(slot)
        return [self.tokenizer.encode(part, add_special_tokens=False) for part in (head, closing)]

    def response_prefixes(self, response_ids: list[int], starts: list[int]) -> list[list[int]]:
        """y_<s for each start s, in the critic's tokens: the actor's own when they share a tokenizer, else the response
        tokenized once by the critic (retokenized_prefixes)."""
        if self.reads_actor_tokens:
            return [list(response_ids[:s]) for s in starts]
        return retokenized_prefixes(self.actor_tokenizer, self.tokenizer, response_ids, starts)

    def judge(self, problems: list[str], partials: list[str], seed: int, temperature: float | None = None,
              guided: bool | None = None):
        """Step 3 on states given as text -> judge_prompts of their tokenized ICC prompts."""
        prompts = [self.prompt_ids(q, y) for q, y in zip(problems, partials)]
        return self.judge_prompts(prompts, seed, temperature, guided)

    def judge_prompts(self, prompts: list[list[int]], seed: int, temperature: float | None = None,
                      guided: bool | None = None):
        """Step 3: ONE engine call for all states -> (critic prompt ids, samples, values in [0, 1] or None when
        unparsable). guided (default --critic-guided): answers constrained to `answer_regex` by the engine.

        Prefix reuse: the vLLM engine runs with enable_prefix_caching, so a state's prompt computes only what is not
        in the cache in whole KV blocks (16 tokens on GPU; 128 tokens in vLLM 0.32's CPU backend):
        the template head, the problem and y_<k are shared by the states of a response, and the head + problem by
        the responses to one problem. Effective on GPU and on CPU alike (vLLM 0.32's CPU platform turns prefix caching
        off only for MLA models; its attention kernel reads the cached blocks), within this call: a weight sync
        empties the cache (rollout.VLLMEngine.load_weights). The engine reports the prompt tokens it found cached
        (RequestOutput.num_cached_tokens, engine.cached_prompt_tokens); --engine hf has no cache and reports none."""
        guided = self.args.critic_guided if guided is None else guided
        regex = answer_regex(self.args.critic_max_new_tokens) if guided else None
        temperature = self.args.critic_temperature if temperature is None else temperature
        engine = self.engine
        if self.shares_engine:  # the loop's engine slept (level 2) after generating: critic weights in, then KV cache
            engine.wake(["weights"])
            weights = stream_full_parameters(self.model, self.args.sync_bucket_mb, engine.dtype)
            engine.load_weights(weights, holder="critic")
            engine.wake(["kv_cache"])
        outputs = engine.generate(prompts, 1, self.args.critic_max_new_tokens, temperature, 1.0, seed, regex=regex)
        samples = [g[0] for g in outputs]
        if self.shares_engine:  # nothing of the critic's stays on the GPU through the updates; the sync loads the actor
            engine.sleep(level=2)
        return prompts, samples, [parse_critic_value(s.text) for s in samples]

    def fallback_value(self) -> float:
        """A state whose answer does not parse takes the running success rate tau as its value."""
        return self.success_rate.value if self.success_rate.value is not None else 0.5

    def segment_values(self, batch, problems, seed: int) -> tuple[torch.Tensor, dict]:
        """Steps 1-3 for this rank's rollouts -> token values [N, R] (v_k on every token of segment k), metrics.
        Keeps the critic's answers and rewards in self.answers for `after_update`."""
        args, tokenizer, rewards = self.args, self.actor_tokenizer, batch.rewards.tolist()
        for rs in all_gather_objects(rewards):  # every rank's tau sees every rollout, in rank order
            self.success_rate.update(rs)
        owners, prompts, all_ends, parts, cut = [], [], [], {}, self.prompts_cut  # parts: problem -> (head, closing)
        for i in range(len(batch)):
            ids = batch.response_ids[i, : int(batch.response_lens[i])].tolist()
            ends = segment_boundaries(token_texts(tokenizer, ids), args.segment_tokens, args.max_segments) or [0]
            all_ends.append(ends)
            problem = int(batch.group_index[i])
            head, closing = parts.setdefault(problem, self.prompt_parts(problems[problem].problem))
            for prefix in self.response_prefixes(ids, [0] + ends[:-1]):  # s_k = x ∘ y_<k, the first: the bare prompt
                owners.append(i)
                prompts.append(self.fit_prompt(head + prefix + closing))
        t = time.time()
        prompts, samples, parsed = self.judge_prompts(prompts, seed)
        t_judge, cut, cached = time.time() - t, self.prompts_cut - cut, getattr(self.engine, "cached_prompt_tokens", 0)
        values = [v if v is not None else self.fallback_value() for v in parsed]
        critic_rewards = [critic_reward(rewards[i], v) for i, v in zip(owners, parsed)]
        self.answers = {"prompts": prompts, "samples": samples, "critic_rewards": critic_rewards, "owners": owners}
        token_values, k = torch.zeros_like(batch.response_mask), 0  # [N, R]
        for i, ends in enumerate(all_ends):
            length = int(batch.response_lens[i])
            token_values[i, :length] = segment_values_to_tokens(values[k:k + len(ends)], ends, length)
            k += len(ends)
        totals = all_reduce(torch.tensor([len(parsed), sum(v is None for v in parsed), sum(critic_rewards),
                                          int(batch.attention_mask.sum()), sum(map(len, prompts)),
                                          sum(len(s.token_ids) for s in samples), cut, cached],
                                         dtype=torch.float64))
        states, failures, reward_sum, actor_tokens, critic_prompt_tokens, critic_generated_tokens, cut, cached = (
            totals.tolist())
        self.answers["judged_tokens"] = critic_prompt_tokens - cached + critic_generated_tokens  # all ranks'
        self.warn_on_parse_failures(1.0 - failures / max(states, 1))
        self.answers["actor_tokens"] = actor_tokens
        return token_values, {
            "genac/states": int(states), "genac/parse_failures": int(failures),
            "genac/parse_rate": 1.0 - failures / max(states, 1),
            "genac/critic_reward": reward_sum / max(states, 1), "genac/icc_success_rate": self.fallback_value(),
            "genac/critic_prompts_cut": int(cut), "time/critic_generate": t_judge, "cost/actor_tokens": actor_tokens,
            "cost/critic_prompt_tokens": int(critic_prompt_tokens), "cost/critic_prompt_tokens_cached": int(cached),
            "cost/critic_generated_tokens": int(critic_generated_tokens),
            "cost/flops_vs_ppo_paper_estimate": flops_vs_ppo(actor_tokens, actor_tokens + critic_generated_tokens)}

    def warn_on_parse_failures(self, parse_rate: float) -> None:
        """One warning line per run when the parse rate (all ranks') stays below PARSE_WARNING's threshold for its
        number of steps in a row: unparsable answers are valued at tau and rewarded 0, so the critic learns nothing."""
        threshold, steps = self.PARSE_WARNING
        self.low_parse_steps = self.low_parse_steps + 1 if parse_rate < threshold else 0
        if self.low_parse_steps < steps or self.parse_warned:
            return
        self.parse_warned = True
        if self._rank == 0:
            print(f"[genac] WARNING: critic parse rate {parse_rate:.2f} < {threshold} for {steps} steps in a row: its "
                  "states are valued at tau and its REINFORCE step has no signal. Fix: guided answers "
                  "(--critic-guided) or a staged critic (python genac_stages.py sft, then pretrain; --critic DIR)",
                  file=sys.stderr, flush=True)

    def advantages(self, batch, problems) -> tuple[torch.Tensor, dict]:
        """Step 4: segment values -> whitened token-level GAE. -> (token advantages [N, R], metrics)."""
        args = self.args
        seed = batch.extras["step"] * 31 + 5 + 1_000_003 * self._rank  # per rank: ranks judge different states
        token_values, metrics = self.segment_values(batch, problems, seed=seed)  # [N, R]
        advantages, _, gae = whitened_gae(token_values, batch.rewards, batch.response_mask, args.gamma, args.lam,
                                          args.lam, all_reduce)
        return advantages, {**metrics, **gae}

    def after_update(self, batch) -> dict:
        """Step 5 (Alg. 1 l. 23) on the answers judged this iteration: token loss -(R_v - b) log pi_phi(z_t | s, z_<t)
        via actor.ppo_update in --critic-mini-batches optimizer steps (default 1: ratio 1, plain REINFORCE, and no
        old-log-prob pass: the step's own forward is pi_old), then the new weights go into the critic's engine.
        b = batch mean of R_v over all ranks (--critic-baseline). The states of one response are one group (one
        mini-batch); packed (default; off: --no-pack-critic-states) they are one row that holds the template head,
        the problem and the response once and a branch (closing part + answer z_k) per state
        (actor.pack_shared_prefixes):
        the same log-probs and gradients for 1 + (template + problem + response) / (closing + answer) times fewer tokens
        per state at the paper's profile (App. C: the critic reads the response once). Every advantage exactly 0 on
        every rank: no forward or backward, the optimizer steps on zero gradients (`step_on_zero_gradients`), counted
        in genac/critic_update_skipped; genac/critic_zero_ranks counts the ranks with no signal."""
        t = time.time()
        rewards = torch.tensor(self.answers["critic_rewards"], dtype=torch.float32)  # [M]
        critic_batch = build_rollout_batch(self.answers["prompts"], [[s] for s in self.answers["samples"]],
                                           rewards.tolist(), self.pad_id)
        critic_batch.group_index = torch.tensor(self.answers["owners"], dtype=torch.long)  # [M] each state's response
        critic_batch.extras["step"] = batch.extras.get("step", 0)
        trained = self.trained_tokens(critic_batch)
        totals = all_reduce(torch.tensor([float(rewards.sum()), float(len(rewards)), trained], dtype=torch.float64))
        batch_mean, trained = float(totals[0]) / max(float(totals[1]), 1.0), float(totals[2])
        critic_batch.advantages = (critic_advantages(rewards, self.args.critic_baseline, batch_mean)[:, None]
                                   * critic_batch.response_mask)
        # one answer per prompt
        update_args = SimpleNamespace(**{**vars(self.args), "kl_coef": 0.0, "ppo_epochs": 1,
                                         "mini_batches": self.args.critic_mini_batches,
                                         "temperature": self.args.critic_temperature, "share_prompts": False})
        zero_ranks = self.zero_advantage_ranks(critic_batch.advantages)
        if zero_ranks == self.world:  # no signal on any rank: the gradient is exactly 0, so is what we skip
            stats = self.step_on_zero_gradients(critic_batch, update_args)
        else:
            stats = ppo_update(self.model.train(), self.optimizer, critic_batch, update_args, self.device, self.world,
                               share_prefixes=self.args.pack_critic_states)
        t_update, t = time.time() - t, time.time()
        if not self.shares_engine:  # an engine of its own gets the new weights now; a shared one at the next `judge`
            weights = stream_full_parameters(self.model, self.args.sync_bucket_mb, self.engine.dtype)
            self.engine.load_weights(weights, holder="critic")
        judged, actor_tokens, self.answers = self.answers["judged_tokens"], self.answers["actor_tokens"], None
        return {"genac/critic_loss": stats["policy_loss"], "genac/critic_grad_norm": stats["grad_norm"],
                "genac/critic_optimizer_steps": stats["optimizer_steps"], "genac/critic_reward_mean": batch_mean,
                "genac/critic_update_skipped": int(zero_ranks == self.world), "genac/critic_zero_ranks": zero_ranks,
                "cost/critic_trained_tokens": int(trained),
                "cost/flops_vs_ppo": flops_vs_ppo(actor_tokens, judged, trained),
                "time/critic_update": t_update, "time/critic_sync": time.time() - t}

    def zero_advantage_ranks(self, advantages: torch.Tensor) -> int:
        """How many ranks' critic advantages [M, R] (masked) are all exactly 0 (all-reduced)."""
        return int(all_reduce(torch.tensor([float(not advantages.count_nonzero())], dtype=torch.float64))[0])

    def step_on_zero_gradients(self, critic_batch, update_args) -> dict:
        """The critic's update when every advantage on every rank is exactly 0 (Alg. 1 l. 23: all R_v equal, e.g. no
        answer parses): the loss -(R_v - b) log pi_phi is 0 with a gradient of exactly 0 (clipping leaves it so),
        so ppo_update's forward and backward are skipped and the optimizer takes the steps it would take, on zero
        gradients: AdamW's weight decay, moments and step counts move exactly as in the full update (bit for bit,
        tested). Zeros, not None: AdamW skips a parameter whose grad is None, and every parameter of a causal LM takes
        part in the full update's forward. -> ppo_update's stats: loss and grad norm 0, its optimizer step count."""
        steps = update_args.ppo_epochs * len(mini_batch_indices(critic_batch, update_args.mini_batches,
                                                                torch.Generator()))  # the count, not the order
        for _ in range(steps):
            for p in self.model.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"policy_loss": 0.0, "grad_norm": 0.0, "optimizer_steps": steps}

    def trained_tokens(self, critic_batch) -> int:
        """Tokens the critic's update runs on this rank (one forward and backward each): packed, each micro-batch
        chunk of a response's states its trunk once + its branches (as actor.rollout_micro_batches cuts them), else
        every row."""
        if not self.args.pack_critic_states:
            return int(critic_batch.attention_mask.sum())
        rows, group = torch.arange(len(critic_batch)), critic_batch.group_index
        return sum(shared_prefix_tokens(critic_batch, chunk) for g in group.unique()
                   for chunk in rows[group == g].split(self.args.micro_batch_size))

    def state_dict(self) -> dict: return {}  # weights, optimizer and tau are in the checkpoint's critic/ (`save`)

    def load_state_dict(self, state: dict) -> None: pass  # __init__ read them

    def save(self, folder: Path, name: str = "critic", optimizer: bool = True) -> None:
        """folder/name + genac_state.json (tau), renamed into place; all ranks call. A checkpoint's: weights and
        optimizer as shards, every rank its own. optimizer=False (the stages): a model folder transformers and vLLM
        load."""
        tau = json.dumps({"success_rate": self.success_rate.state_dict(), "actor_size": self.actor_size})
        save_model_folder(Path(folder) / name, self.model, self.tokenizer, self.optimizer if optimizer else None,
                          {"genac_state.json": tau})

    def close(self) -> None:
        if self._engine is not None and not self.shares_engine:  # the loop closes its own engine
            self._engine.close()
