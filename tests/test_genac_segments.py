"""GenAC's segment rule (genac_segments.segment_boundaries) against its docstring: the window of allowed cuts is
[s + L, s + 2L] (both ends included, never past the last token), the best delimiter level wins, the earliest of it.

A window one token short (a cut at exactly 2L never allowed) changed the boundaries of every response whose only good
delimiter sat there, and no test saw it; these do, by example and against a reference written from the docstring.
"""
import random

import pytest

from genac_segments import _cut_level, segment_boundaries


def test_docstring_example():
    """L = 2: cuts after 2, 3 or 4 tokens are allowed; after 4 is a line break, which beats the sentence end after 2."""
    assert segment_boundaries(["a", ".", " b", "\n", "c", "d"], segment_tokens=2) == [4, 6]


@pytest.mark.parametrize("segment_tokens", [1, 2, 3, 5, 120])
def test_a_cut_at_exactly_twice_the_segment_length_is_allowed(segment_tokens):
    """The only delimiter ends token 2L: the segment is 2L tokens long, not L (no delimiter) followed by L."""
    L = segment_tokens
    texts = ["w"] * (2 * L - 1) + ["\n"] + ["w"] * L  # the line break ends token 2L; L tokens follow
    assert segment_boundaries(texts, L) == [2 * L, 3 * L]


def test_a_cut_one_past_twice_the_segment_length_is_not_allowed():
    L = 3
    texts = ["w"] * (2 * L) + ["\n"] + ["w"] * (L + 1)  # the line break ends token 2L + 1: out of the window
    assert segment_boundaries(texts, L)[0] == L


def test_the_last_token_is_never_a_cut():
    """A cut leaves at least one token: a line break ending the response is not taken (it would end the segment
    anyway), the window stops at n - 1."""
    assert segment_boundaries(["a", "b", "c", "\n"], segment_tokens=2) == [2, 4]


def test_levels_and_the_earliest_of_the_best():
    L = 3
    # window: cuts after 3..6 tokens. A sentence end after 3, line breaks after 4 and 6 -> the earliest line break
    assert segment_boundaries(["a", "b", ".", "\n", "c", "\n"] + ["d"] * 4, L)[0] == 4
    # a paragraph break after 6 beats the line break after 4
    assert segment_boundaries(["a", "b", "c", "\n", "e", "\n\n"] + ["d"] * 4, L)[0] == 6
    # a sentence end (after 5) beats no delimiter; one without a space after it is none
    assert segment_boundaries(["a", "b", "c", "d", ".", " e", "f", "g"], L)[0] == 5
    assert segment_boundaries(["a", "b", "c", "d", ".", "e", "f", "g"], L)[0] == 3
    assert segment_boundaries(["w"] * 10, L) == [3, 6, 9, 10]  # no delimiter: cut at s + L while > L tokens remain


def test_max_segments_merges_the_tail_and_bad_sizes_are_refused():
    assert segment_boundaries(["w"] * 10, 3, max_segments=2) == [3, 10]
    assert segment_boundaries([], 3) == [] and segment_boundaries(["w"] * 3, 3) == [3]
    with pytest.raises(ValueError):
        segment_boundaries(["w"] * 3, 0)
    with pytest.raises(ValueError):
        segment_boundaries(["w"] * 3, 2, max_segments=0)


def reference_boundaries(texts: list[str], L: int) -> list[int]:
    """The docstring's rule, spelled out: every cut c with s + L <= c <= s + 2L and c < n is a candidate."""
    ends, s = [], 0
    while len(texts) - s > L:
        candidates = [(_cut_level(texts, c - 1), c) for c in range(s + L, s + 2 * L + 1) if c < len(texts)]
        best = max(level for level, _ in candidates)
        s = min(c for level, c in candidates if level == best) if best else s + L
        ends.append(s)
    return ends + [len(texts)] if len(texts) > s else ends


def test_matches_the_docstring_rule_on_random_responses():
    rng = random.Random(0)
    pieces = ["w", " w", ".", " .", "!", "\n", "\n\n", "a\n", "?"]
    for _ in range(3000):
        texts = [rng.choice(pieces) for _ in range(rng.randrange(0, 40))]
        L = rng.randrange(1, 7)
        ends = segment_boundaries(texts, L)
        assert ends == reference_boundaries(texts, L), (texts, L)
        sizes = [b - a for a, b in zip([0] + ends, ends)]
        assert all(1 <= k <= 2 * L for k in sizes) and all(k >= L for k in sizes[:-1]), (texts, L, ends)
