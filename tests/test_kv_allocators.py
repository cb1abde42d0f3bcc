"""Invariants of the KV block allocators under random allocate / append / fork / free / seal /
evict interleavings, checked against an independent model after every step."""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cortexlab.kv import (
    Allocator,
    BlockAllocator,
    KVSequence,
    OutOfBlocks,
    SharingAllocator,
    allocators,
    longest_run,
    longest_unheld_run,
    slot_mapping,
)

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

ALLOCATOR_NAMES = ["buddy", "contiguous", "paged", "prefix"]
BLOCK_SIZES = [1, 4, 16]
MAX_NUM_SEQUENCES = 12
VOCAB = 3  # few token ids and a few shared prefixes, so that prefix-cache hits really happen
NUM_PREFIXES = 3


@dataclass
class Seq:
    request_id: Any
    max_num_tokens: int
    block_table: list = field(default_factory=list)
    prompt_token_ids: list = field(default_factory=list)
    output_token_ids: list = field(default_factory=list)
    num_computed_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def naive_longest_run(ids: list[int]) -> int:
    best = run = 0
    previous = None
    for i in sorted(ids):
        run = run + 1 if previous is not None and i == previous + 1 else 1
        best = max(best, run)
        previous = i
    return best


def snapshot(alloc: BlockAllocator, seqs: dict[int, Seq]) -> tuple:
    """Everything a failed act must leave untouched: allocator internals and all tables."""
    tables = {i: list(seq.block_table) for i, seq in seqs.items()}
    return copy.deepcopy(vars(alloc)), tables, alloc.usage()


def chain_hash_list(token_ids: list[int], block_size: int, num_blocks: int) -> list[int]:
    """The documented key chain: block i's hash is hash((block i-1's hash or 0, its tokens))."""
    hashes, parent = [], 0
    for i in range(num_blocks):
        parent = hash((parent, tuple(token_ids[i * block_size : (i + 1) * block_size])))
        hashes.append(parent)
    return hashes


def buddy_region_sizes(num_blocks: int, max_blocks: int, capacity: int, target: int) -> list:
    """The growth rule of buddy.py's docstring, restated: region sizes that grow `capacity`
    blocks to at least `target`."""
    # The largest cap C = 2**k with ceil(m / C) + k <= the aligned C-block chunks of the arena.
    cap = 1 << next(
        (
            k
            for k in range(num_blocks.bit_length() - 1, 0, -1)
            if ceil_div(max_blocks, 1 << k) + k <= num_blocks >> k
        ),
        0,
    )
    sizes = []
    while capacity < target:
        if capacity == 0:
            size = min(1 << (target - 1).bit_length(), cap)  # next power of two, capped
        else:
            size = min(1 << (capacity.bit_length() - 1), cap)  # double, capped
        sizes.append(size)
        capacity += size
    return sizes


def buddy_fits(free_chunks: list[tuple[int, int]], sizes: list[int]) -> bool:
    """Whether regions of `sizes` can be cut, in order, from free chunks (smallest first)."""
    chunks = [size for _, size in free_chunks]
    for size in sizes:
        fitting = [c for c in chunks if c >= size]
        if not fitting:
            return False
        chunk = min(fitting)
        chunks.remove(chunk)
        while chunk > size:  # split: the upper half stays free
            chunk //= 2
            chunks.append(chunk)
    return True


