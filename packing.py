"""Packed rows: the rollouts of a group that share a prompt (or a prompt prefix) run it once, with the log-probs and
gradients of the unpacked rows; and the micro-batches every pass is cut into.

    pack_shared_prompts   a prompt's k rollouts: one prompt + k responses instead of k (prompt + response)
                          (the default of the actor's and the value critic's passes; off: --no-share-prompts)
    pack_shared_prefixes  prompts of a group that share a prefix run it once: an option of any update
                          (UpdateSettings.share_prefixes), e.g. the states s_k = x ∘ y_<k of one response
    micro_batches         rows sorted by length and cut where padding + per-call overhead is least
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from collectives import all_reduce
from rollout import RolloutBatch

# Fixed cost of one forward/backward in padded tokens. Measured on SmolLM2-135M (CPU, bf16 autocast, fwd+bwd, one
# row of 32-512 tokens): 5.0 ms per token + 196 ms per call (weight casts, gradient accumulation), i.e. ~40 tokens.
MICRO_BATCH_OVERHEAD_TOKENS = 40


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


def prompt_packed_forward(model, mb: RolloutBatch, with_entropy: bool, temperature: float = 1.0):
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


def prefix_packed_forward(model, mb: RolloutBatch, with_entropy: bool, temperature: float = 1.0):
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
