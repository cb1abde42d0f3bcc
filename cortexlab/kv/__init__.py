"""KV-cache block allocators: a registry of policies over one shared arena of token slots."""

from typing import Any

from cortexlab.kv.base import (
    Allocator,
    BlockAllocator,
    KVSequence,
    KVUsage,
    OutOfBlocks,
    SharingAllocator,
    longest_run,
    longest_unheld_run,
    slot_mapping,
)
from cortexlab.registry import Registry

allocators: Registry[Allocator] = Registry("allocator")
register = allocators.register

# What the engine calls on an allocator; a user-defined one needs all of it.
ALLOCATOR_METHODS = ("can_ever_fit", "can_allocate", "allocate", "can_append", "append", "free")
ALLOCATOR_ATTRIBUTES = ("num_blocks", "block_size", "num_free_blocks", "usage")
# The optional rest (SharingAllocator): every BlockAllocator has it, neutral unless it shares.
SHARING_METHODS = (
    "num_cached_tokens",
    "seal",
    "can_fork",
    "fork",
    "prepare_write",
    "take_copies",
    "usable_free_slots",
)


def available() -> list[str]:
    """Registered allocator names."""
    return allocators.available()


def as_allocator(spec: Any, *, num_blocks: int, block_size: int) -> Allocator:
    """An allocator from a registered name or class (built with `num_blocks` x `block_size`)
    or a ready object, checked to offer every method the engine calls."""
    if isinstance(spec, str):
        return allocators.create(spec, num_blocks=num_blocks, block_size=block_size)
    if isinstance(spec, type):
        spec = spec(num_blocks=num_blocks, block_size=block_size)
    missing = [m for m in ALLOCATOR_METHODS if not callable(getattr(spec, m, None))]
    missing += [a for a in ALLOCATOR_ATTRIBUTES if not hasattr(spec, a)]
    if missing:
        raise TypeError(
            f"allocator must be a registered name ({', '.join(allocators.available())}) or an "
            f"allocator object; {spec!r} lacks {', '.join(missing)}"
        )
    for name in ("num_blocks", "block_size"):
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"allocator.{name} must be an int >= 1, got {value!r}")
    return spec


# Imported after `register` exists: each policy module registers itself on import.
from cortexlab.kv.buddy import BuddyAllocator  # noqa: E402
from cortexlab.kv.contiguous import ContiguousAllocator  # noqa: E402
from cortexlab.kv.paged import PagedAllocator  # noqa: E402
from cortexlab.kv.prefix import PrefixAllocator  # noqa: E402

__all__ = [
    "Allocator",
    "BlockAllocator",
    "BuddyAllocator",
    "ContiguousAllocator",
    "KVSequence",
    "KVUsage",
    "OutOfBlocks",
    "PagedAllocator",
    "PrefixAllocator",
    "SharingAllocator",
    "allocators",
    "as_allocator",
    "available",
    "longest_run",
    "longest_unheld_run",
    "register",
    "slot_mapping",
]
