"""The actor: loading (FSDP2 when sharded), its forward pass, its no-grad pass, and its weights streamed out.

    load_actor -> policy_forward (log-probs of the sampled tokens at the sampling temperature; packed rows: packing.py)
               -> compute_old_logprobs (no grad: old log-probs, entropies; a decoder layer's hidden states if asked)
               -> update.ppo_update (the one update skeleton, every model's)
               -> stream_full_parameters (a bucket of full tensors at a time, for the engine sync and the HF writer)

Rows are laid out [left-padded prompt | right-padded response] (rollout.RolloutBatch), so every
response starts at the same column and the LM head only runs on response positions.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.distributed as dist

from flags import SYNC_BUCKET_MB
from packing import prefix_packed_forward, prompt_packed_forward, rollout_micro_batches
from rollout import RolloutBatch

# ---------------------------------------------------------------------------------------------
# Loading and weights


def load_actor(model_path: str, device: torch.device, world: int, args=None, model_class=None,
               target: str | None = None, **config_overrides):
    """fp32 master weights; FSDP2 `fully_shard` per decoder layer, then the root, when world > 1 (shard_with_fsdp2;
    args: --dtype and --gradient-checkpointing, None: neither). model_class: AutoModelForCausalLM (default) or
    another Auto class (the value critic's AutoModelForTokenClassification, with config_overrides num_labels=1).

    Sharded (world > 1), as verl loads: rank 0 alone reads the checkpoint (on the CPU); every rank builds the model on
    the meta device, shards it, allocates only its shards on `device`, and receives them from rank 0
    (set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)). So a rank > 0 holds its shard, not
    the whole fp32 model (8B: ~33 GB of host RAM per rank otherwise). Buffers no checkpoint holds (rotary inv_freq)
    are computed on the CPU at build time and copied back after the shards are allocated. target: the device type
    the run trains on (None: `device`'s; the rehearsal shards fake tensors on the CPU for a CUDA target,
    tools/rehearse.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    model_class = model_class or AutoModelForCausalLM
    target = target or device.type
    config = AutoConfig.from_pretrained(model_path)
    for name, value in config_overrides.items():  # set, not passed: from_pretrained drops a key the config lacks
        setattr(config, name, value)             # (Llama's has no classifier_dropout: the head would get 0.1)
    if world == 1:
        model = model_class.from_pretrained(model_path, config=config, dtype=torch.float32).to(device)
        return shard_with_fsdp2(model, world, args, target)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full = read_full_state_dict(model_class, model_path, config) if dist.get_rank() == 0 else {}  # rank 0 only
    with torch.device("meta"):
        model = model_class.from_config(config, dtype=torch.float32)
    buffers = {name: _real_buffer(model, name, config) for name, _ in model.named_buffers()}
    shard_with_fsdp2(model, world, args, target)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model


def read_full_state_dict(model_class, model_path: str, config) -> dict:
    """Rank 0's read of the checkpoint: the full fp32 state dict, on the CPU. The one question load_actor asks of the
    weights; the rehearsal (tools/rehearse.py) answers it from the config alone."""
    return model_class.from_pretrained(model_path, config=config, dtype=torch.float32).state_dict()


def _real_buffer(model, name: str, config) -> torch.Tensor:
    """A buffer of a meta-device model, computed for real on the CPU: its module rebuilt there (rotary embeddings
    take the config)."""
    module_name, _, buffer_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    with torch.device("cpu"):
        try:
            fresh = type(module)(config=config)
        except TypeError:
            fresh = type(module)(config)
    return getattr(fresh, buffer_name).detach().clone()


def mixed_precision_policy(dtype: str, target: str):
    """FSDP2's MixedPrecisionPolicy, a function of --dtype and the device type the run trains on (never of where a
    tensor sits: a meta-built model is on no device yet). bf16 on CUDA: the all-gathered parameters are bf16 in
    forward and backward, gradients reduce-scattered in fp32, the optimizer steps the fp32 shards (master weights).
    On the CPU it stays off (fp32 parameters under bf16 autocast, as in one process), so CPU runs are unchanged."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    if dtype == "bf16" and target == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_with_fsdp2(model, world: int, args=None, target: str = "cpu"):
    """FSDP2 `fully_shard` per decoder layer, then the root (one process: unchanged). Actor and critics alike.

    args.gradient_checkpointing: each decoder layer's activations are recomputed in the backward (HF's non-reentrant
    checkpointing) instead of kept. args.dtype with `target` (the device type trained on): mixed_precision_policy."""
    model.config.use_cache = False
    if args is not None and args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if world > 1:
        from torch.distributed.fsdp import fully_shard
        policy = mixed_precision_policy(args.dtype if args is not None else "fp32", target)
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM or of a value model built on one (`model.model.layers`)."""
    return model.model.layers


