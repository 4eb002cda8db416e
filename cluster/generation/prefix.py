"""Prefix reuse: which KV-cache row already holds the start of a new prompt. Pure, no torch.

A finished sequence's cache row is kept (moved up, out of the way of new rows, while a slot above
is free: slots are taken lowest first, so rows stay packed and a round as narrow as it can be) and
indexed by the chained hashes of its whole blocks of `block` tokens, as vLLM hashes its KV blocks:
block i's hash covers block i and, through block i - 1's hash, everything before it, so one lookup
per block of a new prompt finds the longest whole-block prefix some row holds. The new sequence then
starts with that prefix in its cache (taken over in place when the row is free, else copied on the
ranks into its own slot: `cluster.generation.plan.CopyRows`) and prefills only the rest.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

BLOCK_TOKENS = 16


def block_hashes(tokens: Sequence[int], block: int = BLOCK_TOKENS) -> list[int]:
    """The chained hash of each whole block of `tokens`."""
    out, previous = [], 0
    for start in range(0, len(tokens) - block + 1, block):
        previous = hash((previous, tuple(tokens[start : start + block])))
        out.append(previous)
    return out


class PrefixIndex:
    """Which slot's cache holds which whole-block prefixes."""

    def __init__(self, block: int = BLOCK_TOKENS) -> None:
        self.block = block
        self._of_slot: dict[int, list[int]] = {}
        self._slots: dict[int, set[int]] = {}

    def put(self, slot: int, tokens: Sequence[int]) -> None:
        """The slot's cache now holds `tokens` (what it held before is forgotten)."""
        self.drop(slot)
        hashes = block_hashes(tokens, self.block)
        self._of_slot[slot] = hashes
        for h in hashes:
            self._slots.setdefault(h, set()).add(slot)

    def drop(self, slot: int) -> None:
        for h in self._of_slot.pop(slot, ()):
            holders = self._slots.get(h)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del self._slots[h]

    def match(self, tokens: Sequence[int], prefer: Iterable[int] = ()) -> tuple[int | None, int]:
        """(slot, length): a slot holding the longest whole-block prefix of `tokens` that leaves at
        least one token to prefill (its logits give the first new token), and that prefix's length;
        (None, 0) when none. Among equal slots, the first of `prefer` that holds it."""
        usable = block_hashes(tokens[:-1], self.block)
        found: set[int] = set()
        length = 0
        for i, h in enumerate(usable):
            holders = self._slots.get(h)
            if not holders:
                break
            found, length = holders, (i + 1) * self.block
        if not found:
            return None, 0
        preferred = next((slot for slot in prefer if slot in found), None)
        return (preferred if preferred is not None else min(found)), length


@dataclass(frozen=True)
class Placement:
    """Where an admitted prompt goes: its slot, how many of its first tokens that slot's cache holds
    once `source` (a slot, or None: nothing to copy) is copied in."""

    slot: int
    reused: int = 0
    source: int | None = None


class PrefixCache:
    """The slots of one KV cache as prefix reuse sees them: live rows, kept rows of finished
    sequences (the most recently kept preferred as a source), and the index of what each holds."""

    def __init__(self, block: int = BLOCK_TOKENS) -> None:
        self.index = PrefixIndex(block)
        self.kept: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # kept slot -> the tokens its row holds
        self.lookups = self.hits = self.reused_tokens = 0

    def place(self, prompts: Sequence[Sequence[int]], live: Iterable[int],
              limit: int) -> tuple[list[Placement], list[tuple[int, int, int]]] | None:
        """A slot below `limit` for each prompt, reusing the longest prefix any row holds, and the row
        copies (source, target, length) to make first, in order; None when there are not enough slots
        free of live rows.

        Each prompt takes the lowest free slot: a round runs as wide as its highest slot, so rows
        stay packed. A kept row in that slot moves up to the highest slot free of rows (one copy), or
        is evicted when there is none; a prefix held elsewhere is copied in."""
        taken = set(live)
        if limit - len(taken) < len(prompts):
            return None
        out, copies = [], []
        for prompt in prompts:
            self.lookups += 1
            slot = next(s for s in range(limit) if s not in taken)
            source, length = self.index.match(prompt, prefer=[slot, *reversed(self.kept)])
            if source == slot:
                source = None  # its own row holds the prefix: in place
            elif self.kept.get(slot):
                spare = next((s for s in reversed(range(limit)) if s not in taken and s not in self.kept), None)
                if spare is not None:
                    copies.append((slot, spare, len(self.kept[slot])))
                    self.keep(spare, self.kept[slot])
            self.kept.pop(slot, None)
            self.index.put(slot, prompt[:length])  # all that stays valid in the row: the new prompt's own prefix
            if source is not None:
                copies.append((source, slot, length))
            taken.add(slot)
            if length:
                self.hits += 1
                self.reused_tokens += length
            out.append(Placement(slot, length, source))
        return out, copies

    def prefilled(self, slot: int, tokens: Sequence[int]) -> None:
        """A live row's prompt is in its cache: another prompt starting the same way may copy it."""
        self.index.put(slot, tokens)

    def keep(self, slot: int, tokens: Sequence[int]) -> None:
        """A finished sequence's row, holding `tokens`: kept for reuse until its slot is needed."""
        self.index.put(slot, tokens)
        self.kept[slot] = tuple(tokens)
        self.kept.move_to_end(slot)

    def stats(self) -> dict[str, int]:
        return {"prefix_lookups": self.lookups, "prefix_hits": self.hits, "prefix_reused_tokens": self.reused_tokens}


__all__ = ["BLOCK_TOKENS", "Placement", "PrefixCache", "PrefixIndex", "block_hashes"]
