"""PPO and VC-PPO: a discriminative critic V_t, token-level GAE, and (VC-PPO) value pretraining.

PPO (arXiv:1707.06347) with a learned value model, as verl and TRL build it for LLMs:

    1. the critic is a causal LM whose LM head is replaced by a linear layer to one scalar
       (transformers' `...ForTokenClassification` with one label); over a rollout laid out
       [left-padded prompt (width P) | response (R)], V_t = w . h_{P-1+t} + b is the value of the
       state x ∘ y_<t, read at the last token before y_t (the columns whose LM logits give the
       actor's log-probs)                                                          `value_forward`
    2. GAE with the outcome reward on the last token, gamma = lambda = 1 by default (A_t = r - V_t),
       advantages whitened over the whole batch (arXiv:1506.02438 Eq. 16)         `PPO.advantages`
    3. the actor takes the shared PPO update with these token advantages          (train.py -> update.ppo_update)
    4. the critic regresses the returns with the clipped value loss (clip 0.5), token-mean, its own
       AdamW at lr 5e-6 (GenAC Table 5, arXiv:2604.10701)                          `PPO.after_update`

VC-PPO (arXiv:2503.01491) = PPO + value pretraining: the first --critic-warmup-steps (6) iterations
train only the critic on rollouts of the frozen initial actor (no actor forward pass, no sync), and
the critic's targets are Monte-Carlo returns (lambda = 1) while the actor's advantages use lambda = 0.95
("decoupled GAE", the paper's lambda_critic = 1.0, lambda_actor = 0.95; --lam changes the actor's).
The pretrained critic is saved as OUT/critic-pretrained/ for `python eval.py values --critic ...`.

    python train.py --algo ppo
    python train.py --algo vcppo --critic-warmup-steps 6
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from actor import adamw, autocast_context, load_actor, to_device
from advantage import whitened_gae
from algo_flags import PPOFlags, VCPPOFlags
from checkpoint import load_sharded, save_model_folder
from packing import pack_shared_prompts, rollout_micro_batches
from rollout import RolloutBatch, resolve_model_path
from update import mini_batch_indices, optimizer_steps

# ---------------------------------------------------------------------------------------------
# 1. The value model: a causal LM body with a scalar head


def load_value_model(model_path: str, device: torch.device, world: int, seed: int = 0, args=None,
                     target: str | None = None):
    """A causal LM body + fresh scalar head (or a saved critic, head included). fp32; FSDP2 when world > 1, loaded
    as the actor is (actor.load_actor: rank 0 reads, the others receive their shards; --dtype and
    --gradient-checkpointing as for the actor).

    The head is initialised like every transformers head (normal(0, initializer_range)) on the rank that reads the
    checkpoint, under `seed`; dropout on the head is switched off (a value regressor, verl does the same).
    """
    from transformers import AutoModelForTokenClassification
    torch.manual_seed(seed)  # the fresh head's initialisation is part of the run's seed
    return load_actor(model_path, device, world, args, AutoModelForTokenClassification, target,
                      num_labels=1, classifier_dropout=0.0)


def value_forward(model, mb: RolloutBatch, share_prompts: bool = False) -> torch.Tensor:
    """mb [b, T] = [left-padded prompt (width P) | response (R)] -> values [b, R] fp32, V_t read at column P-1+t.

    share_prompts: a prompt's rollouts in `mb` run as one packed row (packing.pack_shared_prompts: each response
    sees the prompt and itself), the same values at fewer tokens."""
    P, R = mb.prompt_width, mb.response_mask.shape[1]
    if share_prompts and mb.group_index.unique().numel() < len(mb):
        inputs, packed_row, where = pack_shared_prompts(mb)  # where [b, R]: column - (P-1) of token t's state
        values = model(**inputs, use_cache=False).logits[:, P - 1:, 0].float()  # [g, B + 1]
        return values[packed_row[:, None].expand_as(where), where]  # [b, R]
    position_ids = (mb.attention_mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=position_ids, use_cache=False)
    return out.logits[:, P - 1:P - 1 + R, 0].float()  # [b, R]


# ---------------------------------------------------------------------------------------------
# 2. The clipped value loss (pure tensor math; the GAE and its whitening: advantage.py)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float = 0.5) -> torch.Tensor:
    """PPO value loss per token: 0.5 * max((V - G)^2, (clip(V, V_old +- clip) - G)^2). All [N, R] -> [N, R]."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)


