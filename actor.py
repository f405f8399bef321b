"""The actor: loading (FSDP2 when sharded), its forward passes, and the one update skeleton.

    load_actor -> compute_old_logprobs (no grad: old log-probs, entropies, pooled hidden features if asked)
               -> ppo_update = optimizer_steps(micro_loss = clipped surrogate): the skeleton every model's
                  update uses (actor, value critic, generative critic, SFT), normaliser fixed per step
               -> stream_full_parameters (a bucket of full tensors at a time, for the engine sync and the HF writer)

Rows are laid out [left-padded prompt | right-padded response] (rollout.RolloutBatch), so every
response starts at the same column and the LM head only runs on response positions. By default
(off: --no-share-prompts) the trainer's passes run a prompt once for all its rollouts in a micro-batch
(pack_shared_prompts), with the log-probs and gradients of the unpacked rows.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import advantage as adv_math
from flags import SYNC_BUCKET_MB, add_update_arguments  # noqa: F401 - re-exported for the stage commands
from rollout import RolloutBatch

# ---------------------------------------------------------------------------------------------
# Collectives that are no-ops in one process


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """In place over all ranks (sum by default). NCCL reduces only CUDA tensors: a CPU tensor (our metric sums)
    makes the round trip through the rank's GPU."""
    if dist.is_initialized():
        if dist.get_backend() == "nccl" and not x.is_cuda:
            on_gpu = x.cuda()
            dist.all_reduce(on_gpu, op=op or dist.ReduceOp.SUM)
            x.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def all_gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


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

# Fixed cost of one forward/backward in padded tokens. Measured on SmolLM2-135M (CPU, bf16 autocast, fwd+bwd, one
# row of 32-512 tokens): 5.0 ms per token + 196 ms per call (weight casts, gradient accumulation), i.e. ~40 tokens.
MICRO_BATCH_OVERHEAD_TOKENS = 40


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
        return _prefix_packed_policy_forward(model, mb, with_entropy, temperature)
    if share_prompts and mb.group_index.unique().numel() < len(mb):  # some prompt has several rollouts here
        return _packed_policy_forward(model, mb, with_entropy, temperature)
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


# ---------------------------------------------------------------------------------------------
# Shared-prompt packing: a prompt's k rollouts cost one prompt + k responses instead of k (prompt + response)


