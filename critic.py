"""Value models (SPEC §3, §4): the discriminative critic of PPO / VC-PPO and GenAC's generative critic.

Discriminative critic (PPO, VC-PPO): a causal LM whose LM head is replaced by a linear layer to one
scalar (transformers' `...ForTokenClassification` with one label, as verl and TRL build it).

    V_t = w . h_{P-1+t} + b      the value of the state x ∘ y_<t, read at the last token before y_t

so over a rollout laid out [left-padded prompt (width P) | response (R)] the values of the R response
positions come from columns P-1 .. P+R-2, the same columns whose LM logits give the actor's log-probs.
Trained with the clipped value loss (clip 0.5) to the GAE returns, its own AdamW (lr 5e-6).

    critic = ValueCritic(path, device, world, lr=5e-6)
    critic.compute_values(batch, args, device)       # batch.old_values [N, R] (no grad)
    batch.returns = ...                              # GAE returns (train.py)
    critic.update(batch, args, device, world)        # clipped value loss, token-mean, epochs x mini-batches

Generative critic (GenAC): a causal LM that keeps its LM head, reads the ICC prompt of a state
(problem + partial solution + the actor's size and running success rate tau), reasons, and answers
\\boxed{n}, n in 0..10 -> v = n / 10. Rewarded R_v = 1 - (r - v)^2 (0 if unparsable), trained by
REINFORCE with a batch-mean baseline through the actor's own PPO update; it has its own optimizer and
its own vLLM engine. genac.py drives it (segments, states, the three training stages).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

import advantage as adv_math
from actor import adamw, all_reduce, autocast_context, full_state_dict, micro_batches, shard_with_fsdp2, to_device
from rollout import RolloutBatch


def load_value_model(model_path: str, device: torch.device, world: int, seed: int = 0):
    """A causal LM body + fresh scalar head (or a saved critic, head included). fp32; FSDP2 when world > 1.

    The head is initialised like every transformers head (normal(0, initializer_range)); dropout on
    the head is switched off (a value regressor, verl does the same).
    """
    from transformers import AutoConfig, AutoModelForTokenClassification
    config = AutoConfig.from_pretrained(model_path, num_labels=1)
    config.classifier_dropout = 0.0
    torch.manual_seed(seed)  # the fresh head's initialisation is part of the run's seed
    model = AutoModelForTokenClassification.from_pretrained(model_path, config=config, dtype=torch.float32).to(device)
    return shard_with_fsdp2(model, world)


def value_forward(model, mb: RolloutBatch) -> torch.Tensor:
    """mb [b, T] = [left-padded prompt (width P) | response (R)] -> values [b, R] fp32, V_t read at column P-1+t."""
    P, R = mb.prompt_width, mb.response_mask.shape[1]
    position_ids = (mb.attention_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[:, P - 1:P - 1 + R, 0].float()  # [b, R]


class ValueCritic:
    """The discriminative critic of PPO / VC-PPO: model + its own optimizer."""

    def __init__(self, model_path: str, device: torch.device, world: int, lr: float = 5e-6, weight_decay: float = 0.01,
                 seed: int = 0):
        self.model = load_value_model(model_path, device, world, seed)
        self.optimizer = adamw(self.model.parameters(), lr=lr, weight_decay=weight_decay)

    @torch.no_grad()
    def compute_values(self, batch: RolloutBatch, args, device) -> None:
        """Fills batch.old_values [N, R] (zero on padding)."""
        self.model.eval()
        N, R = batch.response_mask.shape
        values = torch.zeros(N, R)
        for idx in micro_batches(batch.prompt_lens + batch.response_lens, args.micro_batch_size):
            real = len(idx) > 0
            mb = batch.select(idx if real else torch.tensor([0]))  # an idle rank still joins the FSDP collectives
            with autocast_context(args, device):
                v = value_forward(self.model, to_device(mb, device))
            if real:
                values[idx, :v.shape[1]] = v.cpu()
        batch.old_values = values * batch.response_mask

    def update(self, batch: RolloutBatch, args, device, world: int) -> dict:
        """Clipped value loss 0.5 * max((V - G)^2, (clip(V, V_old ± c) - G)^2) to batch.returns, token-mean per
        optimizer step (normaliser summed over micro-batches and ranks first, as in actor.ppo_update)."""
        self.model.train()
        N = len(batch)
        loss_sum = grad_norm_sum = clip_count = err_sum = tokens = 0.0
        steps = 0
        g = torch.Generator().manual_seed(args.seed + 104723 * int(batch.extras.get("step", 0)))
        for _ in range(args.ppo_epochs):
            order = torch.randperm(N, generator=g) if args.mini_batches > 1 else torch.arange(N)
            for mini in order.chunk(args.mini_batches) if N >= args.mini_batches else [order]:
                mini_batch = batch.select(mini)
                normaliser = max(float(all_reduce(torch.tensor([float(mini_batch.response_mask.sum())]))), 1.0)
                self.optimizer.zero_grad(set_to_none=True)
                for idx in micro_batches(mini_batch.prompt_lens + mini_batch.response_lens, args.micro_batch_size):
                    weight = 1.0 if len(idx) else 0.0
                    mb = to_device(mini_batch.select(idx if len(idx) else torch.tensor([0])), device)
                    with autocast_context(args, device):
                        values = value_forward(self.model, mb)  # [b, R]
                    mask = mb.response_mask
                    token_loss = adv_math.clipped_value_loss(values, mb.old_values, mb.returns, args.value_clip)
                    loss = (token_loss * mask).sum() / normaliser * world * weight
                    loss.backward()
                    with torch.no_grad():
                        loss_sum += float(loss) / world
                        moved = (values - mb.old_values).abs() > args.value_clip
                        clip_count += float((moved.float() * mask).sum()) * weight
                        err_sum += float((((values - mb.returns) ** 2) * mask).sum()) * weight
                        tokens += float(mask.sum()) * weight
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                grad_norm_sum += float(grad_norm)
                self.optimizer.step()
                steps += 1
        sums = all_reduce(torch.tensor([clip_count, err_sum, tokens, loss_sum], dtype=torch.float64))
        n = max(float(sums[2]), 1.0)
        return {"critic/value_loss": float(sums[3]) / steps, "critic/value_clip_frac": float(sums[0]) / n,
                "critic/mse_to_returns": float(sums[1]) / n, "critic/grad_norm": grad_norm_sum / steps}

    # --- checkpoints (train.save_checkpoint gathers .model and .optimizer with actor's helpers) ---

    def save_pretrained(self, folder: Path, weights: dict, tokenizer=None) -> None:
        """Write weights (from full_state_dict) into `folder` (rank 0 only)."""
        self.model.save_pretrained(folder, state_dict={k: v.cpu() for k, v in weights.items()})
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


def save_critic_atomically(critic, folder: Path, tokenizer, rank: int) -> None:
    """All ranks gather; rank 0 writes a temporary folder and renames it into place."""
    weights = full_state_dict(critic.model)  # all ranks gather
    if rank != 0:
        return
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    critic.save_pretrained(tmp, weights, tokenizer)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


# ---------------------------------------------------------------------------------------------
# PPO's advantages from the critic


def critic_gae_advantages(critic: ValueCritic, batch: RolloutBatch, args, device) -> tuple[torch.Tensor, dict]:
    """PPO / VC-PPO (SPEC §3): critic values V_t [N, R] -> `whitened_gae`. -> (advantages [N, R], metrics)."""
    t = time.time()
    critic.compute_values(batch, args, device)  # batch.old_values [N, R]
    advantages, metrics = whitened_gae(batch, batch.old_values, args, returns_lambda=1.0 if args.algo == "vcppo" else args.lam)
    metrics["time/value"] = time.time() - t
    return advantages, metrics


def whitened_gae(batch: RolloutBatch, values: torch.Tensor, args, returns_lambda: float) -> tuple[torch.Tensor, dict]:
    """Token-level GAE from values [N, R], whitened over the whole batch (all ranks). PPO, VC-PPO and GenAC.

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_l (gamma lambda)^l delta_{t+l},   returns_t = A_t + V_t
        (gamma = lambda = 1: A_t = r - V_t)

    Sets batch.old_values and batch.returns [N, R], the critic's targets computed with `returns_lambda`
    (VC-PPO regresses the Monte-Carlo return, lambda = 1, whatever the actor's lambda: "decoupled GAE").
    -> (advantages [N, R], metrics).
    """
    mask = batch.response_mask
    batch.old_values = values * mask
    advantages, returns = adv_math.gae_advantages(batch.old_values, batch.rewards, mask, args.gamma, args.lam)
    if returns_lambda != args.lam:
        _, returns = adv_math.gae_advantages(batch.old_values, batch.rewards, mask, args.gamma, returns_lambda)
    batch.returns = returns
    # global statistics: whitening, and how much of the returns' variance the values explain
    s = all_reduce(torch.tensor([float((advantages * mask).sum()), float(mask.sum()), float((returns * mask).sum()),
                                 float((returns ** 2 * mask).sum()), float(((returns - batch.old_values) ** 2 * mask).sum()),
                                 float((batch.old_values * mask).sum())], dtype=torch.float64))
    n = max(float(s[1]), 1.0)
    mean = float(s[0]) / n
    centred_sq = all_reduce(torch.tensor([float((((advantages - mean) ** 2) * mask).sum())], dtype=torch.float64))
    var = float(centred_sq[0]) / max(n - 1, 1.0)
    whitened = (advantages - mean) * (var + 1e-8) ** -0.5 * mask  # = advantage.masked_whiten on one rank
    returns_var = float(s[3]) / n - (float(s[2]) / n) ** 2
    metrics = {"critic/value_mean": float(s[5]) / n, "critic/return_mean": float(s[2]) / n, "critic/values_mse": float(s[4]) / n}
    if returns_var > 1e-6:  # R^2 of the values against the returns (undefined when every reward is equal)
        metrics["critic/r2"] = 1.0 - float(s[4]) / n / returns_var
    return whitened, metrics


# ---------------------------------------------------------------------------------------------
# The value-model interface of `eval.py values`: (problems, partial responses) -> values in [0, 1]


def discriminative_value_fn(model, tokenizer, device, batch_size: int = 16):
    """-> value_fn(problems: list[str], partials: list[str]) -> list[float] in [0, 1].

    The state is the chat-formatted problem followed by the partial response's tokens; its value is
    the head's output at the state's last token (V of the next token), clipped to [0, 1].
    """
    from rollout import Problem, format_prompt
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def value_fn(problems: list[str], partials: list[str]) -> list[float]:
        model.eval()
        states = [format_prompt(tokenizer, Problem(problem=q, answer=""))
                  + tokenizer.encode(y, add_special_tokens=False) for q, y in zip(problems, partials)]
        out = []
        for i in range(0, len(states), batch_size):
            chunk = states[i:i + batch_size]
            T = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)  # left padding: the last column is every state's end
            attention = torch.zeros(len(chunk), T, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, T - len(s):], attention[j, T - len(s):] = torch.tensor(s), 1
            position_ids = (attention.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), position_ids=position_ids.to(device)).logits
            out.extend(logits[:, -1, 0].float().clamp(0, 1).tolist())
        return out

    return value_fn


# ---------------------------------------------------------------------------------------------
# Generative critic (GenAC, SPEC §4): the ICC prompt, parsing, the critic's reward


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
    """The last \\boxed{n} with an integer 0 <= n <= 10 -> n / 10; anything else -> None (a parse failure).

    '... \\boxed{3} then \\boxed{7}' -> 0.7;  '\\boxed{11}' -> None;  '\\boxed{7.5}' -> None;  no box -> None.
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):  # match braces so \\boxed{\\text{7}} is read whole
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            content = text[i:j].strip()
            return int(content) / 10 if re.fullmatch(r"\d{1,2}", content) and int(content) <= 10 else None
    return None


