"""Buddy allocation: power-of-two regions of blocks, split on allocate, coalesced on free.

The arena starts as the aligned power-of-two decomposition of `num_blocks` (20 blocks:
a 16-block chunk at 0 and a 4-block chunk at 16). A region of 2**k blocks is taken from the
smallest free chunk that holds it (lowest address first), halving it and freeing the upper
halves on the way down; a freed region merges with its buddy (the other half of their
aligned parent) for as long as that buddy is free too.

Growth rule. A sequence holds one or more regions; its block table is their concatenation,
and existing regions never move (their K/V are in the arena). The first claim of b blocks
takes one region of next_pow2(b) blocks; each growth takes one new region as large as the
capacity held so far (capacity doubles, the classic buddy waste), until the table covers
the new total. Every region is capped at C blocks, a power of two chosen per sequence from
its maximum m = ceil(max_num_tokens / block_size):

    C = the largest power of two with  ceil(m / C) + log2(C) <= chunks(C)

where chunks(C) counts the aligned C-block chunks of the arena. Why this cannot livelock:
region sizes never shrink, so every earlier region of a sequence lies inside a single
aligned chunk of the size being placed now; a sequence never holds more than
log2(C) + ceil(m / C) regions, and below C each size has at least twice as many chunks.
So once a request is alone (the scheduler preempts every other sequence before itself),
some chunk of the size it asks for is entirely free and every growth succeeds. C = 1
(one block per region, paged behaviour) always qualifies when m <= num_blocks, which is
why `can_ever_fit` is the same as paged's.

Internal fragmentation is this policy's signature: regions past the sequence's maximum
are counted as internal fragmentation; regions ahead of its tokens but within its maximum
are reserved for it.
"""

from __future__ import annotations

from cortexlab.kv import register
from cortexlab.kv.base import BlockAllocator, KVSequence