def pack_shared_prompts(mb: RolloutBatch) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The rollouts of one prompt become one row [pad | prompt | response_1 | ... | response_k | pad].

    Each response attends to the prompt and to itself only, at the positions it has in its own row, so
    its log-probs and gradients are those of the unpacked rows (the shared-prefix forward of Prefix
    Grouper, 2025). With short answers to long prompts (GRPO's G rollouts) this runs 2-3x fewer tokens.

    mb: [n, P + R] rows. -> model inputs for g packed rows [g, P + B] (a 4D attention mask [g, 1, P+B, P+B]),
    packed_row [n] (the packed row of each rollout) and where [n, R]: the index, among the B logits of
    columns P-1 .. P+B-2, of the logit predicting each response token (token 0: the prompt's last column).
    """
    P, R, n = mb.prompt_width, mb.response_mask.shape[1], len(mb)
    prompt_rows: dict[int, list[int]] = {}  # prompt -> its rollouts in mb, in order
    for i, prompt in enumerate(mb.group_index.tolist()):
        prompt_rows.setdefault(prompt, []).append(i)
    lens = mb.response_lens.tolist()
    B = max(1, max(sum(lens[i] for i in rows) for rows in prompt_rows.values()))
    g, T = len(prompt_rows), P + B
    input_ids = torch.zeros(g, T, dtype=torch.long)
    position_ids = torch.zeros(g, T, dtype=torch.long)
    segment = torch.full((g, T), -1)  # -1 padding, 0 prompt, j + 1 the row's j-th response
    packed_row, where = torch.zeros(n, dtype=torch.long), torch.zeros(n, R, dtype=torch.long)
    for r, rows in enumerate(prompt_rows.values()):
        p = int(mb.prompt_lens[rows[0]])
        input_ids[r, :P] = mb.input_ids[rows[0], :P]
        if any(not torch.equal(mb.input_ids[i, P - p:P], input_ids[r, P - p:P]) for i in rows[1:]):
            raise ValueError("pack_shared_prompts: rollouts with the same group_index have different prompts")
        segment[r, P - p:P] = 0
        position_ids[r, P - p:P] = torch.arange(p)
        offset = 0
        for j, i in enumerate(rows):
            L = lens[i]
            input_ids[r, P + offset:P + offset + L] = mb.input_ids[i, P:P + L]
            segment[r, P + offset:P + offset + L] = j + 1
            position_ids[r, P + offset:P + offset + L] = torch.arange(p, p + L)
            packed_row[i] = r
            where[i, 1:L] = torch.arange(offset + 1, offset + max(L, 1))  # token t >= 1: column P + offset + t - 1
            offset += L
    query, key = segment[:, :, None], segment[:, None, :]  # [g, T, 1], [g, 1, T]
    visible = torch.ones(T, T, dtype=torch.bool).tril() & (key >= 0) & ((key == 0) | (key == query))  # [g, T, T]
    visible |= torch.eye(T, dtype=torch.bool)  # a padding column sees itself: no all-masked softmax row (NaN grads)
    device = mb.input_ids.device
    inputs = dict(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                  attention_mask=visible[:, None].to(device))
    return inputs, packed_row.to(device), where.to(device)


def _packed_policy_forward(model, mb: RolloutBatch, with_entropy: bool, temperature: float = 1.0):
    """policy_forward on shared-prompt packed rows -> logprobs [n, R], entropy [n, R] or None, None."""
    inputs, packed_row, where = pack_shared_prompts(mb)
    B = inputs["input_ids"].shape[1] - mb.prompt_width
    out = model(**inputs, logits_to_keep=B + 1, use_cache=False)
    logits = out.logits[:, :-1].float() / temperature  # [g, B, V]: column P-1+k
    return (*_packed_logprobs(logits, packed_row, where, mb.response_ids, with_entropy), None)


def _packed_logprobs(logits: torch.Tensor, packed_row: torch.Tensor, where: torch.Tensor, response_ids: torch.Tensor,
                     with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [g, K, V] of packed rows -> each rollout's log-probs [n, R] of its response tokens, read at the columns
    `where` [n, R] of its packed row `packed_row` [n], and the entropies there (no grad) or None."""
    log_normaliser = logits.logsumexp(-1)  # [g, K]
    rows = packed_row[:, None].expand_as(where)  # [n, R]
    logprobs = logits[rows, where, response_ids] - log_normaliser[rows, where]  # [n, R]
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = (log_normaliser - (logits.softmax(-1) * logits).sum(-1))[rows, where]  # [n, R]
    return logprobs, entropy


# ---------------------------------------------------------------------------------------------
# Shared-prefix packing: prompts of a group that share a prefix (GenAC's critic states s_k = x ∘ y_<k) run it once


def shared_prefix_layout(mb: RolloutBatch, rows: list[int]) -> tuple[int, list[int]]:
    """rows: rollouts of one group in `mb`. -> (trunk, shared): the trunk is the row with the group's longest prompt
    (the first of equals); shared[j] = length of the longest common prefix of rows[j]'s prompt and the trunk's."""
    P = mb.prompt_width
    prompt_lens = [int(mb.prompt_lens[i]) for i in rows]
    trunk = rows[max(range(len(rows)), key=lambda j: (prompt_lens[j], -j))]
    trunk_prompt = mb.input_ids[trunk, P - int(mb.prompt_lens[trunk]):P]  # [S]
    shared = []
    for i, p in zip(rows, prompt_lens):
        same = (mb.input_ids[i, P - p:P] == trunk_prompt[:p]).long()  # [p]
        shared.append(int(same.cumprod(0).sum()))
    return trunk, shared


def pack_shared_prefixes(mb: RolloutBatch) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The rollouts of one group become one row [trunk | tail_1 response_1 | ... | tail_k response_k | pad].

    pack_shared_prompts with a prefix length per branch: the trunk is the group's longest prompt
    (shared_prefix_layout); rollout j shares the first s_j tokens of its prompt with it, and its branch
    (the rest of its prompt, tail_j, then its response) attends to trunk[:s_j] and to itself only, at the
    positions s_j, s_j + 1, ... it has in its own row. So its log-probs and gradients are those of the
    unpacked row. GenAC's critic states of one response (template head + problem + y_<b_k + closing part,
    then the answer z_k) cost the head and the response once instead of once per state.

    mb: [n, P + R] rows. -> model inputs for g packed rows [g, W] (a 4D attention mask [g, 1, W, W], a 1-D
    `logits_to_keep` [K] of the columns whose logits are read), packed_row [n] and where [n, R]: the index,
    among the K kept columns, of the logit predicting each response token.
    """
    P, R, n = mb.prompt_width, mb.response_mask.shape[1], len(mb)
    group_rows: dict[int, list[int]] = {}  # group -> its rollouts in mb, in order
    for i, group in enumerate(mb.group_index.tolist()):
        group_rows.setdefault(group, []).append(i)
    layouts = [shared_prefix_layout(mb, rows) for rows in group_rows.values()]
    lens, prompt_lens = mb.response_lens.tolist(), mb.prompt_lens.tolist()
    widths = [int(prompt_lens[trunk]) + sum(prompt_lens[i] - s + lens[i] for i, s in zip(rows, shared))
              for rows, (trunk, shared) in zip(group_rows.values(), layouts)]
    g, W = len(group_rows), max(widths)
    input_ids = torch.zeros(g, W, dtype=torch.long)
    position_ids = torch.zeros(g, W, dtype=torch.long)
    segment = torch.full((g, W), -1)  # -1 padding, 0 trunk, j + 1 the row's j-th branch
    visible_trunk = torch.zeros(g, W, dtype=torch.long)  # a branch column sees trunk columns < this
    packed_row, column = torch.zeros(n, dtype=torch.long), torch.zeros(n, R, dtype=torch.long)  # column: of the logit
    for r, (rows, (trunk, shared)) in enumerate(zip(group_rows.values(), layouts)):
        S = int(prompt_lens[trunk])
        input_ids[r, :S] = mb.input_ids[trunk, P - S:P]
        segment[r, :S], position_ids[r, :S] = 0, torch.arange(S)
        offset = S
        for j, (i, s) in enumerate(zip(rows, shared)):
            p, L = int(prompt_lens[i]), lens[i]
            branch = torch.cat([mb.input_ids[i, P - p + s:P], mb.input_ids[i, P:P + L]])  # [tail + L]
            width = len(branch)
            input_ids[r, offset:offset + width] = branch
            segment[r, offset:offset + width], visible_trunk[r, offset:offset + width] = j + 1, s
            position_ids[r, offset:offset + width] = torch.arange(s, s + width)
            packed_row[i] = r
            tail = p - s  # token 0 is predicted by the prompt's last token: the tail's, or trunk column s - 1
            column[i, 0] = offset + tail - 1 if tail > 0 else s - 1
            column[i, 1:L] = torch.arange(offset + tail, offset + tail + max(L, 1) - 1)  # token t >= 1: column of t - 1
            offset += width
    query, key = segment[:, :, None], segment[:, None, :]  # [g, W, 1], [g, 1, W]
    key_column = torch.arange(W)[None, None, :]  # [1, 1, W]
    own = (key == query) & (key >= 0)  # the trunk sees itself; a branch sees itself
    prefix = (key == 0) & (query > 0) & (key_column < visible_trunk[:, :, None])  # a branch sees trunk[:s_j]
    visible = torch.ones(W, W, dtype=torch.bool).tril() & (own | prefix)  # [g, W, W]
    visible |= torch.eye(W, dtype=torch.bool)  # a padding column sees itself: no all-masked softmax row (NaN grads)
    real = mb.response_mask.bool().cpu()  # [n, R]
    needed = torch.zeros(g, W, dtype=torch.bool)
    needed[packed_row[:, None].expand_as(column)[real], column[real]] = True
    keep = needed.any(0).nonzero().flatten()  # [K] columns whose logits are read (shared by the g rows)
    keep = keep if len(keep) else torch.tensor([W - 1])
    index_of = torch.zeros(W, dtype=torch.long)
    index_of[keep] = torch.arange(len(keep))
    where = index_of[column] * real  # [n, R]; padding reads logit 0, masked out later
    device = mb.input_ids.device
    inputs = dict(input_ids=input_ids.to(device), position_ids=position_ids.to(device),
                  attention_mask=visible[:, None].to(device), logits_to_keep=keep.to(device))
    return inputs, packed_row.to(device), where.to(device)


def _prefix_packed_policy_forward(model, mb: RolloutBatch, with_entropy: bool, temperature: float = 1.0):
    """policy_forward on shared-prefix packed rows -> logprobs [n, R], entropy [n, R] or None, None."""
    inputs, packed_row, where = pack_shared_prefixes(mb)
    out = model(**inputs, use_cache=False)
    logits = out.logits.float() / temperature  # [g, K, V]
    return (*_packed_logprobs(logits, packed_row, where, mb.response_ids, with_entropy), None)


def shared_prefix_tokens(batch: RolloutBatch, rows: torch.Tensor) -> int:
    """Tokens of the packed row of `rows` (one group): its trunk once + every branch (prompt tail + response)."""
    rows = rows.tolist()
    trunk, shared = shared_prefix_layout(batch, rows)
    tails = sum(int(batch.prompt_lens[i] + batch.response_lens[i]) - s for i, s in zip(rows, shared))
    return int(batch.prompt_lens[trunk]) + tails


def micro_batches(lengths: torch.Tensor, size: int, overhead_tokens: int = MICRO_BATCH_OVERHEAD_TOKENS,
                  counts: list[int] | None = None) -> list[torch.Tensor]:
    """Row indices of each micro-batch: rows sorted by length, cut into runs of at most `size` rollouts so
    that padded tokens + `overhead_tokens` per micro-batch are fewest (a small DP; verl's dynamic batch
    size solves the same problem greedily). counts[i]: rollouts in row i (a shared-prompt packed row; 1).

    Rows of a micro-batch are padded to its longest, so one 128-token response among 15 short ones
    would make 16 rows of 128: that row goes alone, or with the other long ones. lengths [n] (tokens per
    row). Every rank runs the same number of micro-batches (FSDP2 collectives must match): a rank
    with fewer gets empty index tensors at the end, and its callers run a zero-weight forward/backward.
    """
    n = len(lengths)
    order = torch.argsort(lengths, descending=True, stable=True)
    longest = lengths[order].tolist()  # longest[i] = width of a micro-batch starting at sorted row i
    rollouts = [1] * n if counts is None else [counts[i] for i in order.tolist()]
    best = [0.0] + [math.inf] * n  # best[j]: least cost of rows [0, j)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        taken = 0
        for i in range(j - 1, -1, -1):  # micro-batch = sorted rows [i, j)
            taken += rollouts[i]
            if taken > size and i < j - 1:  # a single row larger than `size` still goes alone
                break
            cost = best[i] + (j - i) * longest[i] + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    bounds, j = [], n
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    groups = [order[i:j] for i, j in reversed(bounds)]
    count = int(all_reduce(torch.tensor([len(groups)]), dist.ReduceOp.MAX).item())
    return groups + [order[:0]] * (count - len(groups))


def rollout_micro_batches(batch: RolloutBatch, size: int, share_prompts: bool, rows: torch.Tensor | None = None,
                          share_prefixes: bool = False) -> list[torch.Tensor]:
    """Rollout indices of each micro-batch (at most `size` rollouts) covering `rows` (default: all; may be empty on
    a rank, which then gets only empty micro-batches). With shared prompts (prefixes), a group's rollouts stay together
    (in chunks of at most `size`), each chunk one packed row of P + sum of lengths (shared_prefix_tokens)."""
    rows = torch.arange(len(batch)) if rows is None else rows
    if not (share_prompts or share_prefixes):
        return [rows[part] for part in micro_batches((batch.prompt_lens + batch.response_lens)[rows], size)]
    group = batch.group_index[rows]
    chunks = [c for p in group.unique() for c in rows[group == p].split(size)]  # rollouts of one packed row
    lengths = torch.tensor([shared_prefix_tokens(batch, c) if share_prefixes
                            else int(batch.prompt_lens[c[0]] + batch.response_lens[c].sum()) for c in chunks])
    parts = micro_batches(lengths, size, counts=[len(c) for c in chunks])
    return [torch.cat([chunks[k] for k in part.tolist()]) if len(part) else part for part in parts]


@torch.no_grad()
def compute_old_logprobs(model, batch: RolloutBatch, args, device, hidden_features=None,
                         rows: torch.Tensor | None = None, share_prefixes: bool = False) -> dict:
    """Fills batch.old_logprobs [N, R], batch.entropies [N, R] and, when `hidden_features` is given,
    batch.features [N, F]. -> metrics (seconds spent pooling features).

    rows: only these rollouts (the others keep their values; tensors are created as zeros when missing). The
    update passes the rows its first optimizer step does not cover (ppo_update).

    hidden_features: None, or (layer, pool) for an algorithm that reads the actor's hidden states (POISE):
    pool(mb, hidden [b, T, H] = output of decoder `layer`, entropy [b, R]) -> features [b, F], called on
    every micro-batch so no full [N, T, H] tensor is ever kept.
    """
    N, R = batch.response_mask.shape
    old = torch.zeros(N, R) if batch.old_logprobs is None or rows is None else batch.old_logprobs
    ent = torch.zeros(N, R) if batch.entropies is None or rows is None else batch.entropies
    layer, pool = hidden_features if hidden_features is not None else (None, None)
    feats, pool_seconds = None, 0.0
    share = args.share_prompts and layer is None  # hidden states are per rollout row
    for idx in rollout_micro_batches(batch, args.micro_batch_size, share, rows, share_prefixes):
        real = len(idx) > 0
        mb = batch.select(idx if real else torch.tensor([0]))  # an idle rank still joins the FSDP collectives
        with autocast_context(args, device):
            logp, entropy, hidden = policy_forward(model, to_device(mb, device), layer, with_entropy=True,
                                                   share_prompts=share, temperature=args.temperature,
                                                   share_prefixes=share_prefixes)
        if not real:
            continue
        width = logp.shape[1]
        old[idx, :width], ent[idx, :width] = logp.float().cpu(), entropy.float().cpu()
        if pool is not None:
            start = time.time()
            f = pool(mb, hidden.float().cpu(), entropy.float().cpu())  # [b, F]
            feats = torch.zeros(N, f.shape[1]) if feats is None else feats
            feats[idx] = f
            pool_seconds += time.time() - start
    batch.old_logprobs = old * batch.response_mask
    batch.entropies = ent * batch.response_mask
    if pool is not None:
        batch.features = feats
        return {"time/features": pool_seconds}
    return {}


def to_device(mb: RolloutBatch, device) -> RolloutBatch:
    if device.type == "cpu":
        return mb
    for name in ("input_ids", "attention_mask", "response_mask", "old_logprobs", "advantages", "old_values", "returns"):
        t = getattr(mb, name)
        if t is not None:
            setattr(mb, name, t.to(device))
    return mb


# ---------------------------------------------------------------------------------------------
# The shared update: PPO-clip for every algorithm (GRPO is PPO with another advantage)


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


def ppo_clip_losses(logp, old_logp, advantages, mask, args) -> tuple[torch.Tensor, torch.Tensor]:
    """The default per-token loss of ppo_update: PPO-clip with clip-higher and dual-clip (advantage.ppo_token_losses;
    the mask is not needed: aggregation masks). [b, R] -> ([b, R], [b, R] bool)."""
    return adv_math.ppo_token_losses(logp, old_logp, advantages, args.clip_low, args.clip_high, args.clip_ratio_c)


def ppo_update(model, optimizer, batch: RolloutBatch, args, device, world: int, ref_model=None,
               share_prefixes: bool = False, token_losses=None) -> dict:
    """PPO-clip on `batch.advantages` [N, R] (arXiv:1707.06347 Eq. 7): epochs x mini-batches of optimizer steps,
    the k3 KL to `ref_model` added per token when --kl-coef > 0.

    token_losses(logp, old_logp, advantages, mask, args) -> (losses [b, R], clipped [b, R] bool): the per-token
    loss, an algorithm's own when it has one (train.py's interface); None: advantage.ppo_token_losses with verl's
    guards. The aggregation over tokens is --loss-agg's (an algorithm sets its default with parser.set_defaults).

    pi_theta_old without a second pass: when batch.old_logprobs is None, the first optimizer step takes the old
    log-probs of its rollouts from its own forward pass, detached (no parameter has moved yet: ratio 1, as in
    TRL's GRPOTrainer), and fills batch.old_logprobs / batch.entropies from it; only the rollouts of later
    mini-batches get a no-grad pass (compute_old_logprobs) before the first step. Same gradients (tested).
    share_prefixes: the prompts of a group share prefixes, run once per micro-batch (pack_shared_prefixes; GenAC).
    """
    g = torch.Generator().manual_seed(args.seed + 7919 * int(batch.extras.get("step", 0)))
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
