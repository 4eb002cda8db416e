"""A draft-free proposer: prompt n-gram lookup (prompt lookup decoding).

A request that names `NGRAM_DRAFT` ("[ngram]", vLLM's name for its n-gram proposer) as its draft
speculates without a draft model: each round, a row's proposals are the tokens that followed the
latest earlier occurrence of its last n tokens (n from `MAX_NGRAM` down to `MIN_NGRAM`) in its own
prompt and output, and the target verifies them in its usual verify forward. Text that repeats
itself (code, quoting the prompt, lists, templated prose) gets several tokens a round for one
forward and no draft compute at all; a row with no match rides along in the round with its one
token. Verification is the same lossless rule as for a draft model, with the proposal's
probability one (a deterministic proposer): greedy output is the target's, sampling an exact
sample of it. Anchors: vLLM's NgramProposer, transformers' `prompt_lookup_num_tokens`
(PromptLookupCandidateGenerator).
"""

from __future__ import annotations

from typing import Sequence

#: the draft name that asks for n-gram proposals instead of a draft model
NGRAM_DRAFT = "[ngram]"
MAX_NGRAM = 3
MIN_NGRAM = 2


def propose(tokens: Sequence[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of tokens' last n tokens, for the
    longest n in [min_ngram, max_ngram] that has one; [] when none does."""
    length = len(tokens)
    if k < 1:
        return []
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = list(tokens[length - n:])
        first = suffix[0]
        # latest start i < length - n with tokens[i:i+n] == suffix; what follows it is the proposal
        for i in range(length - n - 1, -1, -1):
            if tokens[i] == first and list(tokens[i : i + n]) == suffix:
                return list(tokens[i + n : i + n + k])
    return []


class NgramIndex:
    """`propose` for one growing sequence in O(new tokens) a round: the latest start of every n-gram
    seen so far that has a token after it, kept up to date as the sequence grows."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        self.sizes = tuple(range(min_ngram, max_ngram + 1))
        self._latest: dict[tuple[int, ...], int] = {}  # n-gram -> its latest start (keys of each n differ in length)
        self._indexed = dict.fromkeys(self.sizes, 0)  # n -> the first start not yet indexed

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        length = len(tokens)
        for n in self.sizes:
            for i in range(self._indexed[n], length - n):  # starts with a token after the n-gram
                self._latest[tuple(tokens[i : i + n])] = i
            self._indexed[n] = max(self._indexed[n], length - n)
        if k < 1:
            return []
        for n in reversed(self.sizes):
            start = self._latest.get(tuple(tokens[length - n:])) if length > n else None
            if start is not None:
                return list(tokens[start + n : start + n + k])
        return []


__all__ = ["MAX_NGRAM", "MIN_NGRAM", "NGRAM_DRAFT", "NgramIndex", "propose"]