class AllocatorMachine(RuleBasedStateMachine):
    """Model: each live sequence's tokens, computed tokens, sealed blocks (prefix), regions
    (buddy) and what each physical slot holds; the allocator must agree after every step.

    A slot's content is the identity of the token prefix written there (a hash chain over
    token ids), so any write into a block another sequence reads, a copy gone wrong or a
    cache hit on the wrong block shows up as a sequence whose computed positions hold
    someone else's prefix.
    """

    allocator_name = "paged"
    block_size = 4

    @initialize(num_blocks=st.integers(1, 20))
    def build(self, num_blocks: int) -> None:
        self.alloc: BlockAllocator = allocators.create(
            self.allocator_name, num_blocks=num_blocks, block_size=self.block_size
        )
        self.is_prefix = self.allocator_name == "prefix"
        self.is_buddy = self.allocator_name == "buddy"
        self.seqs: dict[int, Seq] = {}  # every Seq ever made, by slot; live iff in tokens
        self.tokens: dict[int, int] = {}
        self.idents: dict[int, list[int]] = {}  # slot -> identity of each token prefix
        self.sealed: dict[int, int] = {}  # slot -> blocks the allocator counts as sealed
        self.regions: dict[int, list[int]] = {}  # slot -> buddy region sizes, in table order
        self.content: dict[int, list] = {}  # block -> identity per slot (None: unwritten)
        self.pending: list[tuple[int, int]] = []  # copies take_copies() must return next
        self.num_hit_tokens = self.num_lookup_tokens = self.num_evicted = 0
        rng = np.random.default_rng(self.block_size)
        self.prefixes = [
            rng.integers(0, VOCAB, 3 * self.block_size).tolist() for _ in range(NUM_PREFIXES)
        ]

    # --- the model ------------------------------------------------------------------------

    def extend_tokens(self, data: st.DataObject, slot: int, num_tokens: int) -> None:
        """Sample output tokens until the sequence has `num_tokens` tokens in all."""
        seq = self.seqs[slot]
        missing = num_tokens - len(seq.token_ids)
        if missing > 0:
            seq.output_token_ids += data.draw(
                st.lists(st.integers(0, VOCAB - 1), min_size=missing, max_size=missing),
                label="output",
            )
        idents = self.idents[slot]
        for token in seq.token_ids[len(idents) :]:
            idents.append(hash((idents[-1] if idents else 0, token)))

    def held(self) -> Counter:
        """Table entries per block (a sequence freed or refused holds an empty table)."""
        return Counter(b for seq in self.seqs.values() for b in seq.block_table)

    def free_ids(self) -> list[int]:
        return self.alloc.free_block_ids()

    def blocks_for(self, seq: Seq, num_tokens: int, capacity: int = 0) -> list[int]:
        """Sizes of what the policy takes to grow from `capacity` blocks to hold `num_tokens`
        (one entry per block, or per region for buddy)."""
        bs = self.block_size
        if self.allocator_name == "contiguous":
            return [1] * ceil_div(seq.max_num_tokens, bs) if capacity == 0 else []
        if self.is_buddy:
            max_blocks = ceil_div(seq.max_num_tokens, bs)
            target = ceil_div(num_tokens, bs)
            return buddy_region_sizes(self.alloc.num_blocks, max_blocks, capacity, target)
        return [1] * max(0, ceil_div(num_tokens, bs) - capacity)

    def pool_can_give(self, sizes: list[int], extra: int = 0) -> bool:
        """Whether the policy's free pool can give `sizes` (plus `extra` single blocks)."""
        free = self.free_ids()
        if self.allocator_name == "contiguous":
            return sum(sizes) <= naive_longest_run(free)
        if self.is_buddy:
            return buddy_fits(self.alloc.free_chunks(), sizes)
        return sum(sizes) + extra <= len(free)

    def expected_hits(self, prompt: list[int]) -> list[int]:
        """The cached blocks a new request with `prompt` should reuse: the longest run of
        leading full blocks, short of the prompt's last token, whose chain hash some block
        carries (found by scanning every block's hash, not through the cache's index)."""
        if not self.is_prefix:
            return []
        by_hash = {}
        for b in range(self.alloc.num_blocks):
            h = self.alloc.block_hash(b)
            if h is not None:
                assert h not in by_hash, "two blocks carry one chain hash"
                by_hash[h] = b
        hits = []
        num_blocks = (len(prompt) - 1) // self.block_size
        for h in chain_hash_list(prompt, self.block_size, num_blocks):
            if h not in by_hash:
                break
            hits.append(by_hash[h])
        return hits

    def writes(self, slot: int, start: int, end: int) -> tuple[list[int], list[int]]:
        """Table indices positions [start, end) fall in that must not be written in place:
        (shared with another table: copied, cached but ours alone: leaves the cache)."""
        if not self.is_prefix or start >= end:
            return [], []
        table, held = self.seqs[slot].block_table, self.held()
        indices = range(start // self.block_size, min(len(table), ceil_div(end, self.block_size)))
        shared = [i for i in indices if held[table[i]] > 1]
        cached = [
            i
            for i in indices
            if held[table[i]] == 1 and self.alloc.block_hash(table[i]) is not None
        ]
        return shared, cached

    def act(self, fn, *args):
        """Run an act that may take blocks; check what the prefix cache evicted for it:
        only when the free list ran dry, least recently used first, never a hit."""
        if not self.is_prefix:
            return fn(*args)
        order = self.alloc.cached_block_ids()
        hashes = {b: self.alloc.block_hash(b) for b in order}
        held_before = set(self.held())
        num_plain_free = len(self.free_ids()) - len(order)
        result = fn(*args)
        held_after = self.held()
        hits = {b for b in order if b in held_after and self.alloc.block_hash(b) == hashes[b]}
        gone = [b for b in order if self.alloc.block_hash(b) != hashes[b]]
        survivors = [b for b in order if b not in hits]
        assert gone == survivors[: len(gone)], "eviction is not least recently used first"
        num_taken = len(set(held_after) - held_before - hits)
        assert len(gone) == max(0, num_taken - num_plain_free), "evicted with free blocks left"
        self.num_evicted += len(gone)
        return result

    def check_refusal(self, act, *args, error=OutOfBlocks, match="block") -> None:
        before = snapshot(self.alloc, self.seqs)
        with pytest.raises(error, match=match):
            act(*args)
        assert snapshot(self.alloc, self.seqs) == before

    def write(self, slot: int, start: int, end: int) -> None:
        """The forward pass: positions [start, end) of `slot` get its prefix identities."""
        bs, table, idents = self.block_size, self.seqs[slot].block_table, self.idents[slot]
        held = self.held()
        for i in range(start // bs, ceil_div(end, bs) if start < end else 0):
            b = table[i]
            # A block written in place is read by no other table and no cache entry.
            assert held[b] == 1, f"write into block {b} shared by {held[b]} tables"
            if self.is_prefix:
                assert self.alloc.block_hash(b) is None, f"write into cached block {b}"
            slots = self.content.setdefault(b, [None] * bs)
            for p in range(max(start, i * bs), min(end, (i + 1) * bs)):
                slots[p % bs] = idents[p]

    def live_slot(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.tokens)), label="slot")

    def idle_slot(self, data: st.DataObject) -> int:
        idle = [s for s in range(MAX_NUM_SEQUENCES) if s not in self.tokens]
        return data.draw(st.sampled_from(idle), label="slot")

    # --- rules ----------------------------------------------------------------------------

    @precondition(lambda self: len(self.tokens) < MAX_NUM_SEQUENCES)
    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        bs = self.block_size
        slot = self.idle_slot(data)
        # A shared prefix cut anywhere (often at a block boundary) plus a short tail, or
        # another request's prompt again: the cases a prefix cache is for.
        prefix = self.prefixes[data.draw(st.integers(0, NUM_PREFIXES - 1), label="prefix")]
        cuts = st.sampled_from([bs, 2 * bs, len(prefix)]) | st.integers(0, len(prefix))
        keep = data.draw(cuts, label="keep")
        tail = data.draw(st.lists(st.integers(0, VOCAB - 1), max_size=bs), label="tail")
        prompt = (prefix[:keep] + tail) or [0]
        again = data.draw(st.sampled_from([None, *sorted(self.seqs)]), label="same prompt as")
        if again is not None:  # the very list: prefix remembers its last lookup by object
            prompt = self.seqs[again].prompt_token_ids
        max_num_tokens = len(prompt) + data.draw(st.integers(0, 2 * bs), label="max_output")
        # Reuse the slot's request id: a freed (e.g. preempted) request may come back.
        seq = self.seqs[slot] = Seq(
            request_id=f"r{slot}", max_num_tokens=max_num_tokens, prompt_token_ids=prompt
        )
        self.idents[slot] = []
        self.extend_tokens(data, slot, 0)
        fits_empty = ceil_div(max_num_tokens, bs) <= self.alloc.num_blocks
        assert self.alloc.can_ever_fit(seq) == fits_empty
        hits = self.expected_hits(prompt)
        assert self.alloc.num_cached_tokens(seq) == len(hits) * bs
        # Mostly the whole prompt (a prefill), sometimes any size (a chunk, a recompute).
        if data.draw(st.booleans(), label="whole prompt"):
            num_tokens = len(prompt)
        else:
            num_tokens = data.draw(st.integers(1, max_num_tokens), label="num_tokens")
        self.extend_tokens(data, slot, num_tokens)
        hits = hits[: num_tokens // bs]
        num_unheld = sum(1 for b in hits if b not in self.held())
        sizes = self.blocks_for(seq, num_tokens)
        can = self.alloc.can_allocate(seq, num_tokens)
        assert can == self.pool_can_give(sizes[len(hits) :], extra=num_unheld)
        # What usable_free_slots promises: the largest first claim the policy could serve.
        most = seq.max_num_tokens if self.allocator_name == "contiguous" else num_tokens
        reserve = ceil_div(most, bs)
        usable = self.alloc.usable_free_slots(seq) // bs
        assert can == (reserve - len(hits) + num_unheld <= usable)
        if not self.tokens and fits_empty:
            assert can, "a lone first claim that fits the empty arena was refused"
        if not can:
            self.check_refusal(self.alloc.allocate, seq, num_tokens)
            return
        hit_tokens = self.act(self.alloc.allocate, seq, num_tokens)
        assert hit_tokens == len(hits) * bs
        assert seq.block_table[: len(hits)] == hits, "hits are not the blocks looked up"
        seq.num_computed_tokens = hit_tokens
        self.tokens[slot] = num_tokens
        self.sealed[slot] = len(hits)
        self.regions[slot] = sizes
        if self.is_prefix:
            self.num_lookup_tokens += len(prompt)
            self.num_hit_tokens += hit_tokens

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def append(self, data: st.DataObject) -> None:
        slot = self.live_slot(data)
        seq, current = self.seqs[slot], self.tokens[slot]
        # Mostly decode steps of one token, sometimes a jump (chunked prefill, spec decode).
        step = data.draw(st.sampled_from([0, 1, 1, 1, None]), label="step")
        if step is None:
            num_tokens = data.draw(st.integers(current, seq.max_num_tokens), label="num_tokens")
        else:
            num_tokens = min(current + step, seq.max_num_tokens)
        self.extend_tokens(data, slot, num_tokens)
        table = seq.block_table
        sizes = self.blocks_for(seq, num_tokens, capacity=len(table))
        shared, cached = self.writes(slot, current, num_tokens)
        assert not cached, "an append writes into a cached block"
        can = self.alloc.can_append(seq, num_tokens)
        assert can == (not sizes and not shared or self.pool_can_give(sizes, len(shared)))
        if self.allocator_name == "contiguous":
            assert can and not sizes  # the reservation already covers max_num_tokens
        if not can:
            self.check_refusal(self.alloc.append, seq, num_tokens)
            return
        before, free_before = list(table), set(self.free_ids())
        self.act(self.alloc.append, seq, num_tokens)
        assert seq.block_table is table  # grown in place
        for i, b in enumerate(before):
            if i in shared:  # copy-on-write: a fresh block, the old one stays with the others
                assert table[i] in free_before
                self.pending.append((b, table[i]))
            else:
                assert table[i] == b, "existing blocks never move"
        assert set(table[len(before) :]) <= free_before
        self.tokens[slot] = num_tokens
        self.regions[slot] += sizes

    @precondition(lambda self: self.tokens and len(self.tokens) < MAX_NUM_SEQUENCES)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        parent_slot = self.live_slot(data)
        slot = self.idle_slot(data)
        parent, num_tokens = self.seqs[parent_slot], self.tokens[parent_slot]
        child = self.seqs[slot] = Seq(
            request_id=f"r{slot}",
            max_num_tokens=parent.max_num_tokens,
            prompt_token_ids=parent.prompt_token_ids,
            output_token_ids=list(parent.output_token_ids),
            num_computed_tokens=parent.num_computed_tokens,
        )
        self.idents[slot] = list(self.idents[parent_slot])
        sizes = self.blocks_for(child, num_tokens)
        can = self.alloc.can_fork(parent, child)
        # Sharing takes no block; otherwise a fork is a first claim plus copies.
        assert can == (self.is_prefix or self.pool_can_give(sizes))
        if not can:
            self.check_refusal(self.alloc.fork, parent, child)
            return
        free_before = set(self.free_ids())
        self.act(self.alloc.fork, parent, child)
        if self.is_prefix:
            assert child.block_table == parent.block_table
        else:
            assert set(child.block_table) <= free_before
            occupied = ceil_div(num_tokens, self.block_size)
            self.pending += zip(
                parent.block_table[:occupied], child.block_table[:occupied], strict=True
            )
        self.tokens[slot] = num_tokens
        self.sealed[slot] = self.sealed[parent_slot]
        self.regions[slot] = sizes

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def compute_and_seal(self, data: st.DataObject) -> None:
        """One engine step for a sequence: copy-on-write what it will write, apply the
        copies, compute positions [num_computed, c), then seal."""
        bs = self.block_size
        slot = self.live_slot(data)
        seq = self.seqs[slot]
        start, num_sealed = seq.num_computed_tokens, self.sealed[slot]
        num_tokens = self.tokens[slot]
        end = data.draw(st.just(num_tokens) | st.integers(start, num_tokens), label="computed")
        if not self.prepare_write(slot, start, end):
            return
        self.apply_copies()
        self.write(slot, start, end)
        seq.num_computed_tokens = end
        self.alloc.seal(seq)
        self.sealed[slot] = max(self.sealed[slot], end // bs)
        if not self.is_prefix:
            assert self.alloc.num_cached_tokens(seq) == 0
            return
        # Every full computed block's content is now cached: in this block, or in another
        # that already held the same prefix (then this one stays plain).
        hashes = chain_hash_list(seq.token_ids, bs, end // bs)
        cached = {self.alloc.block_hash(b) for b in range(self.alloc.num_blocks)}
        for i in range(num_sealed, end // bs):
            assert hashes[i] in cached
            assert self.alloc.block_hash(seq.block_table[i]) in (None, hashes[i])
        # A new request with the same prompt would reuse exactly the cached run.
        probe = Seq(request_id="probe", max_num_tokens=seq.max_num_tokens)
        probe.prompt_token_ids = seq.prompt_token_ids  # looked up before this seal
        expected = self.expected_hits(probe.prompt_token_ids)
        assert self.alloc.num_cached_tokens(probe) == len(expected) * bs

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def recompute(self, data: st.DataObject) -> None:
        """Rewrite already computed positions [start, num_computed) (prepare_write first)."""
        slot = self.live_slot(data)
        end = self.seqs[slot].num_computed_tokens
        start = data.draw(st.integers(0, end), label="start")
        if self.is_prefix and start < self.sealed[slot] * self.block_size:
            self.check_refusal(
                self.alloc.prepare_write,
                self.seqs[slot],
                start,
                end,
                error=ValueError,
                match="sealed",
            )
        elif self.prepare_write(slot, start, end):
            self.apply_copies()
            self.write(slot, start, end)

    def prepare_write(self, slot: int, start: int, end: int) -> bool:
        seq = self.seqs[slot]
        shared, _ = self.writes(slot, start, end)
        if len(shared) > len(self.free_ids()):
            self.check_refusal(self.alloc.prepare_write, seq, start, end)
            return False
        before, free_before = list(seq.block_table), set(self.free_ids())
        self.act(self.alloc.prepare_write, seq, start, end)
        for i, b in enumerate(before):
            if i in shared:
                assert seq.block_table[i] in free_before
                self.pending.append((b, seq.block_table[i]))
            else:
                assert seq.block_table[i] == b
        return True

    @rule()
    def apply_copies(self) -> None:
        """What the engine does before a forward: apply take_copies() to the arena."""
        copies = self.alloc.take_copies()
        assert copies == self.pending
        held = self.held()
        for k, (src, dst) in enumerate(copies):
            assert src != dst
            # Into a block someone holds, or one a later copy reads (a chain).
            assert held[dst] or any(s == dst for s, _ in copies[k + 1 :])
            self.content[dst] = list(self.content.get(src, [None] * self.block_size))
        self.pending = []
        assert self.alloc.take_copies() == []

    @precondition(lambda self: self.is_prefix)
    @rule(num_blocks=st.integers(0, 4))
    def evict(self, num_blocks: int) -> None:
        order = self.alloc.cached_block_ids()
        evicted = self.alloc.evict(num_blocks)
        assert evicted == order[:num_blocks]
        for b in evicted:
            assert self.alloc.block_hash(b) is None and b in self.free_ids()
        if evicted:
            assert self.alloc.take_evicted()[-len(evicted) :] == evicted
        self.num_evicted += len(evicted)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        slot = self.live_slot(data)
        self.free_slot(slot)

    def free_slot(self, slot: int) -> None:
        seq = self.seqs[slot]
        table = list(seq.block_table)
        order = self.alloc.cached_block_ids() if self.is_prefix else []
        self.alloc.free(seq)
        del self.tokens[slot]
        assert seq.block_table == []
        assert self.alloc.num_tokens_of(seq) == 0
        held = self.held()
        if self.is_prefix:
            # Its cached blocks nobody else holds join the LRU end, deepest first.
            released = [b for b in reversed(table) if not held[b]]
            keyed = [b for b in released if self.alloc.block_hash(b) is not None]
            assert self.alloc.cached_block_ids() == order + keyed
        # Pending copies into blocks nobody holds are dropped, unless a later copy reads them.
        kept, needed = [], {b for b in held}
        for src, dst in reversed(self.pending):
            if dst in needed:
                kept.append((src, dst))
                needed.add(src)
        self.pending = kept[::-1]

    @precondition(lambda self: len(self.seqs) > len(self.tokens))
    @rule(data=st.data())
    def free_idle_is_a_no_op(self, data: st.DataObject) -> None:
        idle = sorted(set(self.seqs) - set(self.tokens))
        seq = self.seqs[data.draw(st.sampled_from(idle), label="slot")]
        before = snapshot(self.alloc, self.seqs)
        self.alloc.free(seq)
        assert snapshot(self.alloc, self.seqs) == before

    # Only once a crowd has built up: freeing everything often would keep the arena empty.
    @precondition(lambda self: len(self.tokens) >= 4)
    @rule()
    def free_everything(self) -> None:
        for slot in list(self.tokens):
            self.free_slot(slot)
        self.check_all_free()

    def check_all_free(self) -> None:
        usage = self.alloc.usage()
        n = self.alloc.num_blocks
        assert self.alloc.num_free_blocks == n
        assert self.alloc.free_block_ids() == list(range(n))
        assert usage.largest_free_run_blocks == n
        assert usage.num_free_slots + usage.num_cached_slots == usage.num_slots
        assert usage.num_used_slots == usage.num_reserved_slots == usage.num_sequences == 0
        assert usage.external_fragmentation == 0.0
        assert self.pending == [] and self.alloc.take_copies() == []
        if self.is_buddy:  # fully coalesced: the arena's power-of-two decomposition
            chunks, first = [], 0
            for order in range(n.bit_length() - 1, -1, -1):
                if n >> order & 1:
                    chunks.append((first, 1 << order))
                    first += 1 << order
            assert self.alloc.free_chunks() == chunks

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def blocks_are_held_by_tables_or_free(self) -> None:
        held = self.held()
        free = self.free_ids()
        assert len(free) == len(set(free)), "a block is free twice"
        assert not set(free) & set(held), "a held block is free"
        assert sorted([*free, *held]) == list(range(self.alloc.num_blocks))
        if self.is_prefix:  # shared by reference: the count is the number of table entries
            for b in range(self.alloc.num_blocks):
                assert self.alloc.ref_count(b) == held[b], f"block {b}"
        else:
            assert all(count == 1 for count in held.values()), "a block in two tables"
        for slot, seq in self.seqs.items():
            if slot not in self.tokens:
                assert seq.block_table == []
            else:
                assert len(set(seq.block_table)) == len(seq.block_table)

    @invariant()
    def tables_match_policy(self) -> None:
        bs = self.block_size
        for slot, num_tokens in self.tokens.items():
            seq = self.seqs[slot]
            table = seq.block_table
            assert self.alloc.num_tokens_of(seq) == num_tokens
            assert len(table) == sum(self.regions[slot])
            assert len(table) * bs >= num_tokens  # every position has a slot
            if self.allocator_name == "contiguous":
                assert table == list(range(table[0], table[0] + len(table)))
            if self.is_buddy:  # each region consecutive and aligned to its size
                first = 0
                for size in self.regions[slot]:
                    region = table[first : first + size]
                    assert region[0] % size == 0
                    assert region == list(range(region[0], region[0] + size))
                    first += size

    @invariant()
    def prefix_cache_is_consistent(self) -> None:
        if not self.is_prefix:
            return
        alloc = self.alloc
        cached = alloc.cached_block_ids()
        assert not set(cached) & set(alloc._free), "a cached block is on the free list"
        assert set(cached) <= set(self.free_ids())
        for b in self.free_ids():
            assert (alloc.block_hash(b) is not None) == (b in cached)
        # Every key maps to a block whose key is that key, and every keyed block is indexed.
        for key, b in alloc._cache.items():
            assert alloc._key[b] == key and alloc.block_hash(b) == hash(key)
        keyed = [b for b in range(alloc.num_blocks) if alloc.block_hash(b) is not None]
        assert len(keyed) == len(alloc._cache)
        # A cached block holds the prefix its key names: a request hitting it reads it.
        for b in keyed:
            assert None not in self.content.get(b, [None]), f"cached block {b} was never full"

    @invariant()
    def computed_positions_hold_their_prefix(self) -> None:
        """Once the pending copies land, every computed position reads its own prefix."""
        content = dict(self.content)
        for src, dst in self.pending:
            content[dst] = content.get(src, [None] * self.block_size)
        bs = self.block_size
        for slot in self.tokens:
            seq, idents = self.seqs[slot], self.idents[slot]
            for p in range(seq.num_computed_tokens):
                slots = content.get(seq.block_table[p // bs])
                assert slots is not None and slots[p % bs] == idents[p], f"slot {slot} pos {p}"

    @invariant()
    def usage_matches_a_recount(self) -> None:
        usage = self.alloc.usage()
        bs, n = self.block_size, self.alloc.num_blocks
        held = self.held()
        fill: dict[int, int] = {}  # tokens in each held block, a shared block counted once
        tails: dict[int, int] = {}  # unused slots of each last occupied block
        beyond = 0  # buddy: whole blocks past what a sequence can ever hold
        for slot, num_tokens in self.tokens.items():
            table = self.seqs[slot].block_table
            for i, b in enumerate(table):
                fill[b] = max(fill.get(b, 0), min(bs, max(0, num_tokens - i * bs)))
            last = table[ceil_div(num_tokens, bs) - 1]
            tails[last] = ceil_div(num_tokens, bs) * bs - num_tokens
            beyond += max(0, len(table) - ceil_div(self.seqs[slot].max_num_tokens, bs))
        num_cached = len(self.alloc.cached_block_ids()) if self.is_prefix else 0
        free = self.free_ids()
        assert usage.num_slots == n * bs
        assert usage.num_used_slots == sum(fill.values())
        assert usage.num_reserved_slots == len(held) * bs - sum(fill.values())
        assert usage.num_cached_slots == num_cached * bs == usage.num_cached_blocks * bs
        assert usage.num_free_slots == (len(free) - num_cached) * bs
        assert usage.num_internal_fragmented_slots == sum(tails.values()) + beyond * bs
        assert usage.num_shared_slots == sum(1 for c in held.values() if c > 1) * bs
        assert usage.num_free_blocks == self.alloc.num_free_blocks == len(free)
        assert usage.num_sequences == len(self.tokens)
        assert usage.largest_free_run_blocks == naive_longest_run(free)
        assert usage.max_sharing == max(held.values(), default=0)
        entries = sum(held.values())
        assert usage.mean_sharing == pytest.approx(entries / len(held) if held else 0.0)
        assert usage.num_hit_tokens == self.num_hit_tokens
        assert usage.num_lookup_tokens == self.num_lookup_tokens
        assert usage.num_evicted_blocks == self.num_evicted
        assert 0.0 <= usage.external_fragmentation < 1.0
        assert 0.0 <= usage.utilization <= 1.0

    @invariant()
    def slots_are_unique_unless_shared(self) -> None:
        slots = [
            slot_mapping(self.seqs[s].block_table, self.block_size, 0, n)
            for s, n in self.tokens.items()
        ]
        flat = np.concatenate(slots) if slots else np.empty(0, dtype=np.int64)
        if not self.is_prefix:
            assert len(np.unique(flat)) == len(flat)
        assert flat.size == 0 or 0 <= flat.min() <= flat.max() < self.alloc.num_blocks * (
            self.block_size
        )

    @invariant()
    def a_lone_sequence_can_always_grow(self) -> None:
        """Once alone (every other sequence preempted), a request that fits the empty arena
        can grow to its maximum (buddy's growth rule claims this; the others trivially)."""
        if len(self.tokens) == 1:
            [slot] = self.tokens
            seq = self.seqs[slot]
            if self.alloc.can_ever_fit(seq):
                assert self.alloc.can_append(seq, seq.max_num_tokens)

    @invariant()
    def free_buddies_are_coalesced(self) -> None:
        if not self.is_buddy:
            return
        chunks = self.alloc.free_chunks()
        blocks = [b for first, size in chunks for b in range(first, first + size)]
        assert blocks == self.free_ids(), "free chunks overlap or miss a free block"
        starts = set(chunks)
        for first, size in chunks:
            assert first % size == 0, "a free chunk is not aligned to its size"
            assert (first ^ size, size) not in starts, "two free buddies were not merged"

    def teardown(self) -> None:
        if hasattr(self, "alloc"):
            self.free_everything()
            if self.is_prefix:  # cached blocks stay until evicted; then all is plainly free
                self.alloc.evict(self.alloc.num_blocks)
                assert self.alloc.usage().num_free_slots == self.alloc.usage().num_slots


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", ALLOCATOR_NAMES)
def test_random_interleavings_keep_invariants(name: str, block_size: int) -> None:
    machine = type(
        f"{name.title()}Machine{block_size}",
        (AllocatorMachine,),
        {"allocator_name": name, "block_size": block_size},
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )


# --- slot mapping ---------------------------------------------------------------------------


def naive_slot_mapping(block_table: list[int], block_size: int, start: int, end: int) -> list:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


@settings(max_examples=200, deadline=None)
@given(
    block_size=st.sampled_from(BLOCK_SIZES),
    block_table=st.lists(st.integers(0, 1000), min_size=0, max_size=10),
    data=st.data(),
)
def test_slot_mapping_matches_naive_loop(block_size: int, block_table: list, data) -> None:
    capacity = len(block_table) * block_size
    start = data.draw(st.integers(0, capacity))
    end = data.draw(st.integers(start, capacity))
    got = slot_mapping(block_table, block_size, start, end)
    assert np.issubdtype(got.dtype, np.integer)
    assert got.tolist() == naive_slot_mapping(block_table, block_size, start, end)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("name", ALLOCATOR_NAMES)
def test_slot_mapping_unique_across_sequences(name: str, block_size: int) -> None:
    alloc = allocators.create(name, num_blocks=64, block_size=block_size)
    rng = np.random.default_rng(0)
    seqs = []
    for i in range(8):
        max_num_tokens = int(rng.integers(1, 4 * block_size + 1))
        seq = Seq(request_id=i, max_num_tokens=max_num_tokens)
        alloc.allocate(seq, int(rng.integers(1, max_num_tokens + 1)))
        alloc.append(seq, max_num_tokens)
        seqs.append(seq)
    slots = np.concatenate(
        [slot_mapping(s.block_table, block_size, 0, s.max_num_tokens) for s in seqs]
    )
    assert len(np.unique(slots)) == len(slots) == sum(s.max_num_tokens for s in seqs)
    assert slots.max() < 64 * block_size


def test_slot_mapping_rejects_out_of_range_positions() -> None:
    with pytest.raises(ValueError, match="end"):
        slot_mapping([0, 1], 4, 0, 9)
    with pytest.raises(ValueError, match="start"):
        slot_mapping([0, 1], 4, 3, 2)
    with pytest.raises(ValueError, match="block_size"):
        slot_mapping([0, 1], 0, 0, 1)


# --- fragmentation ---------------------------------------------------------------------------


def test_contiguous_refuses_what_paged_accepts() -> None:
    """Free blocks {0,1,4,5}: 4 free, but no run of 3 for a contiguous reservation."""
    arenas = {name: allocators.create(name, num_blocks=8, block_size=4) for name in ALLOCATOR_NAMES}
    for name, alloc in arenas.items():
        seqs = [Seq(request_id=i, max_num_tokens=8) for i in range(4)]
        for seq in seqs:
            alloc.allocate(seq, 8)  # two blocks each: the arena is full
        assert alloc.num_free_blocks == 0
        alloc.free(seqs[0])
        alloc.free(seqs[2])
        usage = alloc.usage()
        assert usage.num_free_blocks == 4
        assert usage.largest_free_run_blocks == 2
        assert usage.external_fragmentation == pytest.approx(0.5)
        big = Seq(request_id="big", max_num_tokens=12)
        assert alloc.can_ever_fit(big)
        if name == "contiguous":
            assert not alloc.can_allocate(big, 12)
            with pytest.raises(OutOfBlocks, match=r"3 more block.*4 are free.*largest run.*2"):
                alloc.allocate(big, 12)
            assert big.block_table == []
        else:
            assert alloc.can_allocate(big, 12)
            alloc.allocate(big, 12)
            if name == "buddy":  # its cap here is 2 blocks: two aligned 2-block regions
                assert big.block_table == [0, 1, 4, 5]
            else:
                assert sorted(big.block_table) == [0, 1, 4]


def test_contiguous_reserves_max_up_front_and_coalesces() -> None:
    alloc = allocators.create("contiguous", num_blocks=10, block_size=4)
    a, b, c = (Seq(request_id=i, max_num_tokens=9) for i in range(3))  # 3 blocks each
    for seq in (a, b, c):
        alloc.allocate(seq, 1)
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1, 2], [3, 4, 5], [6, 7, 8])
    usage = alloc.usage()
    assert (usage.num_used_slots, usage.num_reserved_slots, usage.num_fragmented_slots) == (
        3,
        33,
        9,
    )
    alloc.append(a, 9)
    assert a.block_table == [0, 1, 2] and alloc.num_free_blocks == 1
    alloc.free(a)
    alloc.free(c)  # free runs: [0..2], [6..9]
    assert alloc.largest_free_run() == 4
    alloc.free(b)  # bridges both neighbours into one run
    assert alloc.largest_free_run() == alloc.usage().largest_free_run_blocks == 10


def test_paged_takes_blocks_only_as_needed() -> None:
    alloc = allocators.create("paged", num_blocks=4, block_size=4)
    seq = Seq(request_id=0, max_num_tokens=16)
    alloc.allocate(seq, 3)
    assert len(seq.block_table) == 1
    table = seq.block_table
    alloc.append(seq, 4)
    assert len(seq.block_table) == 1
    alloc.append(seq, 5)
    assert seq.block_table is table and len(table) == 2  # grown in place
    usage = alloc.usage()
    assert (usage.num_used_slots, usage.num_reserved_slots, usage.num_fragmented_slots) == (5, 3, 3)
    other = Seq(request_id=1, max_num_tokens=16)
    alloc.allocate(other, 8)
    assert not alloc.can_append(seq, 9)
    with pytest.raises(OutOfBlocks, match="1 more block.*0 are free"):
        alloc.append(seq, 9)


# --- errors and registry ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ALLOCATOR_NAMES)
@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"num_blocks": 0, "block_size": 4}, "num_blocks"),
        ({"num_blocks": -3, "block_size": 4}, "num_blocks"),
        ({"num_blocks": 2.5, "block_size": 4}, "num_blocks"),
        ({"num_blocks": 8, "block_size": 0}, "block_size"),
        ({"num_blocks": 8, "block_size": True}, "block_size"),
    ],
)
def test_constructor_validates(name: str, kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        allocators.create(name, **kwargs)


@pytest.mark.parametrize("name", ALLOCATOR_NAMES)
def test_constructor_is_keyword_only(name: str) -> None:
    with pytest.raises(TypeError):
        allocators.get(name)(8, 4)


@pytest.mark.parametrize("name", ALLOCATOR_NAMES)
def test_bad_calls_raise_value_errors_naming_the_argument(name: str) -> None:
    alloc = allocators.create(name, num_blocks=8, block_size=4)
    seq = Seq(request_id="a", max_num_tokens=10)
    for num_tokens in (0, -1, 11):
        with pytest.raises(ValueError, match=r"num_tokens must be in \[1, seq.max_num_tokens=10\]"):
            alloc.can_allocate(seq, num_tokens)
        with pytest.raises(ValueError, match="num_tokens"):
            alloc.allocate(seq, num_tokens)
    with pytest.raises(ValueError, match="seq .*holds no blocks.*allocate"):
        alloc.append(seq, 2)
    with pytest.raises(ValueError, match="seq .*holds no blocks"):
        alloc.can_append(seq, 2)
    alloc.allocate(seq, 5)
    with pytest.raises(ValueError, match="seq .*already holds"):
        alloc.allocate(seq, 5)
    with pytest.raises(ValueError, match="seq .*already holds"):
        alloc.allocate(Seq(request_id="a", max_num_tokens=10), 5)  # same request id
    with pytest.raises(ValueError, match=r"num_tokens must be in \[5, "):
        alloc.append(seq, 4)  # appends never shrink
    with pytest.raises(ValueError, match="num_tokens"):
        alloc.append(seq, 11)
    with pytest.raises(ValueError, match="num_tokens"):
        alloc.append(seq, 6.0)
    assert alloc.usage().num_used_slots == 5  # failed calls changed nothing


@pytest.mark.parametrize("name", ALLOCATOR_NAMES)
def test_can_ever_fit(name: str) -> None:
    alloc = allocators.create(name, num_blocks=4, block_size=4)
    assert alloc.can_ever_fit(Seq(request_id=0, max_num_tokens=16))
    assert not alloc.can_ever_fit(Seq(request_id=1, max_num_tokens=17))
    assert not alloc.can_ever_fit(Seq(request_id=2, max_num_tokens=0))


def test_registry_lists_available_allocators() -> None:
    import cortexlab as cl

    assert set(ALLOCATOR_NAMES) <= set(cl.kv.available())
    assert cl.kv.available() == sorted(cl.kv.available())
    for name in ALLOCATOR_NAMES:
        assert isinstance(allocators.create(name, num_blocks=2, block_size=2), SharingAllocator)
    with pytest.raises(KeyError, match="paged") as excinfo:
        allocators.get("nope")
    assert "contiguous" in str(excinfo.value)
    alloc = allocators.create("paged", num_blocks=2, block_size=2)
    assert allocators.create(alloc) is alloc
    assert type(alloc).name == "paged"
    assert isinstance(alloc, Allocator)
    assert isinstance(Seq(request_id=0, max_num_tokens=1), KVSequence)


class HighestFirst(BlockAllocator):
    """A user-defined policy: hands out the highest free block ids first."""

    def __init__(self, *, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks=num_blocks, block_size=block_size)
        self._free = list(range(self.num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        return sorted(self._free)

    def _can_take(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def _take(self, num_blocks: int) -> list[int]:
        self._free.sort()
        return [self._free.pop() for _ in range(num_blocks)]

    def _release(self, block_ids: list[int]) -> None:
        self._free += block_ids


def test_user_defined_allocator_registers_and_is_created_by_name() -> None:
    import cortexlab as cl

    assert "mine" not in cl.kv.available()
    try:
        assert cl.kv.register("mine")(HighestFirst) is HighestFirst
        assert "mine" in cl.kv.available()
        assert HighestFirst.name == "mine"
        for spec in ("mine", HighestFirst):  # by name or as the class itself
            alloc = cl.kv.as_allocator(spec, num_blocks=4, block_size=2)
            assert type(alloc) is HighestFirst
            assert (alloc.num_blocks, alloc.block_size) == (4, 2)
        alloc = allocators.create("mine", num_blocks=4, block_size=2)
        seq = Seq(request_id=0, max_num_tokens=8)
        assert alloc.allocate(seq, 3) == 0
        alloc.append(seq, 5)
        assert seq.block_table == [3, 2, 1]
        assert isinstance(alloc, SharingAllocator)  # the neutral sharing half comes with it
        assert alloc.usage().num_used_slots == 5
        alloc.free(seq)
        assert alloc.num_free_blocks == 4
    finally:
        allocators._factories.pop("mine", None)
    assert "mine" not in cl.kv.available()


def test_usage_checks_its_invariant_and_reports_fragmentation() -> None:
    usage = allocators.create("paged", num_blocks=4, block_size=2).usage()
    assert usage.utilization == 0.0 and usage.external_fragmentation == 0.0
    assert "external_fragmentation" in usage._repr_html_()
    with pytest.raises(ValueError, match="num_slots"):
        type(usage)(
            num_slots=8,
            num_used_slots=1,
            num_reserved_slots=0,
            num_free_slots=8,
            num_internal_fragmented_slots=0,
            num_shared_slots=0,
            num_free_blocks=4,
            num_sequences=1,
            largest_free_run_blocks=4,
        )


def test_longest_run() -> None:
    assert longest_run([]) == 0
    assert longest_run([5]) == 1
    assert longest_run([7, 1, 2, 3, 9, 8]) == 3
    assert longest_run(range(10)) == 10


@given(st.integers(1, 80).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_longest_unheld_run_is_the_longest_run_of_the_complement(case) -> None:
    num_blocks, held = case
    held = sorted(held)
    tables = [held[i : i + 3] for i in range(0, len(held), 3)]
    free = sorted(set(range(num_blocks)) - set(held))
    assert longest_unheld_run(num_blocks, tables) == longest_run(free)
