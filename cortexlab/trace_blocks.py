"""Per-step snapshots of the KV arena's block tables, for `cl.Trace(blocks=True)`.

The engine fires ``kv.blocks`` at the end of each step (only while something listens) with
every sequence's block table, its token count and the prefix cache's unreferenced blocks.
`BlockRecorder` keeps those as tuples (never the Request objects) and reads them back as a
DataFrame (one row per held block per table entry, plus one per cached block) or as one
step's owner map.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from cortexlab.hooks import StepEvent

import numpy as np
import pandas as pd

# Codes of `BlockRecorder.block_map` for blocks no single request owns.
FREE, CACHED, SHARED = -1, -2, -3

BLOCK_COLUMNS = ["step", "block_id", "request_id", "index", "num_tokens", "ref_count", "state"]
BLOCK_STATES = ("held", "shared", "cached")


@dataclass(frozen=True, slots=True)
class BlockSnapshot:
    """The arena at the end of one step: (request_id, block table, tokens) per sequence."""

    step: int
    num_blocks: int
    block_size: int
    allocator: str
    tables: tuple[tuple[Hashable, tuple[int, ...], int], ...]
    cached: tuple[int, ...]  # LRU order as the allocator gives it (prefix: evicted first first)


class BlockRecorder:
    """Listens at ``kv.blocks``; `frame()` and `block_map()` read the snapshots back."""

    def __init__(self) -> None:
        self._snapshots: dict[int, BlockSnapshot] = {}
        self._last_tables: dict[Hashable, tuple[int, ...]] = {}
        self._owners: dict[Hashable, int] = {}  # request id -> owner code, first seen first

    def on_blocks(self, event: StepEvent) -> None:
        """Record one ``kv.blocks`` event (a later event for the same step replaces it)."""
        data = event.data
        block_size = int(data["block_size"])
        num_tokens = data.get("num_tokens", {})
        tables, last = [], {}
        for rid, table in data["tables"].items():
            table = tuple(table)
            # A table mostly stays the same for block_size steps: keep one tuple for all of
            # them, so a long trace costs memory per change rather than per step.
            if self._last_tables.get(rid) == table:
                table = self._last_tables[rid]
            last[rid] = table
            self._owners.setdefault(rid, len(self._owners))
            tables.append((rid, table, int(num_tokens.get(rid, len(table) * block_size))))
        self._last_tables = last
        self._snapshots[event.step] = BlockSnapshot(
            step=event.step,
            num_blocks=int(data["num_blocks"]),
            block_size=block_size,
            allocator=str(data.get("allocator", "")),
            tables=tuple(tables),
            cached=tuple(data.get("cached", ())),
        )

    def records(self) -> list[dict]:
        """Every snapshot as a JSON-ready dict, in step order (what `Trace.save` writes)."""
        return [
            {
                "step": s.step,
                "num_blocks": s.num_blocks,
                "block_size": s.block_size,
                "allocator": s.allocator,
                "tables": [[rid, list(table), n] for rid, table, n in s.tables],
                "cached": list(s.cached),
            }
            for s in (self._snapshots[step] for step in self.steps)
        ]

    @classmethod
    def from_records(cls, records: list[dict], owner_ids: list) -> BlockRecorder:
        """A recorder holding the snapshots `records()` gave, with the same owner codes."""
        recorder = cls()
        recorder._owners = {rid: code for code, rid in enumerate(owner_ids)}
        last: dict[Hashable, tuple[int, ...]] = {}
        for record in records:
            tables = []
            for rid, table, n in record["tables"]:
                table = tuple(table)
                if last.get(rid) == table:  # share unchanged tables, as on_blocks does
                    table = last[rid]
                last[rid] = table
                recorder._owners.setdefault(rid, len(recorder._owners))
                tables.append((rid, table, int(n)))
            step = int(record["step"])
            recorder._snapshots[step] = BlockSnapshot(
                step=step,
                num_blocks=int(record["num_blocks"]),
                block_size=int(record["block_size"]),
                allocator=str(record["allocator"]),
                tables=tuple(tables),
                cached=tuple(record["cached"]),
            )
        return recorder

    @property
    def steps(self) -> list[int]:
        """The steps recorded, in order."""
        return sorted(self._snapshots)

    @property
    def owner_ids(self) -> tuple:
        """Request ids by owner code: `block_map` code ``i`` is ``owner_ids[i]``."""
        return tuple(self._owners)

    def snapshot(self, step: int | None = None) -> BlockSnapshot:
        """The snapshot of `step` (default: the last recorded)."""
        if not self._snapshots:
            raise ValueError("no kv.blocks event recorded yet: did the engine run with the hooks?")
        if step is None:
            step = max(self._snapshots)
        if step not in self._snapshots:
            steps = self.steps
            raise ValueError(
                f"step {step} was not recorded; recorded steps {steps[0]}..{steps[-1]}"
            )
        return self._snapshots[step]

    def frame(self, steps: list[int] | None = None) -> pd.DataFrame:
        """The `Trace.blocks` table for `steps` (default all), with num_blocks, block_size,
        allocator and last_step in ``.attrs``."""
        snaps = [self._snapshots[s] for s in (self.steps if steps is None else steps)]
        parts = [_snapshot_columns(s) for s in snaps]
        columns = {
            c: np.concatenate([p[c] for p in parts]) if parts else np.array([], np.int64)
            for c in BLOCK_COLUMNS
        }
        if not parts:
            columns["request_id"] = columns["state"] = np.array([], object)
        df = pd.DataFrame(columns, columns=BLOCK_COLUMNS)
        # Cached blocks hold no request's tokens: <NA> rather than a made-up count.
        df["num_tokens"] = pd.array(df["num_tokens"].to_numpy(), dtype="Int64")
        df.loc[df["state"] == "cached", "num_tokens"] = pd.NA
        if snaps:
            last = max(snaps, key=lambda s: s.step)  # a plot's default step, even if empty
            df.attrs = {
                "num_blocks": last.num_blocks,
                "block_size": last.block_size,
                "allocator": last.allocator,
                "last_step": last.step,
            }
        return df

    def block_map(self, step: int | None = None) -> np.ndarray:
        """Per block of `step` (default the last): its owner's code (an index into
        `owner_ids`), or FREE (-1), CACHED (-2), SHARED (-3, held by several tables)."""
        snap = self.snapshot(step)
        codes = np.full(snap.num_blocks, FREE, np.int64)
        codes[list(snap.cached)] = CACHED
        refs = np.zeros(snap.num_blocks, np.int64)
        for rid, table, _ in snap.tables:
            index = np.asarray(table, np.int64)
            codes[index] = self._owners[rid]
            refs[index] += 1
        codes[refs > 1] = SHARED
        return codes


def _snapshot_columns(snap: BlockSnapshot) -> dict[str, np.ndarray]:
    """One snapshot's rows as column arrays (numpy per snapshot: no Python loop per block)."""
    bs = snap.block_size
    lengths = np.array([len(t) for _, t, _ in snap.tables], np.int64)
    held = np.fromiter((b for _, t, _ in snap.tables for b in t), np.int64, int(lengths.sum()))
    # Position within its own table: a running count reset at each table's start.
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    index = np.arange(held.size, dtype=np.int64) - starts
    tokens = np.repeat(np.array([n for *_, n in snap.tables], np.int64), lengths)
    tokens = np.clip(tokens - index * bs, 0, bs)
    refs = np.bincount(held, minlength=snap.num_blocks)[held] if held.size else held
    rids = np.empty(len(snap.tables), object)
    for i, (rid, *_) in enumerate(snap.tables):
        rids[i] = rid  # one by one: a tuple id must stay one cell
    cached = np.asarray(snap.cached, np.int64)
    n_cached = cached.size
    return {
        "step": np.full(held.size + n_cached, snap.step, np.int64),
        "block_id": np.concatenate([held, cached]),
        "request_id": np.concatenate([np.repeat(rids, lengths), np.full(n_cached, None, object)]),
        # For a cached block: its position in the cache's LRU order.
        "index": np.concatenate([index, np.arange(n_cached, dtype=np.int64)]),
        "num_tokens": np.concatenate([tokens, np.zeros(n_cached, np.int64)]),
        "ref_count": np.concatenate([refs, np.zeros(n_cached, np.int64)]),
        "state": np.concatenate(
            [
                np.where(refs > 1, "shared", "held").astype(object),
                np.full(n_cached, "cached", object),
            ]
        ),
    }
