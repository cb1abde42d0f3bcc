"""The sharing half of the allocator contract in exact cases: prefix-cache reuse after seal,
fork + copy-on-write, LRU eviction, pending copies, and buddy's growth rule.

The random interleavings of every allocator are in test_kv_allocators.py; these pin down the
numbers the docstrings promise, and each bug found in review has its reproduction here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cortexlab.kv import BuddyAllocator, OutOfBlocks, PrefixAllocator, allocators
from cortexlab.kv.prefix import chain_hashes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


@dataclass
class Seq:
    request_id: Any
    max_num_tokens: int
    prompt_token_ids: list = field(default_factory=list)
    output_token_ids: list = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list = field(default_factory=list)


def prefix(num_blocks: int = 16, block_size: int = 4) -> PrefixAllocator:
    return allocators.create("prefix", num_blocks=num_blocks, block_size=block_size)


def computed(alloc: PrefixAllocator, seq: Seq, num_tokens: int) -> Seq:
    """Allocate `seq` for `num_tokens`, as if computed and sealed (the engine's order)."""
    alloc.allocate(seq, num_tokens)
    seq.num_computed_tokens = num_tokens
    alloc.seal(seq)
    return seq


# --- prefix cache -----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    block_size=st.sampled_from([1, 2, 4, 16]),
    prompt_len=st.integers(1, 70),
    data=st.data(),
)
def test_seal_then_same_prompt_hits_the_sealed_full_blocks(block_size, prompt_len, data) -> None:
    """A second request with the same prompt reuses exactly the sealed full blocks, capped
    below the prompt's last token (whose logits must be computed), and shares their ids."""
    alloc = prefix(num_blocks=2 * prompt_len + 2, block_size=block_size)
    prompt = data.draw(st.lists(st.integers(0, 5), min_size=prompt_len, max_size=prompt_len))
    first = Seq("a", prompt_len + 8, prompt)
    alloc.allocate(first, prompt_len)
    first.num_computed_tokens = data.draw(st.integers(0, prompt_len), label="computed")
    alloc.seal(first)
    num_hit_blocks = min(first.num_computed_tokens, prompt_len - 1) // block_size
    second = Seq("b", prompt_len + 8, list(prompt))
    assert alloc.num_cached_tokens(second) == num_hit_blocks * block_size
    assert alloc.allocate(second, prompt_len) == num_hit_blocks * block_size
    assert second.block_table[:num_hit_blocks] == first.block_table[:num_hit_blocks]
    assert not set(second.block_table[num_hit_blocks:]) & set(first.block_table)
    for b in second.block_table[:num_hit_blocks]:
        assert alloc.ref_count(b) == 2
    hashes = chain_hashes(prompt, block_size)
    assert [alloc.block_hash(b) for b in second.block_table[:num_hit_blocks]] == hashes[
        :num_hit_blocks
    ]
    usage = alloc.usage()
    assert usage.num_hit_tokens == num_hit_blocks * block_size
    assert usage.num_lookup_tokens == 2 * prompt_len
    assert usage.num_shared_slots == num_hit_blocks * block_size


def test_cached_blocks_never_cover_the_prompts_last_token() -> None:
    alloc = prefix(block_size=4)
    computed(alloc, Seq("a", 16, list(range(12))), 12)  # three full blocks, all sealed
    for prompt_len, hit in [(4, 0), (5, 4), (8, 4), (9, 8), (12, 8), (13, 12)]:
        seq = Seq(prompt_len, 16, list(range(prompt_len)))
        assert alloc.num_cached_tokens(seq) == hit, prompt_len
    assert alloc.num_cached_tokens(Seq("other", 16, [9, 9, 9, 9, 9])) == 0


def test_a_freed_requests_blocks_stay_cached_until_evicted_lru_first() -> None:
    alloc = prefix(num_blocks=5, block_size=2)
    a = computed(alloc, Seq("a", 8, [1, 2, 3, 4, 5]), 5)  # blocks 0, 1 keyed; 2 partial
    b = computed(alloc, Seq("b", 8, [7, 7, 5]), 3)  # block 3 keyed; 4 partial
    alloc.free(a)
    alloc.free(b)
    # Tail first within a request, so its deepest block is evicted before its parents.
    assert alloc.cached_block_ids() == [1, 0, 3]
    usage = alloc.usage()
    assert (usage.num_cached_blocks, usage.num_free_blocks, usage.num_free_slots) == (3, 5, 4)
    # A hit revives a cached block; fresh blocks come from the free list before eviction.
    c = Seq("c", 8, [1, 2, 9, 9, 9, 9, 9])
    assert alloc.allocate(c, 7) == 2
    assert c.block_table == [0, 2, 4, 1]  # hit 0, free 2 and 4, then evict LRU block 1
    assert alloc.take_evicted() == [1]
    assert alloc.block_hash(1) is None and alloc.cached_block_ids() == [3]
    assert alloc.evict(5) == [3]
    assert alloc.usage().num_evicted_blocks == 2


