"""Execution: turn a scheduled batch into next-token logits with a real MLX forward pass."""

from __future__ import annotations

import time
from dataclasses import dataclass

from cortexlab.kv.arena import KVArena, PagedLayerCache, plan_forward
from cortexlab.models.base import Model
from cortexlab.models.fast import fast_activation, install_fast_activation
from cortexlab.models.fast_attention import fast_attention, install_fast_attention

import mlx.core as mx
import numpy as np

# Model types whose mlx-lm `Model.__call__` is exactly `head(self.model(x))`: for these the
# runner applies the head only to the positions it samples (a prompt's other positions would
# cost a vocab-sized matmul each, for logits nobody reads).
_HEAD_SPLIT_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Rows of different prefill lengths share one padded forward only while the group's padding
# stays this small. A padded token costs a whole token's matmuls (~3 ms for SmolLM2 on this
# CPU) while an extra forward costs a few ms of dispatch, so prompts mostly run alone.
MAX_PADDING_TOKENS = 16
# Long prompt rows run as consecutive pieces of this many tokens within one step. CPU
# attention computes every query-key score (exp is scalar, ~17 ns each) even where the causal
# mask zeroes it; pieces skip most of the masked upper triangle (400-token prompt: -8% time).
ATTENTION_CHUNK = 128
# With the arena attention of cortexlab/models/fast_attention.py, which skips the masked half
# itself (query blocks), pieces only cap a forward's size: fewer, larger forwards pay less
# dispatch and K/V gather.
FAST_ATTENTION_CHUNK = 2048


@dataclass(slots=True)
class RowWork:
    """One sequence's share of a step: new tokens after `offset` cached ones."""

    block_table: list[int]
    offset: int
    token_ids: list[int]
    needs_logits: bool


def group_rows(lengths: list[int], max_padding: int = MAX_PADDING_TOKENS) -> list[list[int]]:
    """Partition row indices into forward groups: all single-token rows together, longer rows
    sorted by length and cut where a group's padding would exceed `max_padding` tokens."""
    singles = [i for i, n in enumerate(lengths) if n == 1]
    multi = sorted((i for i, n in enumerate(lengths) if n > 1), key=lambda i: -lengths[i])
    groups = [singles] if singles else []
    current: list[int] = []
    for i in multi:
        candidate = current + [i]
        real = sum(lengths[j] for j in candidate)
        padded = lengths[candidate[0]] * len(candidate)
        if current and padded - real > max_padding:
            groups.append(current)
            candidate = [i]
        current = candidate
    if current:
        groups.append(current)
    return groups


def split_waves(
    rows: list[RowWork], chunk: int = ATTENTION_CHUNK
) -> list[list[tuple[int, RowWork]]]:
    """Cut rows longer than `chunk` into consecutive pieces: wave k holds every row's k-th
    piece (tagged with the row's index); only a row's last piece keeps `needs_logits`."""
    waves: list[list[tuple[int, RowWork]]] = [[]]
    for i, row in enumerate(rows):
        n = len(row.token_ids)
        for k, start in enumerate(range(0, n, chunk)):
            end = min(n, start + chunk)
            if k == len(waves):
                waves.append([])
            piece = RowWork(
                row.block_table,
                row.offset + start,
                row.token_ids[start:end],
                row.needs_logits and end == n,
            )
            waves[k].append((i, piece))
    return waves


class Runner:
    """Runs rows of work through an mlx-lm model whose attention reads the arena."""

    def __init__(
        self,
        model: Model,
        arena: KVArena,
        *,
        fast_activation: bool = True,
        fast_attention: bool | None = None,
    ) -> None:
        self.model = model
        self.arena = arena
        module = model.module
        # SiLU and the attention softmax on the vectorised 2**x instead of MLX's scalar exp,
        # attention reading the arena by the plan (llama family only; the model called
        # directly keeps mlx-lm's exact code): see cortexlab/models/fast*.py.
        # `fast_attention=None` follows `fast_activation`.
        self.fast_activation = fast_activation and install_fast_activation(module)
        if fast_attention is None:
            fast_attention = fast_activation
        self.fast_attention = fast_attention and install_fast_attention(module)
        self.attention_chunk = FAST_ATTENTION_CHUNK if self.fast_attention else ATTENTION_CHUNK
        args = getattr(module, "args", None)
        self._split_head = (
            getattr(args, "model_type", None) in _HEAD_SPLIT_TYPES
            and hasattr(module, "model")
            and hasattr(module.model, "embed_tokens")
        )

    def elapsed(self, t0: float) -> float:
        """The step's duration: wall seconds since `t0` (perf_counter)."""
        return time.perf_counter() - t0

    def _head(self, hidden: mx.array) -> mx.array:
        module = self.model.module
        if hasattr(module, "lm_head"):
            return module.lm_head(hidden)
        return module.model.embed_tokens.as_linear(hidden)

    def _forward_group(self, rows: list[RowWork]) -> mx.array:
        """Hidden state (or logits, for models without a split head) at each row's last token."""
        lengths = [len(r.token_ids) for r in rows]
        plan = plan_forward(
            self.arena,
            [r.block_table for r in rows],
            [r.offset for r in rows],
            lengths,
            attention_reads_plan=self.fast_attention,
        )
        width = max(lengths)
        tokens = np.zeros((len(rows), width), dtype=np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r.token_ids)] = r.token_ids
        caches = [PagedLayerCache(self.arena, i, plan) for i in range(self.model.num_layers)]
        inputs = mx.array(tokens)
        with fast_activation(self.fast_activation), fast_attention(self.fast_attention):
            out = (
                self.model.module.model(inputs, cache=caches)
                if self._split_head
                else self.model.module(inputs, cache=caches)
            )
        if width == 1:
            return out[:, 0]
        return out[mx.arange(len(rows)), plan.last_index]

    def forward(self, rows: list[RowWork]) -> mx.array:
        """Logits [R, V] for the rows with `needs_logits`, in their order. Lazy: no eval."""
        if not rows:
            raise ValueError("rows must not be empty")
        self.arena.ensure(max((max(r.block_table) for r in rows if r.block_table), default=0))
        parts, order = [], []
        for wave in split_waves(rows, self.attention_chunk):
            pieces = [piece for _, piece in wave]
            for group in group_rows([len(p.token_ids) for p in pieces]):
                wanted = [j for j in group if pieces[j].needs_logits]
                out = self._forward_group([pieces[j] for j in group])
                if wanted:
                    pos = [group.index(j) for j in wanted]
                    parts.append(out if len(pos) == len(group) else out[mx.array(pos)])
                    order.extend(wave[j][0] for j in wanted)
        if not parts:
            return mx.zeros((0, self.model.vocab_size), dtype=mx.float32)
        stacked = mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        # Groups come out grouped; put rows back in the caller's order.
        inverse = np.argsort(np.asarray(order))
        if not np.array_equal(inverse, np.arange(len(order))):
            stacked = stacked[mx.array(inverse.astype(np.int32))]
        logits = self._head(stacked) if self._split_head else stacked
        return logits.astype(mx.float32)
