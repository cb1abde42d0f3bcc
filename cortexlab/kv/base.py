"""KV-cache block allocator contract, usage accounting and a base class with shared logic.

One shared arena holds ``num_blocks x block_size`` token slots. Token position ``p`` of a
sequence lives in physical slot ``block_table[p // block_size] * block_size + p % block_size``.
Allocators only do the bookkeeping; the tensor arena reads the block tables they write.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class KVSequence(Protocol):
    """What an allocator needs from a request: its id, its size limit and its block table.

    Allocators that cache by content (``prefix``) also read ``prompt_token_ids``,
    ``output_token_ids`` and ``num_computed_tokens`` (a `Request` has them all); a sequence
    without them is simply never cached.
    """

    request_id: Hashable
    max_num_tokens: int  # prompt + max output tokens: the most it can ever hold
    block_table: list[int]  # empty when it holds nothing


class OutOfBlocks(RuntimeError):
    """Raised by allocate/append/fork when the matching can_* check is False."""


# Slot counts of KVUsage that must be >= 0 and that partition num_slots.
_PARTITION = ("num_used_slots", "num_reserved_slots", "num_cached_slots", "num_free_slots")


@dataclass(slots=True, frozen=True)
class KVUsage:
    """A snapshot of how the arena's slots are used (all counts are token slots unless named).

    Every slot is in exactly one of used, reserved, cached, free (checked here). Block-level
    "free" (``num_free_blocks``, ``largest_free_run_blocks``) means held by no sequence, so it
    includes cached blocks: they are evicted on demand.
    """

    num_slots: int
    num_used_slots: int  # holding real tokens; a shared block's tokens counted once
    num_reserved_slots: int  # held by a sequence but not holding a token yet
    # Part of reserved: the unused tail of each sequence's last occupied block, plus held
    # slots past the most the sequence can ever hold (buddy's power-of-two rounding).
    num_internal_fragmented_slots: int
    num_free_slots: int  # in blocks that no sequence holds and no cache keeps
    num_shared_slots: int  # in blocks held by more than one sequence, counted once
    num_free_blocks: int  # blocks no sequence holds (cached ones included)
    num_sequences: int
    largest_free_run_blocks: int  # longest run of consecutive block ids no sequence holds
    num_cached_slots: int = 0  # in cached blocks no sequence holds (prefix cache, evictable)
    num_cached_blocks: int = 0
    max_sharing: int = 0  # most sequences holding one block: 0 if none held, 1 if unshared
    mean_sharing: float = 0.0  # block-table entries per distinct held block (1.0: unshared)
    num_hit_tokens: int = 0  # prompt tokens served from the prefix cache at allocation
    num_lookup_tokens: int = 0  # prompt tokens looked up in the prefix cache at allocation
    num_evicted_blocks: int = 0  # cached blocks evicted so far

    def __post_init__(self) -> None:
        # A broken allocator should fail where it miscounts, not in a plot later.
        for name in (*_PARTITION, "num_shared_slots", "num_hit_tokens", "num_evicted_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        total = sum(getattr(self, name) for name in _PARTITION)
        if total != self.num_slots:
            raise ValueError(
                f"num_used_slots + num_reserved_slots + num_cached_slots + num_free_slots must "
                f"equal num_slots ({self.num_slots}), got {total}"
            )
        if not 0 <= self.num_internal_fragmented_slots <= self.num_reserved_slots:
            raise ValueError(
                f"num_internal_fragmented_slots must be in [0, num_reserved_slots="
                f"{self.num_reserved_slots}], got {self.num_internal_fragmented_slots}"
            )
        if self.num_shared_slots > self.num_used_slots + self.num_reserved_slots:
            raise ValueError(
                f"num_shared_slots must be <= held slots "
                f"({self.num_used_slots + self.num_reserved_slots}), got {self.num_shared_slots}"
            )
        if self.num_hit_tokens > self.num_lookup_tokens:
            raise ValueError(
                f"num_hit_tokens must be <= num_lookup_tokens={self.num_lookup_tokens}, "
                f"got {self.num_hit_tokens}"
            )

    @property
    def num_fragmented_slots(self) -> int:
        """The name this count had before buddy and prefix (engine's `kv_fragmented_slots`)."""
        return self.num_internal_fragmented_slots

    @property
    def utilization(self) -> float:
        """Fraction of all slots holding real tokens."""
        return self.num_used_slots / self.num_slots if self.num_slots else 0.0

    @property
    def external_fragmentation(self) -> float:
        """1 - largest free run / free blocks: 0 when free space is one run (or none is free).

        Policy-blind; `BlockAllocator.external_fragmentation(seq)` asks what a given request
        could actually be given under the allocator's policy.
        """
        if self.num_free_blocks == 0:
            return 0.0
        return 1.0 - self.largest_free_run_blocks / self.num_free_blocks

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hit tokens per looked-up prompt token (0.0 before any lookup)."""
        return self.num_hit_tokens / self.num_lookup_tokens if self.num_lookup_tokens else 0.0

    def _repr_html_(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in fields(self)]
        rows += [
            ("utilization", f"{self.utilization:.3f}"),
            ("external_fragmentation", f"{self.external_fragmentation:.3f}"),
            ("hit_rate", f"{self.hit_rate:.3f}"),
        ]
        body = "".join(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in rows)
        return f"<table><tr><th>KVUsage</th><th></th></tr>{body}</table>"


@runtime_checkable
class Allocator(Protocol):
    """Contract every KV block allocator meets; check/act pairs never half-apply.

    The engine calls, through the scheduler: ``can_allocate``/``allocate`` once per
    admission (the first claim), ``can_append``/``append`` to grow, ``free`` on finish,
    failure and preemption. `SharingAllocator` lists the optional rest.
    """

    num_blocks: int
    block_size: int

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (evictable cached blocks included)."""
        ...

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        ...

    def can_ever_fit(self, seq: KVSequence) -> bool:
        """Whether `seq.max_num_tokens` would fit in an empty arena under this policy."""
        ...

    def can_allocate(self, seq: KVSequence, num_tokens: int) -> bool:
        """Whether `allocate(seq, num_tokens)` would succeed now."""
        ...

    def allocate(self, seq: KVSequence, num_tokens: int) -> int | None:
        """First claim for `seq` (empty block table): capacity for positions [0, num_tokens).

        May return how many leading tokens it served from a prefix cache (None means 0).
        """
        ...

    def can_append(self, seq: KVSequence, num_tokens: int) -> bool:
        """Whether `append(seq, num_tokens)` would succeed now."""
        ...

    def append(self, seq: KVSequence, num_tokens: int) -> None:
        """Grow `seq` to cover positions [0, num_tokens) in total (a new total, not a delta)."""
        ...

    def free(self, seq: KVSequence) -> None:
        """Release everything `seq` holds and clear its block table; no-op if it holds nothing."""
        ...

    def usage(self) -> KVUsage:
        """A snapshot of slot usage."""
        ...


@runtime_checkable
class SharingAllocator(Allocator, Protocol):
    """The optional rest of the contract: prefix caching, forks, copy-on-write, fragmentation.

    `BlockAllocator` implements all of it (neutrally where a policy does not share), so any
    subclass has it; a duck-typed allocator without it is treated as never sharing.

    Who calls what, and when (a step's order):
      1. admission: ``hit = num_cached_tokens(req)``; choose ``n`` new tokens;
         ``can_allocate(req, hit + n)`` then ``allocate(req, hit + n)`` with nothing in
         between (it reuses exactly the cached blocks `num_cached_tokens` just named and
         returns their token count); then set ``req.num_computed_tokens = hit``.
      2. growth: ``can_append``/``append`` as before; they also copy-on-write a shared block
         the new positions fall in.
      3. before the forward: ``arena.copy_blocks(take_copies())``.
      4. after the forward has computed tokens (``num_computed_tokens`` advanced):
         ``seal(req)`` for every scheduled request; it caches the newly full blocks.
      5. forks (parallel samples) between steps: ``can_fork``/``fork(parent, child)``.
    """

    can_share_blocks: bool  # True: one block may sit in several block tables (read-only)

    def num_cached_tokens(self, seq: KVSequence) -> int:
        """Leading prompt tokens of `seq` in cached full blocks now (pure lookup)."""
        ...

    def seal(self, seq: KVSequence) -> None:
        """Record the full blocks of `seq` below `seq.num_computed_tokens` as computed."""
        ...

    def can_fork(self, parent: KVSequence, child: KVSequence) -> bool:
        """Whether `fork(parent, child)` would succeed now."""
        ...

    def fork(self, parent: KVSequence, child: KVSequence) -> None:
        """Give `child` (holding nothing) the contents of `parent`'s blocks."""
        ...

    def prepare_write(self, seq: KVSequence, start: int, end: int) -> None:
        """Copy-on-write every shared block that positions [start, end) of `seq` fall in."""
        ...

    def take_copies(self) -> list[tuple[int, int]]:
        """Block copies (src, dst) to apply to the arena, in order, before the next forward."""
        ...

    def usable_free_slots(self, seq: KVSequence) -> int:
        """Free (and cached) slots this policy could give `seq`'s first claim now."""
        ...


def _check_count(name: str, value: object) -> int:
    # bool is an int subclass; True as a block count is always a bug.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def longest_run(block_ids: Iterable[int]) -> int:
    """Length of the longest run of consecutive ids in `block_ids`."""
    ids = np.sort(np.fromiter(block_ids, dtype=np.int64))
    if ids.size == 0:
        return 0
    if ids.size > 1 and not np.all(ids[1:] != ids[:-1]):
        ids = np.unique(ids)  # rare: np.unique costs ~3x a sort (the engine calls this every step)
    # A new run starts wherever the gap to the previous id is not 1.
    starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 2) != 1)
    return int(np.diff(np.append(starts, ids.size)).max())


