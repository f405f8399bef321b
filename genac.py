"""GenAC end to end: a generative critic that reasons in text before it values a state.

Paper: "Bringing Value Models Back: Generative Critics for Value Modeling in LLM Reinforcement Learning"
(Zhong et al., 2026, arXiv:2604.10701; §5, Algorithm 1 in App. B). The critic is a causal LM that reads a state — the
problem and the actor's partial solution — and reasons before it states an integer 0-10 (v = n / 10). One iteration:

    1. the actor samples responses y, scored r ∈ {0, 1}; the ICC hint tau <- c tau + (1 - c) r  (Alg. 1 l. 7)
    2. each response is cut into segments y_1 .. y_T (~ --segment-tokens each); the critic's states are
       s_k = x ∘ y_<k (s_1 = the bare prompt)                                        (l. 12)  genac_segments.py
    3. ONE engine call: the critic answers the ICC prompt (Fig. 3) of every state -> v_k (unparsable -> tau,
       counted); prompts built from tokens, so a response's states share the prefix    (l. 14-16) `judge_prompts`
    4. v_k on every token of segment k, token-level GAE (lambda = 1: A_t = r - v_k), whitened; the actor takes
       the shared PPO update                                                           (l. 19-22) `GenAC.advantages`
    5. the critic's reward R_v = 1 - (r - v_k)^2 (0 when unparsable); ONE REINFORCE step -(R_v - b) log pi_phi(z | s_k),
       b = batch mean of R_v, a response's states in one packed row; all R_v equal: the optimizer steps on zero
       gradients, no forward or backward                                               (l. 17, 23) `GenAC.after_update`

Defaults (algo_flags.GenACFlags): the paper's profile (L1 ~ 120, no segment cap, 1024 critic tokens, free answers) for
any --model; a CPU-sized one (32, 8, 128, answers guided to \boxed{0..10}) for the offline default model. tau starts at
0 (Alg. 1 l. 1) unless --icc-carry-over. The stages (§5.2, actor frozen): genac_stages.py; commands in docs/genac.md.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from actor import adamw, load_actor, stream_full_parameters
from advantage import whitened_gae
from algo_flags import GenACFlags
from checkpoint import load_sharded, save_model_folder
from engine import make_engine, same_architecture, serving
from genac_segments import retokenized_prefixes, segment_boundaries, segment_values_to_tokens, token_texts
from packing import shared_prefix_tokens
from rollout import RolloutBatch, build_rollout_batch, resolve_model_path
from update import UpdateSettings, mini_batch_indices, steps_on_zero_gradients

# answer_regex may compile past vLLM's default limit, failing every answer (docs/genac.md); a value already set wins
os.environ.setdefault("VLLM_REGEX_COMPILATION_TIMEOUT_S", "120")


# ---- 1. The critic's prompt, its answer, its reward, and the ICC hint tau -------------------
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
    \\boxed{0..10}: every answer parses but one out of tokens first (small models rarely box a score unprompted)."""
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
    def value(self) -> float | None: return None if self.count == 0 else self.tau / (1.0 - self.momentum ** self.count)

    def state_dict(self) -> dict: return {"momentum": self.momentum, "tau": self.tau, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.momentum, self.tau, self.count = state["momentum"], state["tau"], state["count"]


# ---- 2. The critic (its model, optimizer, prompts, engine and update), then the algorithm around it ----
def critic_update_settings(args) -> UpdateSettings:
    """The critic's REINFORCE step (Alg. 1 l. 23) as the loop's update: one epoch of --critic-mini-batches optimizer
    steps (1: ratio 1, plain REINFORCE), log-probs at --critic-temperature, no KL, a response's states packed in one
    row (--pack-critic-states)."""
    return UpdateSettings.of(args, kl_coef=0.0, ppo_epochs=1, mini_batches=args.critic_mini_batches,
                             temperature=args.critic_temperature, share_prompts=False,
                             share_prefixes=args.pack_critic_states)


def flops_vs_ppo(actor_tokens: float, critic_tokens: float, critic_trained_tokens: float | None = None) -> float:
    """Training FLOPs over PPO's, same-size critic (App. C): PPO = 10 P T + 8 P T, GenAC = 10 P T + 8 P T_c, the
    critic's 8 P per token being 2 P to judge and 6 P to train; with its judged tokens J (prompt tokens computed +
    generated) and trained tokens U apart: (10 T + 2 J + 6 U) / (18 T), U = J when not given (the paper's estimate,
    T_c = T + generated). (100, 250) -> 1.667; (100, 250, 100) -> 1.167."""
    trained = critic_tokens if critic_trained_tokens is None else critic_trained_tokens
    return (10 * actor_tokens + 2 * critic_tokens + 6 * trained) / (18 * max(actor_tokens, 1.0))


class GenerativeCritic:
    """The critic: its model, optimizer and tokenizer, its ICC prompts, the engine it judges on (`judge_prompts`), its
    REINFORCE step (`update`) and its folder (`save`). GenAC (below) is the algorithm around it."""

    def __init__(self, args, actor, tokenizer, device, world: int, checkpoint: Path | None = None):
        """actor: only its parameter count is read (the ICC size hint); tokenizer: the actor's. Critic prompts hold
        self.max_prompt_tokens (its default below); ValueError if that + --critic-max-new-tokens exceeds the context."""
        from transformers import AutoConfig, AutoTokenizer
        self.args, self.device, self.world, self.actor_tokenizer = args, device, world, tokenizer
        path = resolve_model_path(args.critic_model or args.model)  # a resumed run's shards are read over it below
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pad_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                       else self.tokenizer.eos_token_id)
        self.reads_actor_tokens = self.tokenizer.get_vocab() == tokenizer.get_vocab()  # else: retokenized_prefixes
        actor_parameters = sum(p.numel() for p in actor.parameters())
        self.actor_size = None if args.no_icc or not actor_parameters else format_actor_size(actor_parameters)
        self.success_rate = RunningSuccessRate(args.icc_momentum)  # tau; `GenAC.__init__` reads a saved one
        self.template_tokens = len(self.chat_ids(icc_prompt("", "", self.actor_size, None if args.no_icc else 0.0)))
        self.max_prompt_tokens = (args.critic_max_prompt_tokens
                                  or args.max_prompt_tokens + args.max_new_tokens + self.template_tokens)
        self.max_model_len, self.prompts_cut = self.max_prompt_tokens + args.critic_max_new_tokens, 0
        limit = getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", None)
        if limit and self.max_model_len > limit:
            raise ValueError(f"critic prompts of {self.max_prompt_tokens} tokens (--critic-max-prompt-tokens; "
                             "default: --max-prompt-tokens + --max-new-tokens + "
                             f"{self.template_tokens} ICC template tokens) + --critic-max-new-tokens "
                             f"{args.critic_max_new_tokens} > the critic's {limit} positions (max_position_embeddings)")
        self.model = load_actor(path, device, world, args)
        self.optimizer = adamw(self.model.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
        if checkpoint:
            load_sharded(checkpoint / "critic" / "sharded", self.model, self.optimizer)
        # A critic of the actor's architecture judges on the loop's engine (its context: engine_max_model_len, read by
        # train.py); else, or without a loop engine, on an engine of its own (`shares`, `engine`; docs/genac.md)
        self.path, self._engine = path, None
        self.same_architecture = same_architecture(path, resolve_model_path(args.model))
        self.engine_max_model_len = self.max_model_len if self.same_architecture else 0

    @property
    def engine(self):
        """The critic's own engine (sleep mode off), built on first use with its weights."""
        if self._engine is None:
            args = self.args
            self._engine = make_engine(args.engine or "vllm", self.path, dtype=args.engine_dtype, seed=args.seed + 1,
                                       sleep_mode=False, max_model_len=self.max_model_len,
                                       gpu_memory_utilization=args.gpu_memory_utilization, world_size=self.world)
            weights = stream_full_parameters(self.model, args.sync_bucket_mb, self._engine.dtype)
            self._engine.load_weights(weights, holder="critic")  # it never sleeps
        return self._engine

    @engine.setter
    def engine(self, engine) -> None: self._engine = engine  # genac_stages.py lends the critic a teacher's engine

    def shares(self, loop_engine) -> bool:
        """Does the critic judge on the loop's engine (its weights swapped in)? Yes for the actor's architecture. A
        critic of another one beside a sleep-capable loop engine (GPU) is refused: vLLM allows one per process."""
        if loop_engine is None or self.same_architecture:
            return loop_engine is not None
        if getattr(loop_engine, "sleeps", False):
            raise RuntimeError(f"the critic {self.path} has another architecture than the actor {self.args.model}: "
                               "it would need a second vLLM engine, which cannot sleep beside the actor's (one "
                               "sleep-capable engine per process) and would hold its memory through the actor's "
                               "update. Start the critic from the actor's base model (genac_stages.py sft/pretrain "
                               "with --model set to the actor), or use --engine hf")
        return False

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
        """The chat-formatted ICC prompt cut at the partial solution -> (head ids, closing ids), each tokenized alone:
        the prompt of state k is head + y_<k + closing, token-exact, so all states of a response (and all responses to
        one problem) share the prefix head + y_<k; tokenizing each state's text would not (docs/genac.md)."""
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
        """Step 3 on states given as text -> judge_prompts of their tokenized ICC prompts, on the critic's engine."""
        prompts = [self.prompt_ids(q, y) for q, y in zip(problems, partials)]
        return self.judge_prompts(prompts, seed, temperature=temperature, guided=guided)

    def judge_prompts(self, prompts: list[list[int]], seed: int, loop_engine=None, temperature: float | None = None,
                      guided: bool | None = None):
        """Step 3: ONE engine call for all states -> (critic prompt ids, samples, values in [0, 1] or None when
        unparsable), on the loop's engine with the critic's weights served for the call (`shares`), else on its own.
        guided (default --critic-guided): answers constrained to `answer_regex` by the engine. A response's states share
        the template head, the problem and y_<k, which the engine's prefix cache computes once (docs/genac.md)."""
        guided = self.args.critic_guided if guided is None else guided
        regex = answer_regex(self.args.critic_max_new_tokens) if guided else None
        temperature = self.args.critic_temperature if temperature is None else temperature
        limit = self.args.critic_max_new_tokens
        if self.shares(loop_engine):  # nothing of the critic's stays on the GPU through the updates
            weights = stream_full_parameters(self.model, self.args.sync_bucket_mb, loop_engine.dtype)
            with serving(loop_engine, weights, holder="critic", sleep_level=2) as engine:
                outputs = engine.generate(prompts, 1, limit, temperature, 1.0, seed, regex=regex)
        else:
            outputs = self.engine.generate(prompts, 1, limit, temperature, 1.0, seed, regex=regex)
        samples = [g[0] for g in outputs]
        return prompts, samples, [parse_critic_value(s.text) for s in samples]

    def update(self, states: RolloutBatch, step) -> dict:
        """Step 5's REINFORCE step on the judged `states` (advantages set): the loop's update (step.update, a
        rollout.Step) with the critic's own settings.
        Every advantage 0 on every rank (all R_v equal, e.g. no answer parses): the gradient is exactly 0, so the
        optimizer steps on zeros without a forward or backward. -> its stats and zero_ranks (ranks with no signal)."""
        settings = critic_update_settings(self.args)
        zero_ranks = self.zero_advantage_ranks(states.advantages, step.all_reduce)
        if zero_ranks == self.world:  # no signal on any rank: the gradient is exactly 0, so is what is skipped
            steps = settings.ppo_epochs * len(mini_batch_indices(states, settings.mini_batches, torch.Generator()))
            return {**steps_on_zero_gradients(self.model, self.optimizer, steps), "zero_ranks": zero_ranks}
        stats = step.update(self.model.train(), self.optimizer, states, settings, self.device, self.world,
                            step=step.index)
        return {**stats, "zero_ranks": zero_ranks}

    def zero_advantage_ranks(self, advantages: torch.Tensor, all_reduce) -> int:
        """How many ranks' critic advantages [M, R] (masked) are all exactly 0 (summed by the loop's all_reduce)."""
        return int(all_reduce(torch.tensor([float(not advantages.count_nonzero())], dtype=torch.float64))[0])

    def trained_tokens(self, states: RolloutBatch) -> int:
        """Tokens the critic's update runs on this rank: packed, each micro-batch chunk of a response's states its
        trunk once + its branches (as packing.rollout_micro_batches cuts them), else every row."""
        if not self.args.pack_critic_states:
            return int(states.attention_mask.sum())
        rows, group = torch.arange(len(states)), states.group_index
        return sum(shared_prefix_tokens(states, chunk) for g in group.unique()
                   for chunk in rows[group == g].split(self.args.micro_batch_size))

    def save(self, folder: Path, name: str = "critic", optimizer: bool = True) -> None:
        """folder/name + genac_state.json (tau), renamed into place; all ranks call. A checkpoint's: weights and
        optimizer as shards, every rank its own. optimizer=False (the stages): a folder transformers and vLLM load."""
        tau = json.dumps({"success_rate": self.success_rate.state_dict(), "actor_size": self.actor_size})
        save_model_folder(Path(folder) / name, self.model, self.tokenizer, self.optimizer if optimizer else None,
                          {"genac_state.json": tau})

    def close(self) -> None:
        if self._engine is not None:  # its own (the loop closes the loop's)
            self._engine.close()


class GenAC(GenACFlags, GenerativeCritic):
    """GenAC as train.py's algorithm interface: the critic's values as the actor's baseline, its REINFORCE step after
    the actor's update. genac_stages.py uses it with the actor frozen. Its flags and the defaults that follow --model
    (PROFILES, check_arguments): algo_flags.GenACFlags, torch-free."""

    memory_parts = frozenset({"generative critic"})  # what the memory plan (memory.py) counts beside the actor
    PARSE_WARNING = (0.5, 3)  # parse rate below 0.5 for 3 steps in a row -> one warning line per run

    def __init__(self, args, actor, tokenizer, device, world: int, checkpoint: Path | None = None):
        GenerativeCritic.__init__(self, args, actor, tokenizer, device, world, checkpoint)
        icc_state = Path(checkpoint / "critic" if checkpoint else self.path) / "genac_state.json"  # tau, resumed
        carry = icc_state.is_file() and (checkpoint is not None or args.icc_carry_over)  # a stage's: on request
        if carry:
            self.success_rate.load_state_dict(json.loads(icc_state.read_text())["success_rate"])
        self.warmup_steps, self.low_parse_steps, self.parse_warned = 0, 0, False  # `warn_on_parse_failures`
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if self.rank == 0:
            print(f"[genac] {args.genac_profile} profile: segment_tokens={args.segment_tokens} "
                  f"max_segments={args.max_segments} critic_max_new_tokens={args.critic_max_new_tokens} "
                  f"critic_max_prompt_tokens={self.max_prompt_tokens} (ICC template {self.template_tokens}); answers "
                  f"{'guided (--no-critic-guided: free, as the paper)' if args.critic_guided else 'free'}; "
                  f"tau {'from ' + str(icc_state) if carry else 'starts at 0'}", file=sys.stderr, flush=True)

    def sample(self, problems, prompt_ids, step):
        samples, rewards = step.generate([self.args.rollouts_per_prompt] * len(prompt_ids), step.seed)  # G per prompt
        return samples, rewards, {}, {}

    def fallback_value(self) -> float:
        """A state whose answer does not parse takes the running success rate tau as its value."""
        return self.success_rate.value if self.success_rate.value is not None else 0.5

    def segment_values(self, batch, problems, step, seed: int) -> tuple[torch.Tensor, dict]:
        """Steps 1-3 for this rank's rollouts, judged with `seed` on step.engine (a rollout.Step; None: the critic's own
        engine) -> token values [N, R] (v_k on every token of segment k), metrics; the judged states (critic prompts,
        answers, rewards R_v, owners) go to batch.extras["critic_states"]."""
        args, tokenizer, rewards, loop_engine = self.args, self.actor_tokenizer, batch.rewards.tolist(), step.engine
        for rs in step.all_gather(rewards):  # every rank's tau sees every rollout, in rank order
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
        prompts, samples, parsed = self.judge_prompts(prompts, seed, loop_engine)
        t_judge, cut = time.time() - t, self.prompts_cut - cut
        cached = getattr(loop_engine if self.shares(loop_engine) else self.engine, "cached_prompt_tokens", 0)
        values = [v if v is not None else self.fallback_value() for v in parsed]
        critic_rewards = [critic_reward(rewards[i], v) for i, v in zip(owners, parsed)]
        token_values, k = torch.zeros_like(batch.response_mask), 0  # [N, R]
        for i, ends in enumerate(all_ends):
            length = int(batch.response_lens[i])
            token_values[i, :length] = segment_values_to_tokens(values[k:k + len(ends)], ends, length)
            k += len(ends)
        totals = step.all_reduce(torch.tensor([len(parsed), sum(v is None for v in parsed), sum(critic_rewards),
                                          int(batch.attention_mask.sum()), sum(map(len, prompts)),
                                          sum(len(s.token_ids) for s in samples), cut, cached], dtype=torch.float64))
        states, failures, reward_sum, actor_tokens, prompt_tokens, generated_tokens, cut, cached = totals.tolist()
        batch.extras["critic_states"] = {"prompts": prompts, "samples": samples, "critic_rewards": critic_rewards,
                                         "owners": owners, "actor_tokens": actor_tokens,
                                         "judged_tokens": prompt_tokens - cached + generated_tokens}  # all ranks'
        self.warn_on_parse_failures(1.0 - failures / max(states, 1))
        return token_values, {
            "genac/states": int(states), "genac/parse_failures": int(failures),
            "genac/parse_rate": 1.0 - failures / max(states, 1),
            "genac/critic_reward": reward_sum / max(states, 1), "genac/icc_success_rate": self.fallback_value(),
            "genac/critic_prompts_cut": int(cut), "time/critic_generate": t_judge, "cost/actor_tokens": actor_tokens,
            "cost/critic_prompt_tokens": int(prompt_tokens), "cost/critic_prompt_tokens_cached": int(cached),
            "cost/critic_generated_tokens": int(generated_tokens),
            "cost/flops_vs_ppo_paper_estimate": flops_vs_ppo(actor_tokens, actor_tokens + generated_tokens)}

    def warn_on_parse_failures(self, parse_rate: float) -> None:
        """One warning line per run when the parse rate (all ranks') stays below PARSE_WARNING's threshold for its
        number of steps in a row: unparsable answers are valued at tau and rewarded 0, so the critic learns nothing."""
        threshold, steps = self.PARSE_WARNING
        self.low_parse_steps = self.low_parse_steps + 1 if parse_rate < threshold else 0
        if self.low_parse_steps < steps or self.parse_warned:
            return
        self.parse_warned = True
        if self.rank == 0:
            print(f"[genac] WARNING: critic parse rate {parse_rate:.2f} < {threshold} for {steps} steps in a row: its "
                  "states are valued at tau and its REINFORCE step has no signal. Fix: guided answers "
                  "(--critic-guided) or a staged critic (python genac_stages.py sft, then pretrain; --critic DIR)",
                  file=sys.stderr, flush=True)

    def advantages(self, batch, problems, step) -> tuple[torch.Tensor, dict]:
        """Step 4: segment values -> whitened token-level GAE. -> (token advantages [N, R], metrics)."""
        seed = step.index * 31 + 5 + 1_000_003 * step.rank  # per rank: ranks judge different states
        token_values, metrics = self.segment_values(batch, problems, step, seed)  # [N, R]
        advantages, _, gae = whitened_gae(token_values, batch.rewards, batch.response_mask, self.args.gamma,
                                          self.args.lam, self.args.lam, step.all_reduce)
        return advantages, {**metrics, **gae}

    def after_update(self, batch, step) -> dict:
        """Step 5 (Alg. 1 l. 23) on the states judged this iteration (batch.extras["critic_states"]): the token loss
        -(R_v - b) log pi_phi(z_t | s, z_<t), b = batch mean of R_v over all ranks (--critic-baseline), in
        --critic-mini-batches optimizer steps (default 1: ratio 1, plain REINFORCE); a response's states packed in one
        row (off: --no-pack-critic-states): the response once, not once per state (App. C). An engine of its own gets
        the new weights now; the loop's serves them at the next judging."""
        t, judged = time.time(), batch.extras["critic_states"]
        rewards = torch.tensor(judged["critic_rewards"], dtype=torch.float32)  # [M]
        states = build_rollout_batch(judged["prompts"], [[s] for s in judged["samples"]], rewards.tolist(),
                                     self.pad_id)  # one answer per prompt
        states.group_index = torch.tensor(judged["owners"], dtype=torch.long)  # [M] each state's response
        trained = self.trained_tokens(states)
        totals = step.all_reduce(torch.tensor([float(rewards.sum()), float(len(rewards)), trained],
                                              dtype=torch.float64))
        batch_mean, trained = float(totals[0]) / max(float(totals[1]), 1.0), float(totals[2])
        states.advantages = (critic_advantages(rewards, self.args.critic_baseline, batch_mean)[:, None]
                             * states.response_mask)
        stats = self.update(states, step)
        zero_ranks = stats["zero_ranks"]
        t_update, t = time.time() - t, time.time()
        if not self.shares(step.engine):
            weights = stream_full_parameters(self.model, self.args.sync_bucket_mb, self.engine.dtype)
            self.engine.load_weights(weights, holder="critic")
        return {"genac/critic_loss": stats["policy_loss"], "genac/critic_grad_norm": stats["grad_norm"],
                "genac/critic_optimizer_steps": stats["optimizer_steps"], "genac/critic_reward_mean": batch_mean,
                "genac/critic_update_skipped": int(zero_ranks == self.world), "genac/critic_zero_ranks": zero_ranks,
                "cost/critic_trained_tokens": int(trained),
                "cost/flops_vs_ppo": flops_vs_ppo(judged["actor_tokens"], judged["judged_tokens"], trained),
                "time/critic_update": t_update, "time/critic_sync": time.time() - t}

    def state_dict(self) -> dict: return {}  # weights, optimizer and tau are in the checkpoint's critic/ (`save`)

    def load_state_dict(self, state: dict) -> None: pass  # __init__ read them
