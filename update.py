"""The one update skeleton every model's update uses (actor PPO, value critic, generative critic, SFT), and PPO-clip.

    ppo_update = optimizer_steps(micro_loss = the per-token loss: PPO-clip by default, an algorithm's own if it has one)
    optimizer_steps: epochs x mini-batches of optimizer steps, each accumulated over micro-batches, its loss normaliser
                     fixed for the step (the same gradient for any micro-batch split)

What an update reads is an UpdateSettings: the run's flags (`UpdateSettings.of(args)`), with a model's own values
where it has them (GenAC's critic: one epoch, its temperature, no KL, shared-prefix packing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

import advantage as adv_math
from actor import autocast_context, compute_old_logprobs, policy_forward, to_device
from collectives import all_reduce
from packing import rollout_micro_batches
from rollout import RolloutBatch


@dataclass(frozen=True)
class UpdateSettings:
    """What one update reads; `of(args, **own)` takes the run's flags and a model's own values."""

    seed: int                 # with the step: the mini-batch order
    ppo_epochs: int
    mini_batches: int         # optimizer steps per epoch
    micro_batch_size: int     # rollouts per forward/backward
    grad_clip: float
    loss_agg: str             # advantage.aggregate_loss
    clip_low: float           # PPO-clip range [1 - clip_low, 1 + clip_high]; clip_high 0.28: DAPO's clip-higher
    clip_high: float
    clip_ratio_c: float       # dual-clip bound for negative advantages
    kl_coef: float            # k3 KL to the reference model
    temperature: float        # of the engine that sampled: log-probs of logits / T
    dtype: str                # autocast (actor.autocast_context)
    share_prompts: bool       # packing.pack_shared_prompts
    share_prefixes: bool = False  # packing.pack_shared_prefixes

    @classmethod
    def of(cls, args, **own) -> "UpdateSettings":
        """The run's flags for every field `args` has, then `own` (a model's own values)."""
        taken = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**taken, **own})


# ---------------------------------------------------------------------------------------------
# The skeleton, and PPO-clip for every algorithm's actor (GRPO is PPO with another advantage)


def mini_batch_indices(batch: RolloutBatch, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Rollout indices of each optimizer step's mini-batch: the prompts in random order, cut into `count`
    runs, each mini-batch holding all rollouts of its prompts (verl's layout, where a prompt's G responses
    are adjacent; shared-prompt packing then runs each prompt once per epoch). With fewer prompts than
    `count`, the rollouts are split instead."""
    N = len(batch)
    if count <= 1:
        return [torch.arange(N)]
    prompts = batch.group_index.unique()
    if len(prompts) >= count:
        shuffled = prompts[torch.randperm(len(prompts), generator=generator)]
        return [torch.nonzero(torch.isin(batch.group_index, part)).flatten() for part in shuffled.tensor_split(count)]
    order = torch.randperm(N, generator=generator)
    return list(order.chunk(count)) if N >= count else [order]


