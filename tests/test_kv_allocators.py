"""Invariants of the KV block allocators under random allocate / append / free interleavings."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from cortexlab.kv import (
    Allocator,
    BlockAllocator,
    KVSequence,
    OutOfBlocks,
    allocators,
    longest_run,
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

ALLOCATOR_NAMES = ["paged", "contiguous"]
BLOCK_SIZES = [1, 4, 16]
MAX_NUM_SEQUENCES = 12


@dataclass
class Seq:
    request_id: Any
    max_num_tokens: int
    block_table: list = field(default_factory=list)


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


class AllocatorMachine(RuleBasedStateMachine):
    """Model: for each live sequence, its token count; the allocator must agree after every step."""

    allocator_name = "paged"
    block_size = 4

    @initialize(num_blocks=st.integers(1, 20))
    def build(self, num_blocks: int) -> None:
        self.alloc: BlockAllocator = allocators.create(
            self.allocator_name, num_blocks=num_blocks, block_size=self.block_size
        )
        self.seqs: dict[int, Seq] = {}  # every Seq ever made, by slot; live iff in tokens
        self.tokens: dict[int, int] = {}

    def expected_blocks(self, seq: Seq, num_tokens: int) -> int:
        if self.allocator_name == "contiguous":
            return ceil_div(seq.max_num_tokens, self.block_size)
        return ceil_div(num_tokens, self.block_size)

    def expected_can_take(self, num_needed: int) -> bool:
        free = self.alloc.free_block_ids()
        if self.allocator_name == "contiguous":
            return num_needed <= naive_longest_run(free)
        return num_needed <= len(free)

    def check_refusal(self, act, *args) -> None:
        before = snapshot(self.alloc, self.seqs)
        with pytest.raises(OutOfBlocks, match="block"):
            act(*args)
        assert snapshot(self.alloc, self.seqs) == before

    def live_slot(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from(sorted(self.tokens)), label="slot")

    @precondition(lambda self: len(self.tokens) < MAX_NUM_SEQUENCES)
    @rule(data=st.data())
    def allocate(self, data: st.DataObject) -> None:
        idle = [s for s in range(MAX_NUM_SEQUENCES) if s not in self.tokens]
        slot = data.draw(st.sampled_from(idle), label="slot")
        max_num_tokens = data.draw(st.integers(1, 6 * self.block_size), label="max_num_tokens")
        # Reuse the slot's request id: a freed (e.g. preempted) request may come back.
        seq = self.seqs[slot] = Seq(request_id=f"r{slot}", max_num_tokens=max_num_tokens)
        num_tokens = data.draw(st.integers(1, max_num_tokens), label="num_tokens")
        fits_empty = ceil_div(max_num_tokens, self.block_size) <= self.alloc.num_blocks
        assert self.alloc.can_ever_fit(seq) == fits_empty
        can = self.alloc.can_allocate(seq, num_tokens)
        assert can == self.expected_can_take(self.expected_blocks(seq, num_tokens))
        if can:
            self.alloc.allocate(seq, num_tokens)
            self.tokens[slot] = num_tokens
        else:
            self.check_refusal(self.alloc.allocate, seq, num_tokens)

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
        num_needed = max(0, self.expected_blocks(seq, num_tokens) - len(seq.block_table))
        can = self.alloc.can_append(seq, num_tokens)
        if self.allocator_name == "contiguous":
            assert can and num_needed == 0  # the reservation already covers max_num_tokens
        assert can == (num_needed == 0 or self.expected_can_take(num_needed))
        if can:
            before = list(seq.block_table)
            self.alloc.append(seq, num_tokens)
            assert seq.block_table[: len(before)] == before  # existing blocks never move
            self.tokens[slot] = num_tokens
        else:
            self.check_refusal(self.alloc.append, seq, num_tokens)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        slot = self.live_slot(data)
        seq = self.seqs[slot]
        self.alloc.free(seq)
        del self.tokens[slot]
        assert seq.block_table == []
        assert self.alloc.num_tokens_of(seq) == 0

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
            self.alloc.free(self.seqs[slot])
        self.tokens.clear()
        self.check_all_free()

    def check_all_free(self) -> None:
        usage = self.alloc.usage()
        assert self.alloc.num_free_blocks == self.alloc.num_blocks
        assert self.alloc.free_block_ids() == list(range(self.alloc.num_blocks))
        assert usage.largest_free_run_blocks == self.alloc.num_blocks
        assert usage.num_free_slots == usage.num_slots
        assert usage.num_used_slots == usage.num_reserved_slots == usage.num_sequences == 0
        assert usage.external_fragmentation == 0.0

    @invariant()
    def blocks_are_owned_once_or_free(self) -> None:
        owned = [b for slot in self.tokens for b in self.seqs[slot].block_table]
        assert len(owned) == len(set(owned)), "a block is owned by two sequences"
        free = self.alloc.free_block_ids()
        assert sorted(owned + free) == list(range(self.alloc.num_blocks))
        for slot, seq in self.seqs.items():
            if slot not in self.tokens:
                assert seq.block_table == []

    @invariant()
    def tables_match_policy(self) -> None:
        bs = self.block_size
        for slot, num_tokens in self.tokens.items():
            seq = self.seqs[slot]
            table = seq.block_table
            assert len(table) == self.expected_blocks(seq, num_tokens)
            assert len(table) * bs >= num_tokens  # every position has a slot
            assert self.alloc.num_tokens_of(seq) == num_tokens
            if self.allocator_name == "contiguous":
                assert table == list(range(table[0], table[0] + len(table)))

    @invariant()
    def usage_is_consistent(self) -> None:
        usage = self.alloc.usage()
        bs = self.block_size
        free = self.alloc.free_block_ids()
        tables = [self.seqs[slot].block_table for slot in self.tokens]
        assert usage.num_slots == self.alloc.num_blocks * bs
        assert usage.num_used_slots + usage.num_reserved_slots + usage.num_free_slots == (
            usage.num_slots
        )
        assert usage.num_used_slots == sum(self.tokens.values())
        assert usage.num_reserved_slots == sum(len(t) for t in tables) * bs - sum(
            self.tokens.values()
        )
        assert usage.num_fragmented_slots == sum(
            ceil_div(t, bs) * bs - t for t in self.tokens.values()
        )
        assert usage.num_free_blocks == self.alloc.num_free_blocks == len(free)
        assert usage.num_free_slots == len(free) * bs
        assert usage.num_sequences == len(self.tokens)
        assert usage.num_shared_slots == 0
        assert usage.largest_free_run_blocks == naive_longest_run(free)
        assert 0.0 <= usage.external_fragmentation < 1.0
        assert 0.0 <= usage.utilization <= 1.0

    @invariant()
    def slots_are_unique(self) -> None:
        slots = [
            slot_mapping(self.seqs[s].block_table, self.block_size, 0, n)
            for s, n in self.tokens.items()
        ]
        flat = np.concatenate(slots) if slots else np.empty(0, dtype=np.int64)
        assert len(np.unique(flat)) == len(flat)
        assert flat.size == 0 or 0 <= flat.min() <= flat.max() < self.alloc.num_blocks * (
            self.block_size
        )

    def teardown(self) -> None:
        if hasattr(self, "alloc"):
            self.free_everything()


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
            max_examples=60,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
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
    assert {"paged", "contiguous"} <= set(allocators.available())
    with pytest.raises(KeyError, match="paged") as excinfo:
        allocators.get("nope")
    assert "contiguous" in str(excinfo.value)
    alloc = allocators.create("paged", num_blocks=2, block_size=2)
    assert allocators.create(alloc) is alloc
    assert type(alloc).name == "paged"
    assert isinstance(alloc, Allocator)
    assert isinstance(Seq(request_id=0, max_num_tokens=1), KVSequence)


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
