"""The original C++ seed's policy: reserve each sequence's maximum length as one run up front."""

from __future__ import annotations

import bisect

from cortexlab.kv import register
from cortexlab.kv.base import BlockAllocator, KVSequence


@register("contiguous")
class ContiguousAllocator(BlockAllocator):
    """First-fit over runs of free block ids; each sequence owns one consecutive run.

    Reserving the maximum up front means append never needs blocks, but free space
    splinters into runs too short for the next request (external fragmentation).
    """

    def __init__(self, *, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks=num_blocks, block_size=block_size)
        # Free runs as (first block id, length), sorted by id and never adjacent:
        # sorted order makes first-fit lowest-address and coalescing a neighbour check.
        self._runs: list[tuple[int, int]] = [(0, self.num_blocks)]

    @property
    def num_free_blocks(self) -> int:
        """Blocks in free runs."""
        return sum(length for _, length in self._runs)

    def free_block_ids(self) -> list[int]:
        """Ids of the free blocks, sorted."""
        return [i for first, length in self._runs for i in range(first, first + length)]

    def largest_free_run(self) -> int:
        """Length in blocks of the longest free run: the largest reservation possible now."""
        return max((length for _, length in self._runs), default=0)

    def _blocks_to_reserve(self, seq: KVSequence, num_tokens: int) -> int:
        # Reserve the most the sequence can ever hold, so append never has to move it.
        return self.num_blocks_needed(seq.max_num_tokens)

    def usable_free_slots(self, seq: KVSequence) -> int:
        """Slots of the largest free run: a reservation cannot span two runs."""
        return self.largest_free_run() * self.block_size

    def _shortage_detail(self) -> str:
        return f" (largest run of consecutive free blocks: {self.largest_free_run()})"

    def _can_take(self, num_blocks: int) -> bool:
        return num_blocks <= self.largest_free_run()

    def _take(self, num_blocks: int) -> list[int]:
        # Append only ever asks for 0 blocks (the reservation covers max_num_tokens),
        # so every call here is a first claim and one run keeps the table consecutive.
        for index, (first, length) in enumerate(self._runs):
            if length >= num_blocks:
                if length == num_blocks:
                    del self._runs[index]
                else:
                    self._runs[index] = (first + num_blocks, length - num_blocks)
                return list(range(first, first + num_blocks))
        raise AssertionError("_take called without _can_take")  # unreachable via the base

    def _release(self, block_ids: list[int]) -> None:
        first, length = block_ids[0], len(block_ids)
        index = bisect.bisect_left(self._runs, (first, 0))
        # Coalesce with the next run, then the previous one, if they touch.
        if index < len(self._runs) and self._runs[index][0] == first + length:
            length += self._runs.pop(index)[1]
        if index > 0 and sum(self._runs[index - 1]) == first:
            prev_first, prev_length = self._runs[index - 1]
            self._runs[index - 1] = (prev_first, prev_length + length)
        else:
            self._runs.insert(index, (first, length))
