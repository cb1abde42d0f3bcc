"""The engine's side of the allocator contract, kept out of the step loop.

Per step the engine asks the `KVLedger` for: the allocator schedulers should see (the
hook-firing wrapper only while a ``kv.*`` hook listens), the block copies to apply before
the next read (copy-on-write, non-sharing forks), which requests to `seal` once their
tokens are computed, and the step's accounting columns and block snapshot.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cortexlab.hooks import KV_POINTS, HookManager
from cortexlab.kv.arena import KVArena
from cortexlab.kv.base import BlockAllocator
from cortexlab.kv.observed import ObservedAllocator


class KVLedger:
    """Copies, sealing, observation and accounting for one engine's allocator and arena."""

    def __init__(
        self,
        allocator: Any,
        arena: KVArena,
        hook_manager: HookManager,
        fire: Callable[[str, Any, tuple, dict], None],
    ) -> None:
        self.allocator = allocator
        self.arena = arena
        self.hook_manager = hook_manager
        self.observed = ObservedAllocator(allocator, fire)
        seal = getattr(type(allocator), "seal", None)
        # The neutral BlockAllocator.seal does nothing: skip the per-request call then.
        self._seal = allocator.seal if seal not in (None, BlockAllocator.seal) else None
        self._take_copies = getattr(allocator, "take_copies", None)
        self._is_observed = False

    def view(self) -> Any:
        """The allocator for this step: observed while a kv.* hook listens."""
        is_observed = any(self.hook_manager.is_active(p) for p in KV_POINTS)
        if is_observed and not self._is_observed:
            take = getattr(self.allocator, "take_evicted", None)
            if take is not None:
                take()  # evictions from before anyone listened are not this step's
        self._is_observed = is_observed
        return self.observed if is_observed else self.allocator

    def apply_copies(self) -> None:
        """Copy the blocks the allocator asked for, before anything reads them."""
        if self._take_copies is not None:
            copies = self._take_copies()
            if copies:
                self.arena.copy_blocks(copies)

    def seal(self, requests: Iterable[Any]) -> None:
        """Tell a caching allocator which full blocks now hold computed tokens."""
        if self._seal is not None:
            for request in requests:
                self._seal(request)

    def columns(self, waiting: Any) -> dict:
        """The step's KV accounting (`step.end` columns, all in token slots)."""
        allocator = self.allocator
        usage = allocator.usage()
        external = 0
        head = waiting[0] if waiting else None
        measure = getattr(allocator, "num_external_fragmented_slots", None)
        if head is not None and measure is not None:
            external = min(measure(head), usage.num_free_slots + usage.num_cached_slots)
        return {
            "kv_num_slots": usage.num_slots,
            "kv_used_slots": usage.num_used_slots,
            "kv_reserved_slots": usage.num_reserved_slots,
            "kv_internal_slots": usage.num_internal_fragmented_slots,
            "kv_fragmented_slots": usage.num_internal_fragmented_slots,
            "kv_external_slots": external,
            "kv_free_slots": usage.num_free_slots,
            "kv_cached_slots": usage.num_cached_slots,
            "kv_shared_slots": usage.num_shared_slots,
            "kv_max_sharing": usage.max_sharing,
            "kv_hit_tokens": usage.num_hit_tokens,
            "kv_lookup_tokens": usage.num_lookup_tokens,
            "kv_evicted_blocks": usage.num_evicted_blocks,
            "kv_utilization": usage.utilization,
        }

    def snapshot(self, requests: Iterable[Any]) -> dict:
        """Which blocks each request holds now (the `kv.blocks` event's data)."""
        allocator = self.allocator
        held = [r for r in requests if r.block_table]
        cached = getattr(allocator, "cached_block_ids", None)
        return {
            "num_blocks": allocator.num_blocks,
            "block_size": allocator.block_size,
            "tables": {r.request_id: tuple(r.block_table) for r in held},
            "num_tokens": {r.request_id: r.num_computed_tokens for r in held},
            "cached": tuple(cached()) if cached is not None else (),
            "allocator": getattr(allocator, "name", type(allocator).__name__),
        }