def optimizer_steps(model, optimizer, batch: RolloutBatch, steps: list[torch.Tensor], micro_loss, args, device,
                    world: int, loss_agg: str = "token-mean", share_prompts: bool = False,
                    share_prefixes: bool = False) -> dict:
    """The one update skeleton (actor PPO, value critic, generative critic, SFT): one optimizer step per entry
    of `steps` (rollout indices of its mini-batch), each accumulated over micro-batches.

    micro_loss(model, mb) -> (token_loss [b, R], sums: {name: masked sum to log}) runs under autocast;
    mb.extras holds "rows" (mb's rollouts as indices into `batch`; empty on an idle pass) and "optimizer_step".
    The loss normaliser of a step is summed over all its micro-batches and ranks before any backward, so
    the gradient is the same for every micro-batch split (tested). FSDP2 averages gradients over ranks,
    so the local loss is scaled by `world`; a rank with fewer micro-batches runs zero-weight ones so the
    FSDP2 collectives still match. -> {"loss", "grad_norm" (means over steps), "optimizer_steps",
    "tokens", and every name of `sums`}, summed over micro-batches and ranks.
    """
    stats: dict[str, float] = {"tokens": 0.0}
    loss_sum = grad_norm_sum = 0.0
    for k, mini in enumerate(steps):
        mini_batch = batch.select(mini)
        normaliser = torch.tensor([adv_math.loss_normaliser(mini_batch.response_mask, loss_agg)])
        normaliser = max(float(all_reduce(normaliser)), 1.0)
        optimizer.zero_grad(set_to_none=True)
        for idx in rollout_micro_batches(mini_batch, args.micro_batch_size, share_prompts,
                                         share_prefixes=share_prefixes):
            weight = 1.0 if len(idx) else 0.0  # a rank with fewer rollouts still joins the collectives
            mb = to_device(mini_batch.select(idx if len(idx) else torch.tensor([0])), device)
            mb.extras.update(rows=mini[idx], optimizer_step=k)
            with autocast_context(args, device):
                token_loss, sums = micro_loss(model, mb)  # [b, R], {name: scalar}
            loss = adv_math.aggregate_loss(token_loss, mb.response_mask, loss_agg, normaliser) * world * weight
            loss.backward()
            loss_sum += float(loss.detach()) / world
            stats["tokens"] += float(mb.response_mask.sum()) * weight
            for name, value in sums.items():
                stats[name] = stats.get(name, 0.0) + float(value.detach()) * weight
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm_sum += float(grad_norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # fp32 gradients freed until the next update (not held in generation)
    names = list(stats)
    totals = all_reduce(torch.tensor([stats[k] for k in names] + [loss_sum], dtype=torch.float64)).tolist()
    out = dict(zip(names, totals[:-1]))
    n = max(len(steps), 1)
    out.update(loss=totals[-1] / n, grad_norm=grad_norm_sum / n, optimizer_steps=len(steps))
    return out


def ppo_clip_losses(logp, old_logp, advantages, mask, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The default per-token loss of ppo_update: PPO-clip with clip-higher and dual-clip (advantage.ppo_token_losses;
    the mask is not needed: aggregation masks). [b, R] -> ([b, R], [b, R] bool)."""
    return adv_math.ppo_token_losses(logp, old_logp, advantages, settings.clip_low, settings.clip_high,
                                     settings.clip_ratio_c)


def ppo_update(model, optimizer, batch: RolloutBatch, settings: UpdateSettings, device, world: int, ref_model=None,
               step: int = 0, token_losses=None) -> dict:
    """PPO-clip on `batch.advantages` [N, R] (arXiv:1707.06347 Eq. 7): epochs x mini-batches of optimizer steps,
    the k3 KL to `ref_model` added per token when settings.kl_coef > 0; step (the loop's iteration) seeds the order
    of the mini-batches.

    token_losses(logp, old_logp, advantages, mask, settings) -> (losses [b, R], clipped [b, R] bool): the per-token
    loss, an algorithm's own when it has one (train.py's interface); None: advantage.ppo_token_losses with verl's
    guards. The aggregation over tokens is --loss-agg's (an algorithm sets its default with parser.set_defaults).

    pi_theta_old without a second pass: when batch.old_logprobs is None, the first optimizer step takes the old
    log-probs of its rollouts from its own forward pass, detached (no parameter has moved yet: ratio 1, as in
    TRL's GRPOTrainer), and fills batch.old_logprobs / batch.entropies from it; only the rollouts of later
    mini-batches get a no-grad pass (compute_old_logprobs) before the first step. Same gradients (tested).
    settings.share_prefixes: a group's prompts share prefixes, run once per micro-batch (packing.pack_shared_prefixes).
    """
    args, share_prefixes = settings, settings.share_prefixes
    g = torch.Generator().manual_seed(args.seed + 7919 * step)
    steps = [mini for _ in range(args.ppo_epochs) for mini in mini_batch_indices(batch, args.mini_batches, g)]

    temperature = args.temperature  # of the sampling engine: log-probs of logits / T
    t, own_forward = time.time(), batch.old_logprobs is None  # own_forward: step 0 is pi_theta_old itself
    if own_forward:
        batch.old_logprobs, batch.entropies = (torch.zeros_like(batch.response_mask),
                                               torch.zeros_like(batch.response_mask))
        later = torch.ones(len(batch), dtype=torch.bool)
        later[steps[0]] = False  # [N] rollouts that no forward of step 0 sees
        if all_reduce(torch.tensor([float(later.any())]), dist.ReduceOp.MAX).item() > 0:  # FSDP2: every rank or none
            model.eval()
            compute_old_logprobs(model, batch, args, device, rows=torch.nonzero(later).flatten(),
                                 share_prefixes=share_prefixes)
            model.train()
    seconds_old = time.time() - t

    def micro_loss(model, mb):
        on_policy = own_forward and mb.extras["optimizer_step"] == 0
        logp, entropy, _ = policy_forward(model, mb, with_entropy=on_policy, share_prompts=args.share_prompts,
                                          temperature=temperature, share_prefixes=share_prefixes)  # [b, R]
        mask = mb.response_mask
        if on_policy:  # pi_theta_old = pi_theta before this step: keep it for later steps and the metrics
            mb.old_logprobs, rows = logp.detach() * mask, mb.extras["rows"]
            if len(rows):
                batch.old_logprobs[rows, :mask.shape[1]] = mb.old_logprobs.float().cpu()
                batch.entropies[rows, :mask.shape[1]] = (entropy * mask).float().cpu()
        token_loss, clipped = (token_losses or ppo_clip_losses)(logp, mb.old_logprobs, mb.advantages, mask, args)
        sums = {}
        if args.kl_coef > 0:
            with torch.no_grad():
                ref_logp, _, _ = policy_forward(ref_model, mb, share_prompts=args.share_prompts,
                                                temperature=temperature, share_prefixes=share_prefixes)
            kl = adv_math.kl_k3(logp, ref_logp)
            token_loss = token_loss + args.kl_coef * kl
            sums["kl_ref"] = (kl * mask).sum()
        with torch.no_grad():
            sums["clip_frac"] = (clipped.float() * mask).sum()
            sums["approx_kl"] = (0.5 * (logp - mb.old_logprobs) ** 2 * mask).sum()
        return token_loss, sums

    s = optimizer_steps(model, optimizer, batch, steps, micro_loss, args, device, world, args.loss_agg,
                        args.share_prompts, share_prefixes)
    tokens = max(s["tokens"], 1.0)
    return {"policy_loss": s["loss"], "clip_frac": s["clip_frac"] / tokens, "approx_kl": s["approx_kl"] / tokens,
            "kl_ref": s.get("kl_ref", 0.0) / tokens, "grad_norm": s["grad_norm"],
            "optimizer_steps": s["optimizer_steps"], "time/old_logprob": seconds_old}


def steps_on_zero_gradients(model, optimizer, steps: int) -> dict:
    """`steps` optimizer steps on gradients of exactly 0: an update whose loss has a zero gradient everywhere (GenAC's
    critic when every advantage is 0) skips its forward and backward, and AdamW's weight decay, moments and step
    counts still move exactly as in the full update (bit for bit, tested). Zeros, not None: AdamW skips a parameter
    whose grad is None. -> ppo_update's stats: loss and grad norm 0, the optimizer step count."""
    for _ in range(steps):
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"policy_loss": 0.0, "grad_norm": 0.0, "optimizer_steps": steps}
