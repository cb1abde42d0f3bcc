"""KV-cache block allocators: a registry of policies over one shared arena of token slots."""

from cortexlab.kv.base import (
    Allocator,
    BlockAllocator,
    KVSequence,
    KVUsage,
    OutOfBlocks,
    longest_run,
    slot_mapping,
)
from cortexlab.registry import Registry

allocators: Registry[Allocator] = Registry("allocator")
register = allocators.register

# Imported after `register` exists: each policy module registers itself on import.
from cortexlab.kv.contiguous import ContiguousAllocator  # noqa: E402
from cortexlab.kv.paged import PagedAllocator  # noqa: E402

__all__ = [
    "Allocator",
    "BlockAllocator",
    "ContiguousAllocator",
    "KVSequence",
    "KVUsage",
    "OutOfBlocks",
    "PagedAllocator",
    "allocators",
    "longest_run",
    "register",
    "slot_mapping",
]
