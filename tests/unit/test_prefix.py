"""Prefix reuse's bookkeeping (cluster.generation.prefix) on plain values, and the rank's row copy."""

import torch

from cluster.generation.plan import CopyRows
from cluster.generation.prefix import PrefixCache, PrefixIndex, block_hashes
from cluster.generation.steps import copy_rows


def test_block_hashes_chain_so_a_block_stands_for_everything_before_it():
    a = block_hashes(list(range(40)), 16)
    assert len(a) == 2  # whole blocks only
    b = block_hashes([99] + list(range(1, 40)), 16)
    assert a[1] != b[1]  # the same second block after a different first one
    assert block_hashes(list(range(32)) + [7], 16) == a


def test_the_index_finds_the_longest_whole_block_prefix_and_leaves_a_token_to_prefill():
    index = PrefixIndex(4)
    index.put(3, list(range(10)))  # two whole blocks: 0-3, 4-7
    assert index.match(list(range(9)) + [50]) == (3, 8)
    assert index.match(list(range(6)) + [50]) == (3, 4)
    assert index.match(list(range(8))) == (3, 4)  # all 8 held, but the last token must be fed for its logits
    assert index.match([9] + list(range(1, 9))) == (None, 0)
    index.put(3, [1, 2])
    assert index.match(list(range(9))) == (None, 0)  # what the slot held before is forgotten


def test_placement_keeps_rows_packed_reusing_in_place_or_by_copy():
    cache = PrefixCache(block=4)
    system = list(range(100, 108))
    cache.keep(0, system + [1, 2, 3])
    cache.keep(1, [7, 7, 7, 7, 7])
    first, copies = cache.place([system + [5]], live=[], limit=3)
    assert [(p.slot, p.reused, p.source) for p in first] == [(0, 8, None)] and copies == []  # its prefix is in place
    second, copies = cache.place([system + [6, 6]], live=[0], limit=3)  # slot 0 is live now: copied into slot 1,
    assert [(p.slot, p.reused, p.source) for p in second] == [(1, 8, 0)]
    assert copies == [(1, 2, 5), (0, 1, 8)]  # after the row kept there moved up to slot 2
    third, copies = cache.place([[1, 2, 3, 4, 5]], live=[0, 1], limit=3)
    assert [(p.slot, p.reused, p.source) for p in third] == [(2, 0, None)] and copies == []  # nowhere to move: evicted
    assert cache.place([[1, 2]], live=[0, 1, 2], limit=3) is None
    assert cache.stats() == {"prefix_lookups": 3, "prefix_hits": 2, "prefix_reused_tokens": 16}


def test_a_rank_copies_the_first_positions_of_a_row_in_every_cache():
    k = torch.arange(3 * 2 * 6 * 1, dtype=torch.float32).view(3, 2, 6, 1)  # [slots, heads, positions, dim]
    before = k.clone()
    copy_rows({"k_cache": k, "scalar": torch.zeros(3)}, CopyRows(((0, 2, 4),)))
    assert torch.equal(k[2, :, :4], before[0, :, :4]) and torch.equal(k[2, :, 4:], before[2, :, 4:])
    assert torch.equal(k[:2], before[:2])


def test_an_unrelated_prompt_takes_the_lowest_slot_even_over_a_kept_row():
    """A round runs as wide as its highest slot: one new row after a finished one must not decode at
    batch bucket 4 to spare a kept row (it did, and decode ran 1.5x slower)."""
    cache = PrefixCache(block=4)
    cache.keep(0, list(range(20)))
    placed, copies = cache.place([[9, 9, 9, 9, 9]], live=[], limit=4)
    assert [p.slot for p in placed] == [0] and copies == [(0, 3, 20)]  # the kept row moves up, out of the way
    placed, copies = cache.place([list(range(18))], live=[0], limit=4)
    assert [(p.slot, p.reused, p.source) for p in placed] == [(1, 16, 3)] and copies == [(3, 1, 16)]
