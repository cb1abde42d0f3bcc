"""vLLM-style paged allocation: fixed-size blocks taken one by one from a free list."""

from __future__ import annotations

from collections import deque

from cortexlab.kv import register
from cortexlab.kv.base import BlockAllocator


@register("paged")
class PagedAllocator(BlockAllocator):
    """Takes exactly ceil(num_tokens / block_size) blocks, anywhere in the arena, as needed."""

    def __init__(self, *, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks=num_blocks, block_size=block_size)
        # FIFO: freed blocks go to the back, so recently freed ones are reused last
        # (keeps their contents around longer for a future prefix cache).
        self._free: deque[int] = deque(range(self.num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks on the free list."""
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        """Ids of the free blocks, sorted."""
        return sorted(self._free)

    def _can_take(self, num_blocks: int) -> bool:
        # Any free block will do, so the count is the whole story.
        return num_blocks <= len(self._free)

    def _take(self, num_blocks: int) -> list[int]:
        return [self._free.popleft() for _ in range(num_blocks)]

    def _release(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)