def answer_regex(max_new_tokens: int) -> str:
    """The critic's answer format as a regex for the engine's guided decoding (`--critic-guided`, and the SFT
    teacher by default): reasoning without backslashes, at most 2 characters per token of budget, then
    \\boxed{0..10}. Small models rarely box a score unprompted (SmolLM2-135M: 0 of 372); this makes every
    answer parse, except one that runs out of tokens first (it stays a counted parse failure)."""
    return r"[^\\]{0,%d}\\boxed\{(10|[0-9])\}" % (2 * max_new_tokens)


def critic_reward(actor_reward: float, value: float | None) -> float:
    """R_v = 1 - (r - v)^2 (paper §5.2); 0 when the critic's answer did not parse."""
    return 0.0 if value is None else 1.0 - (actor_reward - value) ** 2


def critic_advantages(critic_rewards: torch.Tensor, baseline: str = "mean", batch_mean: float | None = None) -> torch.Tensor:
    """REINFORCE-with-baseline advantage of each critic answer: R_v - b with b the batch mean of R_v ('mean'; pass
    `batch_mean` when the batch spans ranks), or R_v ('none'). [M] -> [M]."""
    if baseline == "mean":
        return critic_rewards - (critic_rewards.mean() if batch_mean is None else batch_mean)
    if baseline == "none":
        return critic_rewards.clone()
    raise ValueError(f"unknown critic baseline {baseline!r}; choose 'mean' or 'none'")


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
# The generative critic: its own model, optimizer and engine (Alg. 1 lines 12-23)


