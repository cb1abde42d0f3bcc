"""An allocator seen through the ``kv.*`` hook points.

The engine hands schedulers this wrapper instead of the allocator only while a ``kv.*``
hook listens, so an unobserved run pays nothing. Every call goes to the wrapped allocator;
the ones that change blocks also fire an event naming the request and the block ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ObservedAllocator:
    """Forwards to `allocator`; fires kv.allocate / kv.append / kv.free / kv.evict."""

    def __init__(self, allocator: Any, fire: Callable[[str, Any, tuple, dict], None]) -> None:
        self.allocator = allocator
        self._fire = fire

    def __getattr__(self, name: str) -> Any:
        return getattr(self.allocator, name)

    def _evictions(self, seq: Any) -> None:
        take = getattr(self.allocator, "take_evicted", None)
        evicted = take() if take is not None else ()
        if evicted:
            self._fire("kv.evict", seq, tuple(evicted), {})

    def allocate(self, seq: Any, num_tokens: int) -> int | None:
        """allocate, then kv.evict (if the cache gave blocks up) and kv.allocate."""
        hit = self.allocator.allocate(seq, num_tokens)
        self._evictions(seq)
        data = {"num_tokens": num_tokens, "num_cached_tokens": hit or 0}
        self._fire("kv.allocate", seq, tuple(seq.block_table), data)
        return hit

    def append(self, seq: Any, num_tokens: int) -> None:
        """append, then kv.evict and kv.append with the blocks that are new to `seq`."""
        before = list(seq.block_table)
        self.allocator.append(seq, num_tokens)
        self._evictions(seq)
        after = seq.block_table
        changed = tuple(b for i, b in enumerate(after) if i >= len(before) or before[i] != b)
        if changed:
            copied = [(before[i], b) for i, b in enumerate(after[: len(before)]) if before[i] != b]
            self._fire("kv.append", seq, changed, {"num_tokens": num_tokens, "copied": copied})

    def fork(self, parent: Any, child: Any) -> None:
        """fork, then kv.evict and kv.allocate for the child (``forked_from`` the parent)."""
        self.allocator.fork(parent, child)
        self._evictions(child)
        data = {"num_tokens": parent.num_prompt_tokens, "forked_from": parent.request_id}
        self._fire("kv.allocate", child, tuple(child.block_table), data)

    def free(self, seq: Any) -> None:
        """kv.free with the table given back, then free."""
        held = tuple(seq.block_table)
        self.allocator.free(seq)
        if held:
            self._fire("kv.free", seq, held, {})

    def __repr__(self) -> str:
        return f"ObservedAllocator({self.allocator!r})"
