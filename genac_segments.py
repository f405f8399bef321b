"""GenAC's segments and critic states (arXiv:2604.10701, Alg. 1 l. 12 and l. 19): a response cut token-exactly into
segments of about L1 tokens, the critic states s_k = x ∘ y_<k as token prefixes (also for a critic with its own
tokenizer), and segment values broadcast back to tokens. Pure functions of token ids and texts; genac.py, the stages
(genac_stages.py) and the value benchmark (tools/values.py) use them.
"""

from __future__ import annotations

import bisect

import torch


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """The text of each token alone (only used to find delimiters; byte pieces may decode as '\ufffd')."""
    return [tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]


def _cut_level(texts: list[str], j: int) -> int:
    """How good a cut after token j is: 3 paragraph break, 2 line break, 1 sentence end, 0 none."""
    text = texts[j]
    if text.endswith("\n"):
        return 3 if text.endswith("\n\n") or (j > 0 and texts[j - 1].endswith("\n")) else 2
    next_text = texts[j + 1] if j + 1 < len(texts) else " "
    return int(text.rstrip().endswith((".", "!", "?")) and next_text[:1].isspace())


def segment_boundaries(texts: list[str], segment_tokens: int = 120, max_segments: int | None = None) -> list[int]:
    """Token-exact segmentation of one response -> the END index (exclusive) of each segment.
    texts: each token's text (`token_texts`). Returns strictly increasing ends, the last == len(texts);
    segment k is tokens [ends[k-1], ends[k]) with ends[-1] := 0 for k = 0; empty response -> [].
    Rule [ours; the paper cuts at delimiters into ~L1 = 120-token segments, App. C]: from a segment start s, if at
    most L = `segment_tokens` tokens remain they are the last segment; else among the cuts c in [s + L, s + 2L]
    (c tokens so far) take the best level present (paragraph > line > sentence end) and the earliest of that level;
    with no delimiter there, cut at s + L. More than `max_segments` segments (None: no cap, as the paper): the tail
    is merged into the last allowed one.
    Example, L = 2: ["a", ".", " b", "\n", "c", "d"] -> [4, 6]: the cuts allowed first are after 2, 3 or 4 tokens;
    after 2 is a sentence end, after 4 a line break, which wins; the 2 tokens left are the last segment."""
    if segment_tokens < 1 or (max_segments is not None and max_segments < 1):
        raise ValueError(f"--segment-tokens ({segment_tokens}) and --max-segments ({max_segments}) must be >= 1")
    n, ends, start = len(texts), [], 0
    while n - start > segment_tokens:
        window = range(start + segment_tokens, min(start + 2 * segment_tokens, n - 1) + 1)  # c = tokens before the cut
        levels = [(_cut_level(texts, c - 1), c) for c in window]
        best = max((level for level, _ in levels), default=0)
        start = next(c for level, c in levels if level == best) if best > 0 else start + segment_tokens
        ends.append(start)
    if n > start:
        ends.append(n)
    if max_segments is not None and len(ends) > max_segments:
        ends = ends[: max_segments - 1] + [n]
    return ends


def retokenized_prefixes(actor_tokenizer, critic_tokenizer, response_ids: list[int],
                         starts: list[int]) -> list[list[int]]:
    """A critic with its own tokenizer: the response's text up to the last state is tokenized ONCE by the critic, and
    state k's prefix is the critic tokens that end at or before the text of y_<starts[k] (a critic token across the cut
    is left out), so the states still share exact token prefixes. -> one critic-token list per start."""
    decode = lambda ids: actor_tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    text = decode(response_ids[:max(starts, default=0)])
    encoded = critic_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    token_ends = [end for _, end in encoded["offset_mapping"]]
    return [encoded["input_ids"][:bisect.bisect_right(token_ends, len(decode(response_ids[:s])))] for s in starts]


def critic_state_prefixes(response_ids: list[int], ends: list[int]) -> list[list[int]]:
    """The response prefixes y_<k of the critic states s_k = x ∘ y_<k, one per segment (the first is empty)."""
    return [list(response_ids[:s]) for s in [0] + ends[:-1]]


def segment_values_to_tokens(values: list[float], ends: list[int], length: int) -> torch.Tensor:
    """Broadcast segment values to tokens (Alg. 1 l. 19): v_k on every token of segment k. -> [length]."""
    out, start = torch.zeros(length), 0
    for v, end in zip(values, ends):
        out[start:end] = v
        start = end
    return out