class GenerativeCritic:
    """GenAC's critic: a causal LM (fp32 master weights, FSDP2 when sharded) with its own AdamW and its
    own vLLM engine, synced after each update. One iteration:

        token_values = genac.segment_values(critic, batch, ...)  # segments -> states -> ONE engine call -> v_k
        ... actor PPO with GAE on token_values ...
        critic.update()                                          # REINFORCE on the critic's own answers
    """

    def __init__(self, model_path: str, device, world: int, args, actor_num_parameters: int | None):
        from transformers import AutoTokenizer

        from actor import load_actor
        from rollout import make_engine
        self.args, self.device, self.world, self.model_path = args, device, world, model_path
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.model = load_actor(model_path, device, world)
        self.optimizer = adamw(self.model.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
        self.engine = make_engine(args.engine or "vllm", model_path, dtype=args.engine_dtype, seed=args.seed + 1,
                                  max_model_len=args.critic_max_prompt_tokens + args.critic_max_new_tokens,
                                  gpu_memory_utilization=args.gpu_memory_utilization, world_size=world)
        self.success_rate = RunningSuccessRate(args.icc_momentum)
        self.actor_size = None if args.no_icc or not actor_num_parameters else format_actor_size(actor_num_parameters)
        self.pending: dict | None = None  # this iteration's critic samples, waiting for `update`
        self.last_parse_failures = 0.0
        icc_state = Path(model_path) / "genac_state.json"  # a critic from `genac.py sft/pretrain` keeps its tau
        if icc_state.is_file():
            self.success_rate.load_state_dict(json.loads(icc_state.read_text())["success_rate"])

    # --- prompting and judging -------------------------------------------------------------

    def prompt_ids(self, problem: str, partial_solution: str) -> list[int]:
        """The chat-formatted ICC prompt of one state (no hints under --no-icc)."""
        rate = None if self.args.no_icc else (self.success_rate.value if self.success_rate.value is not None else 0.0)
        text = icc_prompt(problem, partial_solution, None if self.args.no_icc else self.actor_size, rate)
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if not isinstance(ids, list) else ids)
        return ids[-self.args.critic_max_prompt_tokens:] if len(ids) > self.args.critic_max_prompt_tokens else ids

    def judge(self, problems: list[str], partials: list[str], seed: int, temperature: float | None = None,
              guided: bool | None = None):
        """ONE engine call for all states -> (critic prompt ids, samples, values in [0, 1] or None on a parse failure).
        guided (default --critic-guided): answers constrained to `answer_regex` by the engine."""
        prompts = [self.prompt_ids(q, y) for q, y in zip(problems, partials)]
        guided = self.args.critic_guided if guided is None else guided
        regex = answer_regex(self.args.critic_max_new_tokens) if guided else None
        samples = [g[0] for g in self.engine.generate(prompts, 1, self.args.critic_max_new_tokens,
                                                      self.args.critic_temperature if temperature is None else temperature,
                                                      1.0, seed, regex=regex)]
        return prompts, samples, [parse_critic_value(s.text) for s in samples]

    def fallback_value(self) -> float:
        """A state whose answer does not parse takes the running success rate tau as its value (SPEC §4)."""
        return self.success_rate.value if self.success_rate.value is not None else 0.5

    # --- the critic update: REINFORCE with a baseline through the shared PPO update --------------

    def update(self, batch, args, device, world: int) -> dict:
        """Alg. 1 line 23 on the answers judged this iteration (`batch` only gives the step): token loss
        -(R_v - b) log pi_phi(z_t | s, z_<t) via actor.ppo_update (ratio 1 on the first mini-batch), then the
        new weights go into the critic's engine. b = batch mean of R_v over all ranks (--critic-baseline)."""
        from types import SimpleNamespace

        from actor import compute_old_logprobs, ppo_update
        from rollout import build_rollout_batch
        pending = self.pending
        rewards = torch.tensor(pending["critic_rewards"], dtype=torch.float32)  # [M]
        totals = all_reduce(torch.tensor([float(rewards.sum()), float(len(rewards))], dtype=torch.float64))
        batch_mean = float(totals[0]) / max(float(totals[1]), 1.0)
        critic_batch = build_rollout_batch(pending["prompts"], [[s] for s in pending["samples"]], rewards.tolist(), self.pad_id)
        critic_batch.extras["step"] = batch.extras.get("step", 0)
        critic_batch.advantages = critic_advantages(rewards, self.args.critic_baseline, batch_mean)[:, None] * critic_batch.response_mask
        update_args = SimpleNamespace(**{**vars(self.args), "kl_coef": 0.0, "ppo_epochs": 1,
                                         "share_prompts": False})  # one answer per critic prompt: nothing to share
        t = time.time()
        self.model.eval()
        compute_old_logprobs(self.model, critic_batch, update_args, device)
        self.model.train()
        stats = ppo_update(self.model, self.optimizer, critic_batch, update_args, device, world)
        t_update = time.time() - t
        t = time.time()
        self.engine.load_weights(full_state_dict(self.model).items())
        self.pending = None
        return {"genac/critic_loss": stats["policy_loss"], "genac/critic_grad_norm": stats["grad_norm"],
                "genac/critic_reward_mean": batch_mean, "cost/critic_trained_tokens": int(critic_batch.attention_mask.sum()),
                "time/critic_update": t_update, "time/critic_sync": time.time() - t}

    def value_fn(self, samples: int = 1, temperature: float = 0.6, seed: int = 0):
        """The `eval.py values` interface: (problems, partials) -> values in [0, 1]; parse failures take tau and
        are counted in `self.last_parse_failures`; `samples` > 1 averages several answers per state."""
        def value_fn(problems: list[str], partials: list[str]) -> list[float]:
            failures, per_state = 0, [[] for _ in problems]
            for j in range(samples):
                _, _, parsed = self.judge(problems, partials, seed + j, temperature)
                for i, v in enumerate(parsed):
                    failures += v is None
                    per_state[i].append(self.fallback_value() if v is None else v)
            self.last_parse_failures = failures / max(len(problems) * samples, 1)
            return [sum(v) / len(v) for v in per_state]
        return value_fn

    # --- checkpoints: a model folder plus tau (train.save_checkpoint gathers .model and .optimizer) ---

    def save_pretrained(self, folder: Path, weights: dict, tokenizer=None) -> None:
        """A model folder (transformers and vLLM load it) + genac_state.json with tau (rank 0 only)."""
        self.model.save_pretrained(folder, state_dict={k: v.cpu() for k, v in weights.items()})
        self.tokenizer.save_pretrained(folder)
        (Path(folder) / "genac_state.json").write_text(json.dumps({"success_rate": self.success_rate.state_dict(),
                                                                   "actor_size": self.actor_size}))

    def save(self, folder, rank: int) -> None:
        """Atomic save (all ranks call): a temporary folder renamed into place."""
        save_critic_atomically(self, folder, self.tokenizer, rank)

    def close(self) -> None:
        self.engine.close()
