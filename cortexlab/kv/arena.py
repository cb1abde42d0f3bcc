"""The shared KV arena and the mlx-lm cache adapter that reads it by block table.

One arena per engine: for every layer a K and a V array of `num_blocks * block_size` token
slots (plus one scratch block that absorbs writes from padding positions). Attention in an
*unmodified* mlx-lm model reads K/V through `PagedLayerCache`, which the model sees as an
ordinary cache: `update_and_fetch` scatters the new K/V into the arena blocks the allocator
handed out, then gathers each row's context back block by block, and `make_mask` supplies
the per-row causal mask over that gathered context. No per-request dense K/V is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np


class KVArena:
    """Per-layer K and V storage of `num_blocks x block_size` token slots.

    Layout per layer: rows of `head_dim` values ordered (block, kv head, offset in block),
    i.e. `[(num_blocks + 1) * num_kv_heads * block_size, head_dim]`. Gathering a sequence's
    blocks then copies `block_size * head_dim` contiguous values per (block, head) and lands
    directly in the `[B, H, K, D]` order attention wants, with no transpose copy (MLX's CPU
    attention is ~7x slower on transposed K/V).

    Memory is sized from use: the arrays hold `capacity` blocks (starting at
    `initial_blocks`) and double, up to `num_blocks`, when a block id at or above the
    capacity is about to be used, so an idle engine does not hold its whole budget. The
    block after the last real one (`scratch_block`) is scratch: padding writes go there and
    padded reads come from there, always masked out.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: mx.Dtype = mx.float32,
        initial_blocks: int = 64,
    ) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.num_slots = num_blocks * block_size
        self.capacity = min(num_blocks, max(1, initial_blocks))
        shape = ((self.capacity + 1) * num_kv_heads * block_size, head_dim)
        self.keys = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        mx.eval(self.keys, self.values)

    @property
    def scratch_block(self) -> int:
        """Physical index of the scratch block (just past the real ones held now)."""
        return self.capacity

    def ensure(self, max_block_id: int) -> None:
        """Grow the arrays so that block `max_block_id` exists (doubling, up to num_blocks)."""
        if max_block_id < self.capacity:
            return
        if not 0 <= max_block_id < self.num_blocks:
            raise IndexError(f"block id {max_block_id} is outside the arena [0, {self.num_blocks})")
        new_capacity = min(self.num_blocks, max(2 * self.capacity, max_block_id + 1))
        # The old scratch block becomes a real one: blocks are always written before read.
        extra = (new_capacity - self.capacity) * self.num_kv_heads * self.block_size
        pad = mx.zeros((extra, self.head_dim), self.dtype)
        self.keys = [mx.concatenate([k, pad]) for k in self.keys]
        self.values = [mx.concatenate([v, pad]) for v in self.values]
        mx.eval(self.keys, self.values)
        self.capacity = new_capacity

    @property
    def nbytes(self) -> int:
        """Bytes held now by all K and V arrays (including the scratch block)."""
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    @property
    def arrays(self) -> list[mx.array]:
        """Every K and V array (to evaluate alongside a step's outputs)."""
        return self.keys + self.values

    def _check(self, blocks: np.ndarray) -> None:
        # An id past the arrays would make MLX read or write out of bounds (memory
        # corruption, not an exception), so this is checked even with the policy guard off.
        if blocks.size and (blocks.min() < 0 or blocks.max() >= self.capacity):
            bad = blocks[(blocks < 0) | (blocks >= self.capacity)][0]
            raise IndexError(
                f"block id {int(bad)} is outside the arena's {self.capacity} allocated blocks"
            )

    def rows_of(self, blocks: np.ndarray, within: np.ndarray) -> np.ndarray:
        """Arena rows `[N, H]` of N token slots given as (block id, offset within block)."""
        self._check(blocks)
        heads = np.arange(self.num_kv_heads)
        base = (blocks[:, None] * self.num_kv_heads + heads[None, :]) * self.block_size
        return base + within[:, None]

    def write_rows(self, block_table: list[int], start: int, end: int) -> np.ndarray:
        """Arena rows `[end - start, H]` that hold positions [start, end) of a sequence."""
        pos = np.arange(start, end)
        blocks = np.asarray(block_table, dtype=np.int64)[pos // self.block_size]
        return self.rows_of(blocks, pos % self.block_size)

    def block_rows(self, block_tables: list[list[int]], num_blocks: int) -> np.ndarray:
        """`[G, H, num_blocks]` rows of the block-major view; short tables padded with scratch."""
        table = np.full((len(block_tables), num_blocks), self.scratch_block, dtype=np.int64)
        for i, t in enumerate(block_tables):
            n = min(len(t), num_blocks)
            table[i, :n] = t[:n]
            self._check(table[i, :n])
        heads = np.arange(self.num_kv_heads)
        return table[:, None, :] * self.num_kv_heads + heads[None, :, None]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks, (src, dst) pairs applied in order (lazily, in every layer).

        Copy-on-write and non-sharing forks call this between a step's writes and the next
        read, so the copies land after the writes they must see and before the reads.
        """
        if not copies:
            return
        src, dst = (np.asarray(ids, dtype=np.int64) for ids in zip(*copies, strict=True))
        self.ensure(int(max(src.max(), dst.max())))
        self._check(src)
        self._check(dst)
        # A chain a->b, b->c must read b before it is overwritten: apply in dependency-free
        # rounds (the allocators never chain copies, but a user allocator might).
        if len(set(dst.tolist()) & set(src.tolist())) or len(set(dst.tolist())) < len(dst):
            for pair in copies:
                self.copy_blocks_round([pair])
            return
        self.copy_blocks_round(copies)

    def copy_blocks_round(self, copies: list[tuple[int, int]]) -> None:
        """Copy (src, dst) block pairs whose targets are distinct and not sources."""
        h, bs = self.num_kv_heads, self.block_size
        src, dst = (np.asarray(ids, dtype=np.int64) for ids in zip(*copies, strict=True))
        within = np.arange(h * bs)
        src_rows = mx.array((src[:, None] * h * bs + within).reshape(-1).astype(np.int32))
        dst_rows = mx.array((dst[:, None] * h * bs + within).reshape(-1).astype(np.int32))
        for layer in range(self.num_layers):
            self.keys[layer][dst_rows] = self.keys[layer][src_rows]
            self.values[layer][dst_rows] = self.values[layer][src_rows]

    def gather(self, layer: int, rows: mx.array) -> tuple[mx.array, mx.array]:
        """K and V `[G, H, nb * block_size, D]` for block rows `[G, H, nb]`."""
        g, h, nb = rows.shape
        width = self.block_size * self.head_dim
        shape = (g, h, nb * self.block_size, self.head_dim)
        k = self.keys[layer].reshape(-1, width)[rows].reshape(shape)
        v = self.values[layer].reshape(-1, width)[rows].reshape(shape)
        return k, v

    def read(
        self, layer: int, block_table: list[int], num_tokens: int
    ) -> tuple[mx.array, mx.array]:
        """K and V `[H, num_tokens, D]` of one sequence (for inspection and tests)."""
        nb = -(-num_tokens // self.block_size)
        rows = mx.array(self.block_rows([block_table], nb).astype(np.int32))
        k, v = self.gather(layer, rows)
        return k[0, :, :num_tokens], v[0, :, :num_tokens]


@dataclass(slots=True)
class ForwardPlan:
    """Everything one forward pass over a group of rows needs.

    Row i processes `num_new[i]` tokens at positions [offsets[i], offsets[i] + num_new[i]);
    the group is padded to `L = max(num_new)` query positions and `K` context positions.
    """

    offsets: mx.array  # [G] int32: tokens already in the arena per row
    write_rows: mx.array  # [G * L * H] int32: arena row of each new token's K/V, per head
    read_rows: mx.array | None  # [G, H, nb] int32 block rows; None when all rows start at 0
    last_index: mx.array  # [G] int32: query position whose logits are sampled
    starts: np.ndarray  # [G] host copy of `offsets`
    ends: np.ndarray  # [G] offsets + num_new: each row's context length after the step
    num_queries: int  # L
    num_keys: int  # K: context positions the cache returns (block-padded when gathered)
    # Attention that reads the plan itself (cortexlab/models/fast_attention.py) needs no
    # [G, 1, L, K] mask from make_mask; building one for a long prompt costs host time.
    attention_reads_plan: bool = False
    # Arrays derived from the plan that every layer's attention reuses (built by the first).
    shared: dict = field(default_factory=dict)
    _mask: mx.array | None = None

    def causal_mask(self, start: int, stop: int, num_keys: int) -> np.ndarray:
        """`[G, stop - start, num_keys]` bool: query positions [start, stop) may see key k.

        Causal within each row's own context; padding queries see that row's real keys only,
        so no softmax row is empty (their outputs are discarded).
        """
        q = self.starts[:, None] + np.arange(start, stop)[None, :]
        k = np.arange(num_keys)[None, None, :]
        return (k <= q[:, :, None]) & (k < self.ends[:, None, None])

    def key_extent(self, start: int, stop: int) -> int:
        """How many leading context positions queries [start, stop) can see in any row."""
        return int(np.minimum(self.starts + stop, self.ends).max())

    @property
    def mask(self) -> mx.array:
        """`[G, 1, L, K]` bool mask of the whole forward (built on first use)."""
        if self._mask is None:
            self._mask = mx.array(self.causal_mask(0, self.num_queries, self.num_keys)[:, None])
        return self._mask


def plan_forward(
    arena: KVArena,
    block_tables: list[list[int]],
    offsets: list[int],
    num_new: list[int],
    *,
    attention_reads_plan: bool = False,
) -> ForwardPlan:
    """Arena rows and masks for rows that each add `num_new[i]` tokens after `offsets[i]`."""
    num_rows, heads = len(num_new), arena.num_kv_heads
    length = max(num_new)
    starts = np.asarray(offsets, dtype=np.int64)
    ends = starts + np.asarray(num_new, dtype=np.int64)
    # Padding positions write into the scratch block (any row of it will do).
    scratch_row = arena.scratch_block * heads * arena.block_size
    if length == 1:
        # Decode: one new token per row, computed for all rows at once.
        bs = arena.block_size
        blocks = np.array([t[o // bs] for t, o in zip(block_tables, offsets, strict=True)])
        write = arena.rows_of(blocks, starts % bs)
    else:
        write = np.full((num_rows, length, heads), scratch_row, dtype=np.int64)
        for i, (table, off, n) in enumerate(zip(block_tables, offsets, num_new, strict=True)):
            write[i, :n] = arena.write_rows(table, off, off + n)
    if all(o == 0 for o in offsets):
        read, width = None, length
    else:
        num_blocks = -(-int(ends.max()) // arena.block_size)
        read, width = arena.block_rows(block_tables, num_blocks), num_blocks * arena.block_size
    return ForwardPlan(
        offsets=mx.array(starts.astype(np.int32)),
        write_rows=mx.array(write.reshape(-1).astype(np.int32)),
        read_rows=None if read is None else mx.array(read.astype(np.int32)),
        last_index=mx.array(np.asarray(num_new, dtype=np.int32) - 1),
        starts=starts,
        ends=ends,
        num_queries=length,
        num_keys=width,
        attention_reads_plan=attention_reads_plan,
    )


class PagedLayerCache:
    """The cache object one mlx-lm attention layer sees during one forward pass."""

    def __init__(self, arena: KVArena, layer: int, plan: ForwardPlan) -> None:
        self.arena = arena
        self.layer = layer
        self.plan = plan

    @property
    def offset(self) -> mx.array:
        """Per-row RoPE position of the first new token."""
        return self.plan.offsets

    def write(self, keys: mx.array, values: mx.array) -> None:
        """Write new K/V (`[G, H, L, D]`) into the arena."""
        g, h, length, d = keys.shape
        arena, layer, rows = self.arena, self.layer, self.plan.write_rows
        arena.keys[layer][rows] = keys.transpose(0, 2, 1, 3).reshape(g * length * h, d)
        arena.values[layer][rows] = values.transpose(0, 2, 1, 3).reshape(g * length * h, d)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write new K/V (`[G, H, L, D]`) into the arena; return each row's context K/V."""
        self.write(keys, values)
        if self.plan.read_rows is None:
            # Every row starts at position 0: its context is exactly the new tokens.
            return keys, values
        return self.arena.gather(self.layer, self.plan.read_rows)

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """The plan's per-row causal mask (sliding windows are not supported); None when the
        attention reads the plan itself."""
        if window_size is not None:
            raise NotImplementedError("sliding-window attention is not supported by the arena")
        return None if self.plan.attention_reads_plan else self.plan.mask

    def empty(self) -> bool:
        """Never empty: the arena always exists."""
        return False

    @property
    def state(self):
        """mlx-lm caches expose state for evaluation; the arena arrays are it."""
        return self.arena.keys[self.layer], self.arena.values[self.layer]
