"""KV-cache block allocator contract, usage accounting and a base class with shared logic.

One shared arena holds ``num_blocks x block_size`` token slots. Token position ``p`` of a
sequence lives in physical slot ``block_table[p // block_size] * block_size + p % block_size``.
Allocators only do the bookkeeping; the tensor arena reads the block tables they write.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class KVSequence(Protocol):
    """What an allocator needs from a request: its id, its size limit and its block table."""

    request_id: Hashable
    max_num_tokens: int  # prompt + max output tokens: the most it can ever hold
    block_table: list[int]  # empty when it holds nothing


class OutOfBlocks(RuntimeError):
    """Raised by allocate/append when the matching can_allocate/can_append is False."""


@dataclass(slots=True, frozen=True)
class KVUsage:
    """A snapshot of how the arena's slots are used (all counts are token slots unless named)."""

    num_slots: int
    num_used_slots: int  # slots holding real tokens
    num_reserved_slots: int  # allocated to a sequence but not holding a token yet
    num_fragmented_slots: int  # unused tail of each sequence's last occupied block
    num_free_slots: int
    num_shared_slots: int  # 0 until prefix sharing exists
    num_free_blocks: int
    num_sequences: int
    largest_free_run_blocks: int  # longest run of consecutive free block ids

    def __post_init__(self) -> None:
        # A broken allocator should fail where it miscounts, not in a plot later.
        total = self.num_used_slots + self.num_reserved_slots + self.num_free_slots
        if total != self.num_slots:
            raise ValueError(
                f"num_used_slots + num_reserved_slots + num_free_slots must equal num_slots "
                f"({self.num_slots}), got {total}"
            )
        if not 0 <= self.num_fragmented_slots <= self.num_reserved_slots:
            raise ValueError(
                f"num_fragmented_slots must be in [0, num_reserved_slots="
                f"{self.num_reserved_slots}], got {self.num_fragmented_slots}"
            )

    @property
    def utilization(self) -> float:
        """Fraction of all slots holding real tokens."""
        return self.num_used_slots / self.num_slots if self.num_slots else 0.0

    @property
    def external_fragmentation(self) -> float:
        """1 - largest free run / free blocks: 0 when free space is one run (or none is free)."""
        if self.num_free_blocks == 0:
            return 0.0
        return 1.0 - self.largest_free_run_blocks / self.num_free_blocks

    def _repr_html_(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in fields(self)]
        rows += [
            ("utilization", f"{self.utilization:.3f}"),
            ("external_fragmentation", f"{self.external_fragmentation:.3f}"),
        ]
        body = "".join(f"<tr><td>{name}</td><td>{value}</td></tr>" for name, value in rows)
        return f"<table><tr><th>KVUsage</th><th></th></tr>{body}</table>"


@runtime_checkable
class Allocator(Protocol):
    """Contract every KV block allocator meets; check/act pairs never half-apply."""

    num_blocks: int
    block_size: int

    @property
    def num_free_blocks(self) -> int:
        """Blocks not owned by any sequence."""
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

    def allocate(self, seq: KVSequence, num_tokens: int) -> None:
        """First claim for `seq` (empty block table): capacity for positions [0, num_tokens)."""
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


