"""Paged allocation plus a hash-chained prefix cache, shared blocks and copy-on-write.

Every block has a reference count: the number of block tables it sits in. A full block
that `seal` has seen computed gets a key, (parent's chain hash, its tokens), and its chain
hash is hash(key), so equal hashes mean equal prefixes. A later request whose prompt
starts with the same blocks reuses them (`allocate` takes a reference instead of a fresh
block). When no table holds a keyed block any more it stays cached, evictable, in LRU
order; a fresh block comes from the free list first and from eviction only when that is
empty. The last, partial block is never keyed; `fork` shares it too, and a write into a
block that another table also holds first copies it (`take_copies`).

Nothing is ever keyed until the engine calls `seal`, so without that call this allocator
hands out exactly what `paged` does.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Hashable

from cortexlab.kv import register
from cortexlab.kv.base import KVSequence, KVUsage
from cortexlab.kv.paged import PagedAllocator

ROOT_HASH = 0  # the "parent hash" of a sequence's first block


def chain_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The chain hash of each full block of `token_ids` (block i's covers blocks 0..i)."""
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start : start + block_size])))
        hashes.append(parent)
    return hashes


def _block_tokens(seq: KVSequence, start: int, end: int) -> tuple[int, ...]:
    """Tokens [start, end) of seq's prompt + output, without building the whole list."""
    prompt = seq.prompt_token_ids
    n = len(prompt)
    if end <= n:
        return tuple(prompt[start:end])
    output = seq.output_token_ids
    return tuple(prompt[start:]) + tuple(output[max(0, start - n) : end - n])


