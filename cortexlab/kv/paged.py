"""vLLM-style paged allocation: fixed-size blocks taken one by one from a free list."""

from __future__ import annotations

import heapq

from cortexlab.kv import register
from cortexlab.kv.base import BlockAllocator, longest_unheld_run


@register("paged")
class PagedAllocator(BlockAllocator):
    """Takes exactly ceil(num_tokens / block_size) blocks, anywhere in the arena, as needed."""

    def __init__(self, *, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks=num_blocks, block_size=block_size)
        # A min-heap: the lowest free id goes first, so the arena (which grows with the
        # highest id in use) stays as small as the peak number of blocks held.
        self._free: list[int] = list(range(self.num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free list."""
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        """Ids of the free blocks, sorted."""
        return sorted(self._free)

    def _largest_free_run_blocks(self) -> int:
        # A block is free or in a table, so the run is found from the (fewer) held ids.
        return longest_unheld_run(self.num_blocks, self._tables.values())

    def _can_take(self, num_blocks: int) -> bool:
        # Any free block will do, so the count is the whole story.
        return num_blocks <= len(self._free)

    def _take(self, num_blocks: int) -> list[int]:
        return [heapq.heappop(self._free) for _ in range(num_blocks)]

    def _release(self, block_ids: list[int]) -> None:
        for b in block_ids:
            heapq.heappush(self._free, b)