def _check_count(name: str, value: object) -> int:
    # bool is an int subclass; True as a block count is always a bug.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def longest_run(block_ids: Iterable[int]) -> int:
    """Length of the longest run of consecutive ids in `block_ids`."""
    ids = np.unique(np.fromiter(block_ids, dtype=np.int64))
    if ids.size == 0:
        return 0
    # A new run starts wherever the gap to the previous id is not 1.
    starts = np.flatnonzero(np.diff(ids, prepend=ids[0] - 2) != 1)
    return int(np.diff(np.append(starts, ids.size)).max())


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
    """Shared validation, accounting and check/act logic; subclasses pick and return blocks."""

    name: str = "block"  # replaced by the registry name on registered subclasses

    def __init__(self, *, num_blocks: int, block_size: int) -> None:
        self.num_blocks = _check_count("num_blocks", num_blocks)
        self.block_size = _check_count("block_size", block_size)
        # Our own records, keyed by request id: the engine may rebuild or clear
        # seq.block_table, but accounting and free() must still see what was handed out.
        self._num_tokens: dict[Hashable, int] = {}
        self._tables: dict[Hashable, list[int]] = {}

    # --- policy hooks -------------------------------------------------------------------

    @property
    @abstractmethod
    def num_free_blocks(self) -> int:
        """Blocks not owned by any sequence."""

    @abstractmethod
    def free_block_ids(self) -> list[int]:
        """Ids of the free blocks, sorted (for checks and arena pictures)."""

    @abstractmethod
    def _can_take(self, num_blocks: int) -> bool:
        """Whether `_take(num_blocks)` would succeed."""

    @abstractmethod
    def _take(self, num_blocks: int) -> list[int]:
        """Remove `num_blocks` blocks from the free pool and return their ids."""

    @abstractmethod
    def _release(self, block_ids: list[int]) -> None:
        """Return blocks previously handed out by `_take` to the free pool."""

    def _blocks_to_reserve(self, seq: KVSequence, num_tokens: int) -> int:
        """Blocks a first claim takes; policies that reserve up front override this."""
        return self.num_blocks_needed(num_tokens)

    def _shortage_detail(self) -> str:
        """Extra words for OutOfBlocks messages (e.g. the largest free run)."""
        return ""

    # --- shared logic -------------------------------------------------------------------

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.block_size)

    def can_ever_fit(self, seq: KVSequence) -> bool:
        """Whether `seq.max_num_tokens` would fit in an empty arena under this policy."""
        # An empty arena is one free run of num_blocks, so both policies agree here.
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

    def _check_allocate(self, seq: KVSequence, num_tokens: int) -> int:
        held = self._tables.get(seq.request_id)
        if held or seq.block_table:
            raise ValueError(
                f"seq (request {seq.request_id!r}) already holds "
                f"{len(held or seq.block_table)} block(s); allocate is the first claim, "
                f"use append to grow it or free it first"
            )
        self._check_num_tokens(seq, num_tokens, low=1)
        return self._blocks_to_reserve(seq, num_tokens)

    def _check_append(self, seq: KVSequence, num_tokens: int) -> int:
        held = self._tables.get(seq.request_id)
        if not held:
            raise ValueError(
                f"seq (request {seq.request_id!r}) holds no blocks; allocate it before append"
            )
        # num_tokens is the new total; appends never shrink a sequence.
        self._check_num_tokens(seq, num_tokens, low=self._num_tokens[seq.request_id])
        return max(0, self.num_blocks_needed(num_tokens) - len(held))

    def _out_of_blocks(self, seq: KVSequence, num_needed: int) -> OutOfBlocks:
        return OutOfBlocks(
            f"request {seq.request_id!r} needs {num_needed} more block(s) of {self.block_size} "
            f"slots but {self.num_free_blocks} are free{self._shortage_detail()}"
        )

    def can_allocate(self, seq: KVSequence, num_tokens: int) -> bool:
        """Whether `allocate(seq, num_tokens)` would succeed now."""
        return self._can_take(self._check_allocate(seq, num_tokens))

    def allocate(self, seq: KVSequence, num_tokens: int) -> None:
        """First claim for `seq` (empty block table): capacity for positions [0, num_tokens)."""
        num_needed = self._check_allocate(seq, num_tokens)
        if not self._can_take(num_needed):
            raise self._out_of_blocks(seq, num_needed)
        block_ids = self._take(num_needed)
        self._tables[seq.request_id] = block_ids
        self._num_tokens[seq.request_id] = num_tokens
        seq.block_table = list(block_ids)

    def can_append(self, seq: KVSequence, num_tokens: int) -> bool:
        """Whether `append(seq, num_tokens)` would succeed now."""
        num_needed = self._check_append(seq, num_tokens)
        return num_needed == 0 or self._can_take(num_needed)

    def append(self, seq: KVSequence, num_tokens: int) -> None:
        """Grow `seq` to cover positions [0, num_tokens) in total (a new total, not a delta)."""
        num_needed = self._check_append(seq, num_tokens)
        if num_needed:
            if not self._can_take(num_needed):
                raise self._out_of_blocks(seq, num_needed)
            block_ids = self._take(num_needed)
            self._tables[seq.request_id].extend(block_ids)
            # Extend in place so anyone holding a reference to the table sees the new blocks.
            seq.block_table.extend(block_ids)
        self._num_tokens[seq.request_id] = num_tokens

    def free(self, seq: KVSequence) -> None:
        """Release everything `seq` holds and clear its block table; no-op if it holds nothing."""
        block_ids = self._tables.pop(seq.request_id, None)
        self._num_tokens.pop(seq.request_id, None)
        if block_ids:
            self._release(block_ids)
            seq.block_table = []

    def usage(self) -> KVUsage:
        """A snapshot of slot usage."""
        bs = self.block_size
        num_used = sum(self._num_tokens.values())
        num_allocated = bs * sum(len(ids) for ids in self._tables.values())
        # Tail of the last block that holds at least one token, per sequence.
        num_fragmented = sum(-t % bs for t in self._num_tokens.values())
        return KVUsage(
            num_slots=self.num_blocks * bs,
            num_used_slots=num_used,
            num_reserved_slots=num_allocated - num_used,
            num_fragmented_slots=num_fragmented,
            num_free_slots=self.num_free_blocks * bs,
            num_shared_slots=0,
            num_free_blocks=self.num_free_blocks,
            num_sequences=len(self._tables),
            largest_free_run_blocks=longest_run(self.free_block_ids()),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"num_free_blocks={self.num_free_blocks}, num_sequences={len(self._tables)})"
        )