def longest_unheld_run(num_blocks: int, tables: Iterable[Sequence[int]]) -> int:
    """Length of the longest run of consecutive block ids in [0, num_blocks) that no table
    holds: `longest_run` of the free ids, from the held ones. An allocator whose free blocks
    are exactly the unheld ones uses it because tables are usually far smaller than a large
    arena's free list (an H100-sized simulated arena has tens of thousands of free blocks)."""
    held = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int64)
    free = np.ones(num_blocks + 2, dtype=np.int8)  # a held sentinel at each end
    free[0] = free[-1] = 0
    free[held + 1] = 0
    edges = np.flatnonzero(np.diff(free))  # alternating starts and ends of free runs
    return int((edges[1::2] - edges[0::2]).max()) if edges.size else 0


def slot_mapping(block_table: Sequence[int], block_size: int, start: int, end: int) -> np.ndarray:
    """Physical slot (int64) of each position in [start, end) of a sequence with `block_table`."""
    _check_count("block_size", block_size)
    capacity = len(block_table) * block_size
    if not 0 <= start <= end <= capacity:
        raise ValueError(
            f"start and end must satisfy 0 <= start <= end <= len(block_table) * block_size "
            f"= {capacity}, got start={start}, end={end}"
        )
    positions = np.arange(start, end, dtype=np.int64)
    table = np.asarray(block_table, dtype=np.int64)
    return table[positions // block_size] * block_size + positions % block_size


class BlockAllocator(ABC):
    """Shared validation, accounting and check/act logic; subclasses pick and return blocks.

    A subclass supplies a free pool (`_can_take`/`_take`/`_release`), or overrides
    `_can_grow`/`_grow` when the blocks it hands out depend on the sequence (buddy). The
    sharing half of the contract is neutral here: nothing is cached, a fork copies.
    """

    name: str = "block"  # replaced by the registry name on registered subclasses
    can_share_blocks: bool = False

    def __init__(self, *, num_blocks: int, block_size: int) -> None:
        self.num_blocks = _check_count("num_blocks", num_blocks)
        self.block_size = _check_count("block_size", block_size)
        # Our own records, keyed by request id: the engine may rebuild or clear
        # seq.block_table, but accounting and free() must still see what was handed out.
        self._num_tokens: dict[Hashable, int] = {}
        self._tables: dict[Hashable, list[int]] = {}
        self._copies: list[tuple[int, int]] = []

    # --- policy hooks -------------------------------------------------------------------

    @property
    @abstractmethod
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds."""

    @abstractmethod
    def free_block_ids(self) -> list[int]:
        """Ids of the blocks no sequence holds, sorted (for checks and arena pictures)."""

    @abstractmethod
    def _can_take(self, num_blocks: int) -> bool:
        """Whether `_take(num_blocks)` would succeed."""

    @abstractmethod
    def _take(self, num_blocks: int) -> list[int]:
        """Remove `num_blocks` blocks from the free pool and return their ids."""

    @abstractmethod
    def _release(self, block_ids: list[int]) -> None:
        """Return blocks previously handed out by `_take` to the free pool."""

    def _can_grow(self, seq: KVSequence, held: list[int], num_needed: int) -> bool:
        """Whether `_grow` can add at least `num_needed` blocks to `held` (seq's table)."""
        return self._can_take(num_needed)

    def _grow(self, seq: KVSequence, held: list[int], num_needed: int) -> list[int]:
        """New blocks (at least `num_needed`) to put after `held`; `held` is [] on a first claim."""
        return self._take(num_needed)

    def _blocks_to_reserve(self, seq: KVSequence, num_tokens: int) -> int:
        """Blocks a first claim takes; policies that reserve up front override this."""
        return -(-num_tokens // self.block_size)

    def _shortage_detail(self) -> str:
        """Extra words for OutOfBlocks messages (e.g. the largest free run)."""
        return ""

    def _num_internal_fragmented_slots(self) -> int:
        """Unused tail of each sequence's last occupied block."""
        bs = self.block_size
        return sum(-t % bs for t in self._num_tokens.values())

    # --- shared logic -------------------------------------------------------------------

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, seq: KVSequence) -> bool:
        """Whether `seq.max_num_tokens` would fit in an empty arena under this policy."""
        # An empty arena is one free run of num_blocks; every policy here can fill it.
        max_num_tokens = seq.max_num_tokens
        return max_num_tokens >= 1 and self.num_blocks_needed(max_num_tokens) <= self.num_blocks

    def num_tokens_of(self, seq: KVSequence) -> int:
        """Tokens `seq` currently has capacity accounted for (0 if it holds nothing)."""
        return self._num_tokens.get(seq.request_id, 0)

    def _check_num_tokens(self, seq: KVSequence, num_tokens: int, low: int) -> None:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise ValueError(f"num_tokens must be an int, got {num_tokens!r}")
        if not low <= num_tokens <= seq.max_num_tokens:
            raise ValueError(
                f"num_tokens must be in [{low}, seq.max_num_tokens={seq.max_num_tokens}] "
                f"for request {seq.request_id!r}, got {num_tokens}"
            )

    def _check_empty(self, seq: KVSequence, what: str = "seq") -> None:
        held = self._tables.get(seq.request_id)
        if held or seq.block_table:
            raise ValueError(
                f"{what} (request {seq.request_id!r}) already holds "
                f"{len(held or seq.block_table)} block(s); allocate is the first claim, "
                f"use append to grow it or free it first"
            )

    def _check_allocate(self, seq: KVSequence, num_tokens: int) -> int:
        self._check_empty(seq)
        self._check_num_tokens(seq, num_tokens, low=1)
        return self._blocks_to_reserve(seq, num_tokens)

    def _held(self, seq: KVSequence, what: str = "seq", act: str = "append") -> list[int]:
        held = self._tables.get(seq.request_id)
        if not held:
            raise ValueError(
                f"{what} (request {seq.request_id!r}) holds no blocks; allocate it before {act}"
            )
        return held

    def _check_append(self, seq: KVSequence, num_tokens: int) -> int:
        held = self._held(seq)
        # num_tokens is the new total; appends never shrink a sequence.
        self._check_num_tokens(seq, num_tokens, low=self._num_tokens[seq.request_id])
        return max(0, -(-num_tokens // self.block_size) - len(held))

    def _out_of_blocks(self, seq: KVSequence, num_needed: int) -> OutOfBlocks:
        return OutOfBlocks(
            f"request {seq.request_id!r} needs {num_needed} more block(s) of {self.block_size} "
            f"slots but {self.num_free_blocks} are free{self._shortage_detail()}"
        )

    def can_allocate(self, seq: KVSequence, num_tokens: int) -> bool:
        """Whether `allocate(seq, num_tokens)` would succeed now."""
        return self._can_grow(seq, [], self._check_allocate(seq, num_tokens))

    def allocate(self, seq: KVSequence, num_tokens: int) -> int:
        """First claim for `seq` (empty block table): capacity for positions [0, num_tokens).

        Returns how many leading tokens came from the prefix cache (always 0 here).
        """
        num_needed = self._check_allocate(seq, num_tokens)
        if not self._can_grow(seq, [], num_needed):
            raise self._out_of_blocks(seq, num_needed)
        block_ids = self._grow(seq, [], num_needed)
        self._tables[seq.request_id] = block_ids
        self._num_tokens[seq.request_id] = num_tokens
        seq.block_table = list(block_ids)
        return 0

    def can_append(self, seq: KVSequence, num_tokens: int) -> bool:
        """Whether `append(seq, num_tokens)` would succeed now."""
        num_needed = self._check_append(seq, num_tokens)
        held = self._tables[seq.request_id]
        return num_needed == 0 or self._can_grow(seq, held, num_needed)

    def _table_for_append(self, seq: KVSequence, num_tokens: int) -> list[int]:
        """`seq`'s block table, once `num_tokens` is checked to be a valid new total."""
        rid = seq.request_id
        held = self._tables.get(rid)
        # Fast path (a decode step calls this once per sequence): the full checks only run
        # when something looks wrong, so they still name the bad argument.
        if (
            held is None
            or type(num_tokens) is not int
            or not self._num_tokens[rid] <= num_tokens <= seq.max_num_tokens
        ):
            self._check_append(seq, num_tokens)
        return held

    def append(self, seq: KVSequence, num_tokens: int) -> None:
        """Grow `seq` to cover positions [0, num_tokens) in total (a new total, not a delta)."""
        rid = seq.request_id
        held = self._table_for_append(seq, num_tokens)
        num_needed = -(-num_tokens // self.block_size) - len(held)
        if num_needed > 0:
            if not self._can_grow(seq, held, num_needed):
                raise self._out_of_blocks(seq, num_needed)
            block_ids = self._grow(seq, held, num_needed)
            held += block_ids
            # Extend in place so anyone holding a reference to the table sees the new blocks.
            seq.block_table += block_ids
        self._num_tokens[rid] = num_tokens

    def free(self, seq: KVSequence) -> None:
        """Release everything `seq` holds and clear its block table; no-op if it holds nothing."""
        block_ids = self._tables.pop(seq.request_id, None)
        self._num_tokens.pop(seq.request_id, None)
        if block_ids:
            self._release(block_ids)
            seq.block_table = []
            if self._copies:
                self._drop_dead_copies()

    def _drop_dead_copies(self) -> None:
        """Forget pending copies into blocks nobody holds any more (their reader was freed).

        Such a copy would land in whichever sequence takes the block next. A copy is kept
        while a later kept copy reads its target (a chain through a block since freed).
        """
        held = {b for table in self._tables.values() for b in table}
        kept: list[tuple[int, int]] = []
        for src, dst in reversed(self._copies):
            if dst in held:
                kept.append((src, dst))
                held.add(src)  # what it reads must arrive first
        self._copies = kept[::-1]

    # --- the sharing half, neutral (concrete on purpose: B027) -----------------------------

    def num_cached_tokens(self, seq: KVSequence) -> int:
        """Leading prompt tokens of `seq` in cached full blocks now: none without a cache."""
        return 0

    def seal(self, seq: KVSequence) -> None:  # noqa: B027
        """Nothing to record without a cache."""

    def prepare_write(self, seq: KVSequence, start: int, end: int) -> None:  # noqa: B027
        """Nothing to copy: no block is shared."""

    def take_copies(self) -> list[tuple[int, int]]:
        """Block copies (src, dst) recorded since the last call, in the order to apply them."""
        copies, self._copies = self._copies, []
        return copies

    def _fork_tokens(self, parent: KVSequence, child: KVSequence) -> int:
        """The parent's token count, once parent and child are checked fit to fork."""
        self._held(parent, "parent", "fork")
        self._check_empty(child, "child")
        num_tokens = self._num_tokens[parent.request_id]
        if child.max_num_tokens < num_tokens:
            raise ValueError(
                f"child.max_num_tokens must be >= the parent's {num_tokens} tokens (request "
                f"{parent.request_id!r}), got {child.max_num_tokens}"
            )
        return num_tokens

    def can_fork(self, parent: KVSequence, child: KVSequence) -> bool:
        """Whether `fork(parent, child)` would succeed now."""
        return self.can_allocate(child, self._fork_tokens(parent, child))

    def fork(self, parent: KVSequence, child: KVSequence) -> None:
        """Give `child` its own blocks holding a copy of `parent`'s tokens.

        Without sharing a fork is a first claim of the parent's token count plus one block
        copy per occupied block, which the engine applies from `take_copies()`.
        """
        num_tokens = self._fork_tokens(parent, child)
        self.allocate(child, num_tokens)
        source = self._tables[parent.request_id]
        target = self._tables[child.request_id]
        self._copies += zip(source[: -(-num_tokens // self.block_size)], target, strict=False)

    def usable_free_slots(self, seq: KVSequence) -> int:
        """Free slots `seq`'s first claim could be given: any free block will do here."""
        return self.num_free_blocks * self.block_size

    def num_external_fragmented_slots(self, seq: KVSequence) -> int:
        """Free (and cached) slots that `seq`'s first claim could not be given now."""
        return self.num_free_blocks * self.block_size - self.usable_free_slots(seq)

    def external_fragmentation(self, seq: KVSequence) -> float:
        """Share of the free (and cached) slots that `seq`'s first claim could not use."""
        available = self.num_free_blocks * self.block_size
        return 1.0 - self.usable_free_slots(seq) / available if available else 0.0

    # --- accounting ---------------------------------------------------------------------

    def _largest_free_run_blocks(self) -> int:
        return longest_run(self.free_block_ids())

    def usage(self) -> KVUsage:
        """A snapshot of slot usage."""
        bs = self.block_size
        num_used = sum(self._num_tokens.values())
        num_held_blocks = sum(len(ids) for ids in self._tables.values())
        return KVUsage(
            num_slots=self.num_blocks * bs,
            num_used_slots=num_used,
            num_reserved_slots=num_held_blocks * bs - num_used,
            num_internal_fragmented_slots=self._num_internal_fragmented_slots(),
            num_free_slots=self.num_free_blocks * bs,
            num_shared_slots=0,
            num_free_blocks=self.num_free_blocks,
            num_sequences=len(self._tables),
            largest_free_run_blocks=self._largest_free_run_blocks(),
            max_sharing=1 if num_held_blocks else 0,
            mean_sharing=1.0 if num_held_blocks else 0.0,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"num_free_blocks={self.num_free_blocks}, num_sequences={len(self._tables)})"
        )