def value_clip_active(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                      clip: float = 0.5) -> torch.Tensor:
    """Where the clipped term wins the max in `clipped_value_loss` (verl's vf_clipfrac counts these): bool [N, R].

    A value that moved past the clip range AWAY from its return is not counted: its unclipped error is the larger.
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return (clipped - returns) ** 2 > (values - returns) ** 2


# ---------------------------------------------------------------------------------------------
# 3. The algorithm: GAE advantages from the critic, then the critic's clipped value update


class PPO(PPOFlags):
    """PPO with a discriminative critic (see the module docstring); the algorithm interface of train.py. Its flags
    (critic model, lr, GAE, value clip, warm-up): algo_flags.PPOFlags, torch-free."""

    memory_parts = frozenset({"value critic"})  # what the memory plan (memory.py) counts beside the actor

    def __init__(self, args, actor, tokenizer, device, world: int, checkpoint: Path | None = None):
        self.args, self.device, self.world, self.tokenizer = args, device, world, tokenizer
        self.model = load_value_model(resolve_model_path(args.critic_model or args.model),
                                      device, world, args.seed, args)
        self.optimizer = adamw(self.model.parameters(), lr=args.critic_lr, weight_decay=args.weight_decay)
        if checkpoint:  # a resumed run: the critic's weights and optimizer from its shards
            load_sharded(checkpoint / "critic" / "sharded", self.model, self.optimizer)
        self.warmup_steps = args.critic_warmup_steps  # iterations that train only the critic

    def sample(self, problems, prompt_ids, step):
        """G rollouts per prompt. step.generate(counts, seed) -> (samples[prompt][i], flat rewards)."""
        samples, rewards = step.generate([self.args.rollouts_per_prompt] * len(prompt_ids), step.seed)
        return samples, rewards, {}, {}

    @torch.no_grad()
    def values(self, batch: RolloutBatch) -> torch.Tensor:
        """The critic's V_t [N, R] for every response token (zero on padding), in micro-batches."""
        self.model.eval()
        N, R = batch.response_mask.shape
        values = torch.zeros(N, R)
        for idx in rollout_micro_batches(batch, self.args.micro_batch_size, self.args.share_prompts):
            real = len(idx) > 0
            mb = batch.select(idx if real else torch.tensor([0]))  # an idle rank still joins the FSDP collectives
            with autocast_context(self.args, self.device):
                v = value_forward(self.model, to_device(mb, self.device), self.args.share_prompts)
            if real:
                values[idx, :v.shape[1]] = v.cpu()
        return values * batch.response_mask

    def advantages(self, batch: RolloutBatch, problems, step) -> tuple[torch.Tensor, dict]:
        """Step 2: V_t -> whitened GAE. Sets batch.old_values and batch.returns (the critic's targets).
        -> (token advantages [N, R], metrics)."""
        t = time.time()
        args = self.args
        batch.old_values = self.values(batch)  # [N, R]
        returns_lam = args.lam if args.critic_lam is None else args.critic_lam
        advantages, batch.returns, metrics = whitened_gae(batch.old_values, batch.rewards, batch.response_mask,
                                                                   args.gamma, args.lam, returns_lam, step.all_reduce)
        metrics["time/value"] = time.time() - t
        return advantages, metrics

    def after_update(self, batch: RolloutBatch, step) -> dict:
        """Step 4: clipped value loss 0.5 max((V - G)^2, (clip(V, V_old ± c) - G)^2) to batch.returns,
        token-mean per optimizer step, epochs x mini-batches of prompts (the actor's layout, so a prompt runs once
        per packed micro-batch: --share-prompts). VC-PPO: the critic is saved
        as OUT/critic-pretrained after its last warm-up iteration."""
        t = time.time()
        args, step = self.args, step.index
        self.model.train()
        g = torch.Generator().manual_seed(args.seed + 104723 * step)
        steps = [mini for _ in range(args.ppo_epochs) for mini in mini_batch_indices(batch, args.mini_batches, g)]

        def micro_loss(model, mb):
            values = value_forward(model, mb, args.share_prompts)  # [b, R]
            mask = mb.response_mask
            token_loss = clipped_value_loss(values, mb.old_values, mb.returns, args.value_clip)
            with torch.no_grad():
                active = value_clip_active(values, mb.old_values, mb.returns, args.value_clip)  # [b, R]
                sums = {"clipped": (active.float() * mask).sum(),
                        "squared_error": (((values - mb.returns) ** 2) * mask).sum()}
            return token_loss, sums

        s = optimizer_steps(self.model, self.optimizer, batch, steps, micro_loss, args, self.device, self.world,
                            share_prompts=args.share_prompts)
        tokens = max(s["tokens"], 1.0)
        metrics = {"critic/value_loss": s["loss"], "critic/value_clip_frac": s["clipped"] / tokens,
                   "critic/mse_to_returns": s["squared_error"] / tokens, "critic/grad_norm": s["grad_norm"],
                   "time/critic_update": time.time() - t}
        if step + 1 == self.warmup_steps:  # the value-pretrained critic, for `eval.py values`
            save_value_model(self.model, Path(args.out) / "critic-pretrained", self.tokenizer)
        return metrics

    def state_dict(self) -> dict: return {}  # weights and optimizer are in the checkpoint's critic/ (`save`)

    def load_state_dict(self, state: dict) -> None: pass  # __init__ read them

    def save(self, folder: Path) -> None:
        """folder/critic: weights + optimizer as shards, every rank its own (`python eval.py export` makes it a folder
        for AutoModelForTokenClassification). All ranks call."""
        save_model_folder(Path(folder) / "critic", self.model, self.tokenizer, self.optimizer)

    def close(self) -> None: pass