@register("buddy")
class BuddyAllocator(BlockAllocator):
    """Aligned power-of-two regions; a sequence grows by doubling its capacity (capped)."""

    def __init__(self, *, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks=num_blocks, block_size=block_size)
        self._max_order = self.num_blocks.bit_length() - 1
        # Offsets of free chunks by order (a chunk of order k has 2**k blocks).
        self._free: list[set[int]] = [set() for _ in range(self._max_order + 1)]
        # chunks(2**k): aligned chunks of order k the empty arena holds.
        self._num_chunks = [0] * (self._max_order + 1)
        offset = 0
        for order in range(self._max_order, -1, -1):
            if self.num_blocks >> order & 1:
                self._free[order].add(offset)
                offset += 1 << order
                for k in range(order + 1):
                    self._num_chunks[k] += 1 << (order - k)
        self._num_free = self.num_blocks
        self._region_order: dict[int, int] = {}  # first block of a held region -> its order
        self._max_blocks: dict = {}  # request id -> blocks its max_num_tokens needs
        self._cap_cache: dict[int, int] = {}

    # --- the growth rule ------------------------------------------------------------------

    def cap_order(self, max_blocks: int) -> int:
        """log2 of the largest region a sequence needing `max_blocks` at most may take."""
        order = self._cap_cache.get(max_blocks)
        if order is None:
            # Order 0 always qualifies for a sequence that fits the arena at all.
            order = next(
                (
                    k
                    for k in range(self._max_order, 0, -1)
                    if -(-max_blocks // (1 << k)) + k <= self._num_chunks[k]
                ),
                0,
            )
            self._cap_cache[max_blocks] = order
        return order

    def _plan(self, seq: KVSequence, capacity: int, num_needed: int) -> list[int]:
        """Orders of the regions that grow `capacity` blocks by at least `num_needed`."""
        cap = self.cap_order(self.num_blocks_needed(seq.max_num_tokens))
        target, orders = capacity + num_needed, []
        if capacity == 0:
            orders.append(min((num_needed - 1).bit_length(), cap))
            capacity = 1 << orders[0]
        while capacity < target:
            order = cap if capacity >= 1 << cap else capacity.bit_length() - 1
            orders.append(order)
            capacity += 1 << order
        return orders

    def _can_grow(self, seq: KVSequence, held: list[int], num_needed: int) -> bool:
        # Replay the takes on free-chunk counts: splitting a chunk of order j for a region
        # of order k leaves one free chunk at each order k..j-1.
        counts = [len(offsets) for offsets in self._free]
        for order in self._plan(seq, len(held), num_needed):
            j = next((j for j in range(order, len(counts)) if counts[j]), None)
            if j is None:
                return False
            counts[j] -= 1
            for k in range(order, j):
                counts[k] += 1
        return True

    def _grow(self, seq: KVSequence, held: list[int], num_needed: int) -> list[int]:
        if not held:
            self._max_blocks[seq.request_id] = self.num_blocks_needed(seq.max_num_tokens)
        block_ids: list[int] = []
        for order in self._plan(seq, len(held), num_needed):
            first = self._take_region(order)
            block_ids += range(first, first + (1 << order))
        return block_ids

    # --- splitting and coalescing ---------------------------------------------------------

    def _take_region(self, order: int) -> int:
        j = next(j for j in range(order, self._max_order + 1) if self._free[j])
        first = min(self._free[j])  # lowest address: keeps the arena's used prefix short
        self._free[j].remove(first)
        while j > order:  # split, keeping the lower half
            j -= 1
            self._free[j].add(first + (1 << j))
        self._region_order[first] = order
        self._num_free -= 1 << order
        return first

    def _release_region(self, first: int, order: int) -> None:
        self._num_free += 1 << order
        # Top-level chunks have distinct orders, so a free chunk at the buddy offset of the
        # same order is always the true buddy (never a neighbouring top-level chunk).
        while order < self._max_order and (buddy := first ^ (1 << order)) in self._free[order]:
            self._free[order].remove(buddy)
            first, order = min(first, buddy), order + 1
        self._free[order].add(first)

    def _release(self, block_ids: list[int]) -> None:
        i = 0
        while i < len(block_ids):
            order = self._region_order.pop(block_ids[i])
            self._release_region(block_ids[i], order)
            i += 1 << order

    def _can_take(self, num_blocks: int) -> bool:  # pragma: no cover - _can_grow replaces it
        raise NotImplementedError("buddy takes regions per sequence (_can_grow)")

    def _take(self, num_blocks: int) -> list[int]:  # pragma: no cover - _grow replaces it
        raise NotImplementedError("buddy takes regions per sequence (_grow)")

    def free(self, seq: KVSequence) -> None:
        """Release every region of `seq` (each merging with free buddies)."""
        self._max_blocks.pop(seq.request_id, None)
        super().free(seq)

    # --- reporting ------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks in free chunks."""
        return self._num_free

    def free_block_ids(self) -> list[int]:
        """Ids of the free blocks, sorted."""
        return sorted(
            b for k, firsts in enumerate(self._free) for f in firsts for b in range(f, f + (1 << k))
        )

    def free_chunks(self) -> list[tuple[int, int]]:
        """Free chunks as (first block, number of blocks), sorted by first block."""
        return sorted((f, 1 << k) for k, firsts in enumerate(self._free) for f in firsts)

    def largest_free_chunk(self) -> int:
        """Blocks in the largest free chunk: the largest region one take can get now."""
        return max((1 << k for k, firsts in enumerate(self._free) if firsts), default=0)

    def usable_free_slots(self, seq: KVSequence) -> int:
        """Slots `seq`'s first claim could get: one region up to its cap, or cap-sized ones."""
        cap = self.cap_order(self.num_blocks_needed(max(1, seq.max_num_tokens)))
        largest = self.largest_free_chunk()
        one_region = largest if largest <= 1 << cap else 0
        in_cap_regions = sum(len(f) << k for k, f in enumerate(self._free) if k >= cap)
        return max(one_region, in_cap_regions) * self.block_size

    def _num_internal_fragmented_slots(self) -> int:
        # Last-block tails, plus whole blocks past what each sequence can ever hold.
        beyond = sum(
            max(0, len(self._tables[rid]) - most) for rid, most in self._max_blocks.items()
        )
        return super()._num_internal_fragmented_slots() + beyond * self.block_size

    def _shortage_detail(self) -> str:
        return f" (largest free region: {self.largest_free_chunk()} blocks)"
