"""The shared KV arena and the mlx-lm cache adapter that reads it by block table.

One arena per engine: for every layer a K and a V array of `num_blocks * block_size` token
slots (plus one scratch slot that absorbs writes from padding positions). Attention in an
*unmodified* mlx-lm model reads K/V through `PagedLayerCache`, which the model sees as an
ordinary cache: `update_and_fetch` scatters the new K/V into the arena slots the allocator
handed out, then gathers each row's context back by slot, and `make_mask` supplies the
per-row causal mask over that gathered context. No per-request dense K/V is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


class KVArena:
    """Per-layer K and V storage of `num_blocks x block_size` token slots."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: mx.Dtype = mx.float32,
    ) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.num_slots = num_blocks * block_size
        # The extra last slot is a sink for padding writes; it is never read unmasked.
        self.scratch_slot = self.num_slots
        shape = (self.num_slots + 1, num_kv_heads, head_dim)
        self.keys = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        mx.eval(self.keys, self.values)

    @property
    def nbytes(self) -> int:
        """Bytes held by all K and V arrays."""
        return sum(a.nbytes for a in self.keys) + sum(a.nbytes for a in self.values)

    @property
    def arrays(self) -> list[mx.array]:
        """Every K and V array (to evaluate alongside a step's outputs)."""
        return self.keys + self.values

    def read_slots(self, block_table: list[int], num_tokens: int) -> np.ndarray:
        """Physical slots of positions [0, num_tokens) of a sequence."""
        pos = np.arange(num_tokens)
        table = np.asarray(block_table, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


@dataclass(slots=True)
class ForwardPlan:
    """Everything one forward pass over a group of rows needs, as MLX arrays.

    Row i processes `num_new[i]` tokens at positions [offsets[i], offsets[i] + num_new[i]);
    the group is padded to `L = max(num_new)` query positions and `K` context positions.
    """

    offsets: mx.array  # [G] int32: tokens already in the arena per row
    write_slots: mx.array  # [G * L] int32: where each new token's K/V goes
    read_slots: mx.array | None  # [G, K] int32, or None when all rows start at 0
    mask: mx.array  # [G, 1, L, K] bool
    last_index: mx.array  # [G] int32: query position whose logits are sampled


def plan_forward(
    arena: KVArena, block_tables: list[list[int]], offsets: list[int], num_new: list[int]
) -> ForwardPlan:
    """Slots and masks for rows that each add `num_new[i]` tokens after `offsets[i]`."""
    num_rows = len(num_new)
    length = max(num_new)
    ends = np.asarray(offsets) + np.asarray(num_new)
    width = int(ends.max())
    write = np.full((num_rows, length), arena.scratch_slot, dtype=np.int32)
    fresh = all(o == 0 for o in offsets)
    read = None if fresh else np.full((num_rows, width), arena.scratch_slot, dtype=np.int32)
    for i, (table, off, n) in enumerate(zip(block_tables, offsets, num_new, strict=True)):
        slots = arena.read_slots(table, off + n)
        write[i, :n] = slots[off:]
        if read is not None:
            read[i, : off + n] = slots
    q = np.asarray(offsets)[:, None] + np.arange(length)[None, :]  # [G, L] query positions
    k = np.arange(width)[None, None, :]
    # Causal within each row's own context; padding queries see that row's real keys only,
    # so no softmax row is empty (their outputs are discarded).
    mask = (k <= q[:, :, None]) & (k < ends[:, None, None])
    return ForwardPlan(
        offsets=mx.array(np.asarray(offsets, dtype=np.int32)),
        write_slots=mx.array(write.reshape(-1)),
        read_slots=None if read is None else mx.array(read),
        mask=mx.array(mask[:, None, :, :]),
        last_index=mx.array(np.asarray(num_new, dtype=np.int32) - 1),
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

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write new K/V ([G, H, L, D]) into the arena; return each row's context K/V."""
        g, h, length, d = keys.shape
        arena, layer, plan = self.arena, self.layer, self.plan
        arena.keys[layer][plan.write_slots] = keys.transpose(0, 2, 1, 3).reshape(g * length, h, d)
        arena.values[layer][plan.write_slots] = values.transpose(0, 2, 1, 3).reshape(
            g * length, h, d
        )
        if plan.read_slots is None:
            # Every row starts at position 0: its context is exactly the new tokens.
            return keys, values
        k = arena.keys[layer][plan.read_slots].transpose(0, 2, 1, 3)
        v = arena.values[layer][plan.read_slots].transpose(0, 2, 1, 3)
        return k, v

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """The plan's per-row causal mask (sliding windows are not supported)."""
        if window_size is not None:
            raise NotImplementedError("sliding-window attention is not supported by the arena")
        return self.plan.mask

    def empty(self) -> bool:
        """Never empty: the arena always exists."""
        return False

    @property
    def state(self):
        """mlx-lm caches expose state for evaluation; the arena arrays are it."""
        return self.arena.keys[self.layer], self.arena.values[self.layer]