def adamw(parameters, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999) as one fused kernel: for 135M fp32 parameters on this CPU a step takes 0.1 s
    fused vs 0.6-1.1 s with the default multi-tensor (foreach) implementation; same update rule."""
    return torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=True)


def stream_full_parameters(model, bucket_mb: float = SYNC_BUCKET_MB, dtype: torch.dtype | None = None,
                           tied: bool = True):
    """-> (name, full tensor) of every weight in state_dict order, cast to `dtype` (None: as stored), one at a time.

    Under FSDP2 the shards of about `bucket_mb` MB of consecutive parameters (counted in `dtype`; a bigger one goes
    alone) are cast, then gathered in one all-gather (_gather_bucket); the generator keeps no reference to a tensor it
    has handed out. So beyond its shard a rank holds one bucket of full tensors (two while it unpacks one), plus what
    the consumer keeps: vLLM buffers a layer's q/k/v or gate/up until the layer is complete. verl and OpenRLHF sync
    their engines this way (gather, cast, load, free, a bucket at a time). One process: the parameters themselves
    (a copy only when cast). All ranks must call it and consume it to the end (the gathers are collective).
    tied: a weight tied to an earlier one (lm_head = embed_tokens) comes again under its own name, gathered again:
    vLLM's layerwise reload keeps the LM head's old tensor when it gets no lm_head.weight. tied=False skips it (a
    safetensors file stores it once; transformers ties it on load)."""
    from torch.distributed.tensor import DTensor, Shard
    limit, seen, bucket, size = bucket_mb * 2 ** 20, set(), [], 0
    for name, value in [*model.state_dict(keep_vars=True).items(), (None, None)]:  # None: flush the last bucket
        if not tied and id(value) in seen:
            continue
        seen.add(id(value))
        sharded = isinstance(value, DTensor) and value.placements == (Shard(0),)
        nbytes = value.numel() * (dtype or value.dtype).itemsize if sharded else 0
        if bucket and (not sharded or size + nbytes > limit or (dtype or value.dtype) != (dtype or bucket[0][1].dtype)):
            full = _gather_bucket(bucket, dtype)[::-1]
            bucket, size = [], 0
            while full:
                yield full.pop()
        if sharded:
            bucket.append((name, value))
            size += nbytes
        elif value is not None:  # one process (or another layout): no bucket
            value = value.full_tensor() if isinstance(value, DTensor) else value
            yield name, value.detach().to(dtype) if dtype is not None and value.is_floating_point() else value.detach()


def _gather_bucket(bucket: list, dtype: torch.dtype | None) -> list:
    """[(name, DTensor sharded on dim 0 over a 1-D mesh)] -> [(name, full tensor)] with ONE all-gather: each rank's
    shard of every parameter (torch.chunk rows: ceil(d0 / world) each, the last ones fewer or none) padded to its
    full chunk and packed into one flat buffer [E] in `dtype`; gathered [world, E]; each parameter cut out of it."""
    group = bucket[0][1].device_mesh.get_group()
    world = dist.get_world_size(group)
    dtype = dtype or bucket[0][1].dtype
    widths = [-(-v.shape[0] // world) * math.prod(v.shape[1:]) for _, v in bucket]  # elements per rank
    local = torch.zeros(sum(widths), dtype=dtype, device=bucket[0][1].to_local().device)  # [E]
    offset = 0
    for (_, v), width in zip(bucket, widths):
        shard = v.to_local().detach().reshape(-1)
        local[offset:offset + shard.numel()].copy_(shard)  # copy_ casts
        offset += width
    gathered = torch.empty(world * len(local), dtype=dtype, device=local.device)  # [world * E] (gloo wants it flat)
    dist.all_gather_single(gathered, local, group=group)  # torch 2.13 name of all_gather_into_tensor
    gathered = gathered.view(world, len(local))  # [world, E]
    out, offset = [], 0
    for (name, v), width in zip(bucket, widths):
        rows = -(-v.shape[0] // world)
        # a copy (alone: a view)
        out.append((name, gathered[:, offset:offset + width].reshape(world * rows, *v.shape[1:])[:v.shape[0]]))
        offset += width
    return out


def autocast_context(args, device):
    if args.dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


# ---------------------------------------------------------------------------------------------
# Forward passes

def policy_forward(model, mb: RolloutBatch, hidden_layer: int | None = None, with_entropy: bool = False,
                   share_prompts: bool = False, temperature: float = 1.0, share_prefixes: bool = False):
    """Log-probs of the response tokens under `model`, of the distribution that was sampled: softmax(logits / T)
    (verl and TRL do the same), so the PPO ratio and the entropies are those of the sampling policy.

    mb: [b, T] with prompts left-padded to column P and responses from column P on.
    share_prompts: run each prompt once for all its rollouts in `mb` (pack_shared_prompts); same values.
    share_prefixes: run the prefix that the prompts of a group (mb.group_index) share once (pack_shared_prefixes;
    GenAC's critic states); same values. A micro-batch with one rollout per group takes the plain path.
    -> logprobs [b, R], entropy [b, R] or None, hidden [b, T, H] (output of decoder layer `hidden_layer`) or None.
    """
    if (share_prompts or share_prefixes) and hidden_layer is not None:
        raise ValueError("policy_forward: hidden states are per rollout row; share_prompts packs rows "
                         "(use one or the other)")
    if share_prefixes and mb.group_index.unique().numel() < len(mb):
        return prefix_packed_forward(model, mb, with_entropy, temperature)
    if share_prompts and mb.group_index.unique().numel() < len(mb):  # some prompt has several rollouts here
        return prompt_packed_forward(model, mb, with_entropy, temperature)
    R = mb.response_mask.shape[1]
    position_ids = (mb.attention_mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens count from 0
    captured = {}
    hook = None
    if hidden_layer is not None:  # keep only the one layer POISE reads (output_hidden_states keeps them all)
        def keep_output(module, inputs, output):
            captured["hidden"] = output[0] if isinstance(output, tuple) else output
        hook = model.model.layers[hidden_layer].register_forward_hook(keep_output)
    try:
        out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=position_ids,
                    logits_to_keep=R + 1, use_cache=False)
    finally:
        if hook is not None:
            hook.remove()
    logits = out.logits[:, :-1].float() / temperature  # [b, R, V]: column P-1+j predicts response token j
    log_normaliser = logits.logsumexp(-1)  # [b, R]
    logprobs = logits.gather(-1, mb.response_ids.unsqueeze(-1)).squeeze(-1) - log_normaliser  # [b, R]
    entropy = None
    if with_entropy:  # H = logsumexp(z) - sum_v softmax(z)_v z_v; a diagnostic and a POISE feature: no gradient
        with torch.no_grad():
            entropy = log_normaliser - (logits.softmax(-1) * logits).sum(-1)  # [b, R]
    hidden = captured.get("hidden")  # [b, T, H] residual stream after decoder layer `hidden_layer`
    return logprobs, entropy, hidden


@torch.no_grad()
def old_logprob_passes(model, batch: RolloutBatch, settings, device, rows: torch.Tensor | None = None,
                       share_prefixes: bool = False, hidden_layer: int | None = None):
    """The actor's no-grad pass over `batch`, a micro-batch at a time. Yields (idx [b], mb, hidden, entropy [b, R])
    for each micro-batch that holds rollouts: hidden [b, T, H] (fp32, CPU) is decoder `hidden_layer`'s output (None
    when not asked), so a reader of hidden states (POISE) pools them as they come and no [N, T, H] tensor is kept.
    Run to its end, it has filled batch.old_logprobs [N, R] and batch.entropies [N, R].

    rows: only these rollouts (the others keep their values; tensors are created as zeros when missing). The
    update passes the rows its first optimizer step does not cover (update.ppo_update).
    """
    N, R = batch.response_mask.shape
    old = torch.zeros(N, R) if batch.old_logprobs is None or rows is None else batch.old_logprobs
    ent = torch.zeros(N, R) if batch.entropies is None or rows is None else batch.entropies
    share = settings.share_prompts and hidden_layer is None  # hidden states are per rollout row
    for idx in rollout_micro_batches(batch, settings.micro_batch_size, share, rows, share_prefixes):
        real = len(idx) > 0
        mb = batch.select(idx if real else torch.tensor([0]))  # an idle rank still joins the FSDP collectives
        with autocast_context(settings, device):
            logp, entropy, hidden = policy_forward(model, to_device(mb, device), hidden_layer, with_entropy=True,
                                                   share_prompts=share, temperature=settings.temperature,
                                                   share_prefixes=share_prefixes)
        if real:
            width = logp.shape[1]
            old[idx, :width], ent[idx, :width] = logp.float().cpu(), entropy.float().cpu()
            yield idx, mb, None if hidden is None else hidden.float().cpu(), entropy.float().cpu()
    batch.old_logprobs = old * batch.response_mask
    batch.entropies = ent * batch.response_mask


def compute_old_logprobs(model, batch: RolloutBatch, settings, device, rows: torch.Tensor | None = None,
                         share_prefixes: bool = False) -> None:
    """old_logprob_passes run to the end: fills batch.old_logprobs [N, R] and batch.entropies [N, R]."""
    for _ in old_logprob_passes(model, batch, settings, device, rows, share_prefixes):
        pass


def to_device(mb: RolloutBatch, device) -> RolloutBatch:
    if device.type == "cpu":
        return mb
    for name in ("input_ids", "attention_mask", "response_mask", "old_logprobs", "advantages", "old_values", "returns"):
        t = getattr(mb, name)
        if t is not None:
            setattr(mb, name, t.to(device))
    return mb