def test_a_repeated_lookup_of_one_prompt_sees_every_cache_change() -> None:
    """Admission looks one prompt up three times in a row, so the last walk is remembered;
    a seal or an eviction in between must not leave it stale."""
    alloc = prefix(num_blocks=8, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    probe, a = Seq("x", 8, prompt), Seq("a", 8, prompt)  # one list object
    assert alloc.num_cached_tokens(probe) == 0
    alloc.allocate(a, 5)
    for num_computed, hit in [(2, 2), (4, 4)]:
        a.num_computed_tokens = num_computed
        alloc.seal(a)
        assert alloc.num_cached_tokens(probe) == hit
    alloc.free(a)
    assert alloc.num_cached_tokens(probe) == 4  # still cached, though nobody holds it
    assert alloc.evict(1) == [1]  # the deepest block goes first
    assert alloc.num_cached_tokens(probe) == 2
    alloc.evict(1)
    assert alloc.num_cached_tokens(probe) == 0


def test_allocate_refusal_counts_cached_hits_that_leave_the_pool() -> None:
    """Bug: the message said "needs 1 more block(s) but 1 are free" for a refusal, because
    reviving an unheld cached hit also takes a block from the pool."""
    alloc = prefix(num_blocks=2, block_size=2)
    alloc.free(computed(alloc, Seq("a", 4, [1, 2, 3]), 3))  # block 0 cached, block 1 free
    hog = Seq("hog", 2, [5])
    alloc.allocate(hog, 1)  # takes the plain free block: only the cached one is left
    again = Seq("b", 4, [1, 2, 3])
    assert alloc.num_cached_tokens(again) == 2
    assert not alloc.can_allocate(again, 3)
    with pytest.raises(OutOfBlocks, match="needs 2 more block.*but 1 are free"):
        alloc.allocate(again, 3)


# --- forks and copy-on-write -----------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(block_size=st.sampled_from([1, 2, 4, 16]), num_tokens=st.integers(1, 40))
def test_fork_then_append_on_both_copies_the_shared_partial_block_once(
    block_size: int, num_tokens: int
) -> None:
    alloc = prefix(num_blocks=2 * num_tokens // block_size + 2, block_size=block_size)
    parent = Seq("p", 64, list(range(num_tokens)))
    alloc.allocate(parent, num_tokens)
    child = Seq("c", 64, list(range(num_tokens)))
    assert alloc.can_fork(parent, child)
    alloc.fork(parent, child)
    assert child.block_table == parent.block_table and alloc.take_copies() == []
    assert alloc.usage().num_used_slots == num_tokens  # shared tokens counted once
    before = list(parent.block_table)
    alloc.append(parent, num_tokens + 1)
    alloc.append(child, num_tokens + 1)
    last = num_tokens // block_size  # the block position num_tokens falls in
    copies = alloc.take_copies()
    assert len(parent.block_table) == len(child.block_table)
    pairs = zip(parent.block_table, child.block_table, strict=True)
    diff = [i for i, (p, c) in enumerate(pairs) if p != c]
    assert diff == [last]  # the tables differ only in the block being written
    if num_tokens % block_size:  # it was shared and partly full: exactly one copy
        assert copies == [(before[last], parent.block_table[last])]
        assert child.block_table[last] == before[last]  # the second writer keeps it
    else:  # the new position opens a new block for each: nothing to copy
        assert copies == []
    for b in set(parent.block_table + child.block_table):
        assert alloc.ref_count(b) == (parent.block_table + child.block_table).count(b)


def test_pending_copies_into_a_freed_block_are_dropped() -> None:
    """Bug: a copy into a block whose holder was freed before the copies were taken stayed
    pending, aimed at a block nobody held (or, later, somebody else's)."""
    alloc = prefix(num_blocks=4, block_size=4)
    parent, child = Seq("p", 16, [1, 2, 3, 4, 5, 6]), Seq("c", 16)
    alloc.allocate(parent, 6)
    alloc.fork(parent, child)
    alloc.append(parent, 7)  # copy-on-write of the shared block 1 into block 2
    alloc.free(parent)
    assert alloc.take_copies() == []


def test_pending_copy_chains_survive_freeing_the_middle_block() -> None:
    """A copy into a freed block stays when a later copy reads that block."""
    alloc = prefix(num_blocks=8, block_size=4)
    p, c1, c2 = Seq("p", 16), Seq("c1", 16), Seq("c2", 16)
    alloc.allocate(p, 5)  # blocks 0, 1
    alloc.fork(p, c1)
    alloc.append(p, 6)  # 1 -> 2
    alloc.fork(p, c2)
    alloc.append(p, 7)  # 2 -> 3: reads block 2, which only c2 holds now
    alloc.free(c2)
    assert alloc.take_copies() == [(1, 2), (2, 3)]
    base = allocators.create("paged", num_blocks=8, block_size=4)
    q, r = Seq("q", 16), Seq("r", 16)
    base.allocate(q, 5)
    base.fork(q, r)  # without sharing a fork copies at once
    base.free(r)
    assert base.take_copies() == []


def test_rewriting_a_cached_block_only_one_table_holds_uncaches_it() -> None:
    """Bug: after a fork's parent sealed a block and was freed, the child alone held the
    cached block; prepare_write over it wrote in place and the cache kept serving it."""
    alloc = prefix(num_blocks=4, block_size=4)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    parent, child = Seq("p", 16, prompt), Seq("c", 16, list(prompt))
    alloc.allocate(parent, 8)
    alloc.fork(parent, child)
    parent.num_computed_tokens = 8
    alloc.seal(parent)
    alloc.free(parent)
    assert [alloc.ref_count(b) for b in child.block_table] == [1, 1]
    assert alloc.num_cached_tokens(Seq("x", 16, list(prompt))) == 8
    alloc.prepare_write(child, 4, 8)  # e.g. recomputing positions 4..7
    assert alloc.take_copies() == []  # nobody else reads it: written in place
    assert alloc.block_hash(child.block_table[1]) is None
    assert alloc.num_cached_tokens(Seq("x", 16, list(prompt))) == 4
    child.num_computed_tokens = 4
    alloc.seal(child)
    with pytest.raises(ValueError, match="sealed"):
        alloc.prepare_write(child, 0, 4)  # its own sealed blocks are never rewritten
    assert alloc.prepare_write(child, 8, 8) is None  # an empty range is a no-op


def test_fork_checks_its_arguments() -> None:
    for name in ("paged", "prefix"):
        alloc = allocators.create(name, num_blocks=4, block_size=4)
        parent = Seq("p", 16)
        with pytest.raises(ValueError, match="parent .*holds no blocks"):
            alloc.can_fork(parent, Seq("c", 16))
        alloc.allocate(parent, 9)
        with pytest.raises(ValueError, match="child.max_num_tokens must be >= the parent's 9"):
            alloc.fork(parent, Seq("c", 8))
        with pytest.raises(ValueError, match="child .*already holds"):
            alloc.fork(parent, parent)
        assert alloc.usage().num_sequences == 1


# --- buddy -----------------------------------------------------------------------------------


def test_buddy_starts_from_the_aligned_power_of_two_decomposition() -> None:
    alloc = allocators.create("buddy", num_blocks=20, block_size=4)
    assert alloc.free_chunks() == [(0, 16), (16, 4)]
    seq = Seq("a", 32)  # at most 8 blocks: regions of up to 4 blocks (the cap)
    assert alloc.cap_order(8) == 2
    alloc.allocate(seq, 9)  # 3 blocks -> one 4-block region, from the smallest chunk that fits
    assert seq.block_table == [16, 17, 18, 19]
    assert alloc.free_chunks() == [(0, 16)]
    usage = alloc.usage()
    assert (usage.num_used_slots, usage.num_reserved_slots) == (9, 7)
    assert usage.num_internal_fragmented_slots == 3  # the last occupied block's tail
    alloc.append(seq, 17)  # 5 blocks: one more 4-block region, split off the 16-block chunk
    assert seq.block_table == [16, 17, 18, 19, 0, 1, 2, 3]
    assert alloc.free_chunks() == [(4, 4), (8, 8)]
    alloc.free(seq)
    assert alloc.free_chunks() == [(0, 16), (16, 4)]  # coalesced back


def test_buddy_counts_blocks_past_the_maximum_as_internal_fragmentation() -> None:
    alloc = allocators.create("buddy", num_blocks=16, block_size=4)
    seq = Seq("a", 20)  # at most 5 blocks
    alloc.allocate(seq, 20)
    assert len(seq.block_table) == 8  # rounded up to a power of two (cap permitting)
    usage = alloc.usage()
    assert usage.num_reserved_slots == 12
    assert usage.num_internal_fragmented_slots == 12  # 3 whole blocks it can never use


@pytest.mark.parametrize("block_size", [1, 3])
def test_buddy_lone_request_always_grows_to_its_maximum(block_size: int) -> None:
    """The growth rule's claim, for every arena up to 40 blocks and every maximum that fits:
    alone, a request grows token by token (or in one claim) to its maximum."""
    for num_blocks in range(1, 41):
        alloc = BuddyAllocator(num_blocks=num_blocks, block_size=block_size)
        for max_blocks in range(1, num_blocks + 1):
            seq = Seq("a", max_blocks * block_size)
            assert alloc.can_ever_fit(seq)
            alloc.allocate(seq, 1)
            for n in range(2, seq.max_num_tokens + 1):
                assert alloc.can_append(seq, n), (num_blocks, max_blocks, n)
                alloc.append(seq, n)
            alloc.free(seq)
            assert alloc.can_allocate(seq, seq.max_num_tokens)
        assert not alloc.can_ever_fit(Seq("big", (num_blocks + 1) * block_size))