@register("prefix")
class PrefixAllocator(PagedAllocator):
    """Paged blocks, shared by reference count, cached by content once full, LRU-evicted."""

    can_share_blocks = True

    def __init__(self, *, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks=num_blocks, block_size=block_size)
        n = self.num_blocks
        self._ref = [0] * n
        self._key: list[tuple | None] = [None] * n  # (parent hash, tokens) of a keyed block
        self._hash = [0] * n  # chain hash of a keyed block
        self._cache: dict[tuple, int] = {}  # key -> block, held or not
        self._lru: OrderedDict[int, None] = OrderedDict()  # keyed, unheld; least recent first
        self._shared: set[int] = set()  # blocks in more than one table
        self._hashes: dict[Hashable, list[int]] = {}  # request id -> hashes of sealed blocks
        self._evicted: deque[int] = deque(maxlen=n)
        # The last lookup (prompt list, its length, cache version, blocks): admission asks
        # num_cached_tokens, can_allocate and allocate in a row, so the walk is done once.
        # The version counts key changes; nothing else changes what a walk finds.
        self._version = 0
        self._last_lookup: tuple | None = None
        self.num_hit_tokens = self.num_lookup_tokens = self.num_evicted_blocks = 0

    # --- the free pool: free list first, then eviction ------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds: free, or cached and evictable."""
        return len(self._free) + len(self._lru)

    def free_block_ids(self) -> list[int]:
        """Ids of the blocks no sequence holds (cached ones included), sorted."""
        return sorted([*self._free, *self._lru])

    def cached_block_ids(self) -> list[int]:
        """Ids of the cached blocks no sequence holds, least recently used first."""
        return list(self._lru)

    def _can_take(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free) + len(self._lru)

    def _take(self, num_blocks: int) -> list[int]:
        block_ids = [
            heapq.heappop(self._free) if self._free else self._evict_one()
            for _ in range(num_blocks)
        ]
        for b in block_ids:
            self._ref[b] = 1
        return block_ids

    def _evict_one(self) -> int:
        b = self._lru.popitem(last=False)[0]
        del self._cache[self._key[b]]
        self._key[b] = None
        self._version += 1
        self.num_evicted_blocks += 1
        self._evicted.append(b)
        return b

    def evict(self, num_blocks: int = 1) -> list[int]:
        """Evict up to `num_blocks` least recently used cached blocks to the free list."""
        block_ids = [self._evict_one() for _ in range(min(num_blocks, len(self._lru)))]
        for b in block_ids:
            heapq.heappush(self._free, b)
        return block_ids

    def take_evicted(self) -> list[int]:
        """Blocks evicted since the last call (the latest `num_blocks` of them), oldest first."""
        block_ids = list(self._evicted)
        self._evicted.clear()
        return block_ids

    def _incref(self, b: int) -> None:
        self._ref[b] += 1
        if self._ref[b] == 2:
            self._shared.add(b)

    def _release(self, block_ids: list[int]) -> None:
        # Tail first, so that a sequence's deepest blocks are the first evicted: a cached
        # block is only reachable through its parents.
        ref, key = self._ref, self._key
        for b in reversed(block_ids):
            ref[b] -= 1
            if ref[b] == 1:
                self._shared.discard(b)
            elif ref[b] == 0:
                if key[b] is None:
                    heapq.heappush(self._free, b)
                else:
                    self._lru[b] = None

    # --- lookup and first claim -----------------------------------------------------------

    def cached_blocks(self, seq: KVSequence) -> list[int]:
        """The cached blocks holding `seq`'s longest cached prompt prefix (at most prompt-1
        tokens, whole blocks); costs one dict lookup per block up to the first miss."""
        prompt = getattr(seq, "prompt_token_ids", None)
        if not prompt or not self._cache:
            return []
        last = self._last_lookup
        if last and last[0] is prompt and last[1] == len(prompt) and last[2] == self._version:
            return list(last[3])
        bs, blocks, parent = self.block_size, [], ROOT_HASH
        for start in range(0, len(prompt) - bs, bs):  # the last prompt token is never hit
            b = self._cache.get((parent, tuple(prompt[start : start + bs])))
            if b is None:
                break
            blocks.append(b)
            parent = self._hash[b]
        self._last_lookup = (prompt, len(prompt), self._version, blocks)
        return list(blocks)

    def num_cached_tokens(self, seq: KVSequence) -> int:
        """Leading prompt tokens of `seq` in cached full blocks now (what `allocate` reuses)."""
        return len(self.cached_blocks(seq)) * self.block_size

    def _hits(self, seq: KVSequence, num_tokens: int) -> tuple[list[int], int]:
        hit = self.cached_blocks(seq)[: num_tokens // self.block_size]
        return hit, sum(1 for b in hit if self._ref[b] == 0)  # unheld hits leave the pool

    def can_allocate(self, seq: KVSequence, num_tokens: int) -> bool:
        """Whether `allocate(seq, num_tokens)` would succeed now (cache hits need no block)."""
        num_needed = self._check_allocate(seq, num_tokens)
        hit, num_unheld = self._hits(seq, num_tokens)
        return num_needed - len(hit) + num_unheld <= self.num_free_blocks

    def allocate(self, seq: KVSequence, num_tokens: int) -> int:
        """First claim: the cached blocks `num_cached_tokens(seq)` names, then fresh blocks.

        Returns the number of leading tokens served from the cache.
        """
        num_needed = self._check_allocate(seq, num_tokens)
        hit, num_unheld = self._hits(seq, num_tokens)
        # Unheld hits leave the pool too, so they count towards what the pool must give.
        if num_needed - len(hit) + num_unheld > self.num_free_blocks:
            raise self._out_of_blocks(seq, num_needed - len(hit) + num_unheld)
        ref, lru = self._ref, self._lru
        for b in hit:
            if ref[b] == 0:  # cached and unheld: revived
                del lru[b]
            ref[b] += 1
            if ref[b] == 2:
                self._shared.add(b)
        table = hit + self._take(num_needed - len(hit))
        rid = seq.request_id
        self._tables[rid], self._num_tokens[rid] = table, num_tokens
        self._hashes[rid] = [self._hash[b] for b in hit]
        seq.block_table = list(table)
        if getattr(seq, "prompt_token_ids", None):
            self.num_lookup_tokens += len(seq.prompt_token_ids)
            self.num_hit_tokens += len(hit) * self.block_size
        return len(hit) * self.block_size

    # --- growth with copy-on-write --------------------------------------------------------

    def _written(self, seq: KVSequence, table: list[int], start: int, end: int) -> list[int]:
        """Indices of the blocks positions [start, end) of `seq` fall in that another table
        or the cache holds: they must not be written in place."""
        if start >= end:
            return []
        num_sealed = len(self._hashes[seq.request_id])
        if start < num_sealed * self.block_size:
            raise ValueError(
                f"start must be >= {num_sealed * self.block_size} for request "
                f"{seq.request_id!r}: its first {num_sealed} block(s) are sealed, got {start}"
            )
        ref, key, last = self._ref, self._key, min(len(table), -(-end // self.block_size))
        return [
            i
            for i in range(start // self.block_size, last)
            if ref[table[i]] > 1 or key[table[i]] is not None
        ]

    def _num_copies(self, table: list[int], indices: list[int]) -> int:
        return sum(1 for i in indices if self._ref[table[i]] > 1)

    def _copy_on_write(self, seq: KVSequence, table: list[int], indices: list[int]) -> None:
        for i in indices:
            src = table[i]
            if self._ref[src] == 1:
                # Cached but ours alone (e.g. sealed by a fork's parent, since freed): it
                # leaves the cache, else a later hit would read the rewritten content.
                del self._cache[self._key[src]]
                self._key[src] = None
                self._version += 1
                continue
            [dst] = self._take(1)
            self._release([src])  # still held by another table: stays put
            table[i] = seq.block_table[i] = dst
            self._copies.append((src, dst))

    def prepare_write(self, seq: KVSequence, start: int, end: int) -> None:
        """Copy every shared block that positions [start, end) of `seq` fall in."""
        table = self._held(seq, act="prepare_write")
        if not 0 <= start <= end <= len(table) * self.block_size:
            raise ValueError(
                f"start and end must satisfy 0 <= start <= end <= {len(table) * self.block_size}"
                f" (request {seq.request_id!r}'s blocks), got start={start}, end={end}"
            )
        indices = self._written(seq, table, start, end)
        num_copies = self._num_copies(table, indices)
        if num_copies > self.num_free_blocks:
            raise self._out_of_blocks(seq, num_copies)
        self._copy_on_write(seq, table, indices)

    def _plan_append(self, seq: KVSequence, num_tokens: int) -> tuple[list[int], list[int], int]:
        """(seq's table, indices `_copy_on_write` must handle, blocks the pool must give)."""
        table = self._table_for_append(seq, num_tokens)
        start, bs = self._num_tokens[seq.request_id], self.block_size
        num_needed = -(-num_tokens // bs) - len(table)
        # A table holds exactly ceil(tokens / bs) blocks, so the new positions fall in held
        # block start // bs at most: the partly full last one, mostly ours alone and uncached.
        i = start // bs
        if start == num_tokens or i >= len(table):
            return table, [], num_needed
        b = table[i]
        if self._ref[b] == 1 and self._key[b] is None:
            return table, [], num_needed
        indices = self._written(seq, table, start, num_tokens)
        return table, indices, num_needed + self._num_copies(table, indices)

    def can_append(self, seq: KVSequence, num_tokens: int) -> bool:
        """Whether `append(seq, num_tokens)` would succeed now (copies included)."""
        return self._plan_append(seq, num_tokens)[2] <= len(self._free) + len(self._lru)

    def append(self, seq: KVSequence, num_tokens: int) -> None:
        """Grow `seq` to `num_tokens` in total, first copying a shared block it writes into."""
        table, indices, num_from_pool = self._plan_append(seq, num_tokens)
        if num_from_pool > len(self._free) + len(self._lru):
            raise self._out_of_blocks(seq, num_from_pool)
        if indices:
            self._copy_on_write(seq, table, indices)
        num_needed = -(-num_tokens // self.block_size) - len(table)
        if num_needed > 0:
            block_ids = self._take(num_needed)
            table += block_ids
            seq.block_table += block_ids
        self._num_tokens[seq.request_id] = num_tokens

    # --- sealing, forks, release ----------------------------------------------------------

    def seal(self, seq: KVSequence) -> None:
        """Key `seq`'s full blocks below `seq.num_computed_tokens` (each hashed once)."""
        table = self._tables.get(seq.request_id)
        if not table or not hasattr(seq, "prompt_token_ids"):
            return
        hashes, bs = self._hashes[seq.request_id], self.block_size
        num_full = min(seq.num_computed_tokens, self._num_tokens[seq.request_id]) // bs
        parent = hashes[-1] if hashes else ROOT_HASH
        for i in range(len(hashes), num_full):
            key = (parent, _block_tokens(seq, i * bs, (i + 1) * bs))
            parent = hash(key)
            hashes.append(parent)
            b = table[i]
            # Equal content computed twice stays cached once; the other copy is plain.
            if self._key[b] is None and key not in self._cache:
                self._key[b], self._hash[b], self._cache[key] = key, parent, b
                self._version += 1

    def can_fork(self, parent: KVSequence, child: KVSequence) -> bool:
        """A fork takes no block (checks the arguments, then True)."""
        self._fork_tokens(parent, child)
        return True

    def fork(self, parent: KVSequence, child: KVSequence) -> None:
        """Share every block of `parent` with `child` by reference (copy-on-write later)."""
        num_tokens = self._fork_tokens(parent, child)
        table = list(self._tables[parent.request_id])
        for b in table:
            self._incref(b)
        cid = child.request_id
        self._tables[cid], self._num_tokens[cid] = table, num_tokens
        self._hashes[cid] = list(self._hashes[parent.request_id])
        child.block_table = list(table)

    def free(self, seq: KVSequence) -> None:
        """Drop `seq`'s references; its keyed blocks that nobody holds stay cached."""
        self._hashes.pop(seq.request_id, None)
        super().free(seq)

    # --- accounting -----------------------------------------------------------------------

    def ref_count(self, block_id: int) -> int:
        """How many block tables hold `block_id`."""
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The chain hash of a keyed block, None for a block the cache does not know."""
        return None if self._key[block_id] is None else self._hash[block_id]

    def usage(self) -> KVUsage:
        """Slot usage with shared blocks counted once and cached blocks apart from free."""
        bs, num_cached, num_free = self.block_size, len(self._lru), len(self._free)
        num_held = self.num_blocks - num_cached - num_free
        # Only last blocks are partly empty, and tables sharing one agree on its fill.
        tails = {table[-1]: -self._num_tokens[rid] % bs for rid, table in self._tables.items()}
        num_unused = sum(tails.values())
        num_entries = sum(len(table) for table in self._tables.values())
        return KVUsage(
            num_slots=self.num_blocks * bs,
            num_used_slots=num_held * bs - num_unused,
            num_reserved_slots=num_unused,
            num_internal_fragmented_slots=num_unused,
            num_free_slots=num_free * bs,
            num_shared_slots=len(self._shared) * bs,
            num_free_blocks=num_free + num_cached,
            num_sequences=len(self._tables),
            largest_free_run_blocks=self._largest_free_run_blocks(),
            num_cached_slots=num_cached * bs,
            num_cached_blocks=num_cached,
            max_sharing=max((self._ref[b] for b in self._shared), default=min(num_held, 1)),
            mean_sharing=num_entries / num_held if num_held else 0.0,
            num_hit_tokens=self.num_hit_tokens,
            num_lookup_tokens=self.num_lookup_tokens,
            num_evicted_blocks=self.num_evicted_blocks,
        )


__all__ = ["ROOT_HASH", "PrefixAllocator", "chain_hashes"]
