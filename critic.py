"""Value models (SPEC §3, §4).

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
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

import advantage as adv_math
from actor import all_reduce, autocast_context, full_state_dict, micro_batches, shard_with_fsdp2, to_device
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
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)

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

    # --- checkpoints: weights load directly with AutoModelForTokenClassification -----------------

    def full_state_dict(self) -> dict:
        return full_state_dict(self.model)  # all ranks must call

    def optimizer_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def save_pretrained(self, folder: Path, weights: dict, tokenizer=None) -> None:
        """Write weights (from full_state_dict) into `folder` (rank 0 only)."""
        self.model.save_pretrained(folder, state_dict={k: v.cpu() for k, v in weights.items()})
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)


def save_critic_atomically(critic: ValueCritic, folder: Path, tokenizer, rank: int) -> None:
    """All ranks gather; rank 0 writes a temporary folder and renames it into place."""
    weights = critic.full_state_dict()
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
    """PPO / VC-PPO (SPEC §3): critic values V_t -> token-level GAE, whitened over the whole batch (all ranks).

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_l (gamma lambda)^l delta_{t+l},   returns_t = A_t + V_t
        (gamma = lambda = 1: A_t = r - V_t)

    Sets batch.old_values and batch.returns [N, R] (the critic's targets; VC-PPO regresses the Monte-Carlo
    return, lambda = 1, whatever the actor's lambda: its "decoupled GAE"). -> (advantages [N, R], metrics).
    """
    mask = batch.response_mask
    t = time.time()
    critic.compute_values(batch, args, device)  # [N, R]
    t_value = time.time() - t
    advantages, returns = adv_math.gae_advantages(batch.old_values, batch.rewards, mask, args.gamma, args.lam)
    if args.algo == "vcppo" and args.lam != 1.0:
        _, returns = adv_math.gae_advantages(batch.old_values, batch.rewards, mask, args.gamma, 1.0)
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
    metrics = {"critic/value_mean": float(s[5]) / n, "critic/return_mean": float(s[2]) / n,
               "critic/values_mse": float(s[4]) / n, "time/value": t_value}
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