class VCPPO(VCPPOFlags, PPO):
    """VC-PPO (arXiv:2503.01491): PPO with 6 value-pretraining iterations, Monte-Carlo critic targets (lambda 1)
    and actor advantages at lambda 0.95 (the defaults of algo_flags.VCPPOFlags)."""


def save_value_model(model, folder: Path, tokenizer) -> None:
    """A Hugging Face folder (AutoModelForTokenClassification): gathered a bucket at a time, written by rank 0 to a
    temporary folder renamed into place. All ranks call."""
    save_model_folder(folder, model, tokenizer)


# ---------------------------------------------------------------------------------------------
# The value-model interface of `eval.py values`: (problems, partial responses) -> values in [0, 1]


def discriminative_value_fn(model, tokenizer, device, batch_size: int = 16):
    """-> value_fn(problems: list[str], partials: list[str]) -> list[float] in [0, 1].

    The state is the chat-formatted problem followed by the partial response's tokens; its value is
    the head's output at the state's last token (V of the next token), clipped to [0, 1].
    """
    from data import Problem, format_prompt
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
            # left padding: the last column is every state's end
            ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
            attention = torch.zeros(len(chunk), T, dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, T - len(s):], attention[j, T - len(s):] = torch.tensor(s), 1
            position_ids = (attention.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device),
                           position_ids=position_ids.to(device)).logits
            out.extend(logits[:, -1, 0].float().clamp(0, 1).tolist())
        return out

    return value_fn
