"""Per-request sampler state: the token history by reference, counts kept incrementally.

Stages that need history (repetition, presence and frequency penalties, DRY) read it here
instead of receiving a copy of every sequence each step. The state holds references to the
request's prompt and output lists and folds in only the tokens appended since it last
looked, so a step costs O(new tokens), not O(sequence length).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class _Counter:
    """Distinct token ids and their counts, grown in place (views, no per-step copy)."""

    __slots__ = ("slot", "ids", "counts", "num_ids", "num_folded")

    def __init__(self) -> None:
        self.slot: dict[int, int] = {}
        self.ids = np.zeros(16, dtype=np.int32)
        self.counts = np.zeros(16, dtype=np.float32)
        self.num_ids = 0
        self.num_folded = 0

    def fold(self, tokens: Sequence[int], start: int) -> None:
        for token in tokens[start:] if start else tokens:
            index = self.slot.get(token)
            if index is None:
                index = self.slot[token] = self.num_ids
                if index == len(self.ids):
                    self.ids = np.resize(self.ids, 2 * index)
                    self.counts = np.concatenate([self.counts, np.zeros(index, np.float32)])
                self.ids[index] = token
                self.num_ids += 1
            self.counts[index] += 1


class SamplerState:
    """What the sampler keeps for one request across steps.

    `prompt` and `output` are the request's own lists (never copied); `stage_state` holds
    per-stage values (mirostat's mu); `logprobs` the per-token metadata when asked for;
    `fallback_steps` the steps where every token was filtered out and the sampler fell
    back to the unfiltered argmax.
    """

    __slots__ = (
        "prompt",
        "output",
        "tokenizer",
        "stage_state",
        "logprobs",
        "fallback_steps",
        "memo",
        "_output_counts",
        "_context",
        "_positions",
        "_num_positioned",
    )

    def __init__(
        self, prompt: Sequence[int] = (), output: Sequence[int] = (), *, tokenizer: Any = None
    ) -> None:
        self.prompt, self.output, self.tokenizer = prompt, output, tokenizer
        self.stage_state: dict[str, Any] = {}
        self.logprobs: list[dict] = []
        self.fallback_steps: list[int] = []
        self.memo: dict[Any, Any] = {}
        self._output_counts: _Counter | None = None
        self._context: _Counter | None = None
        self._positions: dict[int, list[int]] = {}
        self._num_positioned = 0

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.prompt) + len(self.output)

    def token(self, position: int) -> int:
        """The token at `position` of prompt + output."""
        num_prompt = len(self.prompt)
        return (
            self.prompt[position] if position < num_prompt else self.output[position - num_prompt]
        )

    def output_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Distinct generated token ids and how often each occurred (views; do not modify)."""
        counter = self._output_counts = self._output_counts or _Counter()
        counter.fold(self.output, counter.num_folded)
        counter.num_folded = len(self.output)
        return counter.ids[: counter.num_ids], counter.counts[: counter.num_ids]

    def context_ids(self, window: int = 0) -> np.ndarray:
        """Distinct ids among prompt + output (0) or among its last `window` tokens."""
        if window:
            start = max(0, self.num_tokens - window)
            tail = [self.token(i) for i in range(start, self.num_tokens)]
            return np.unique(np.asarray(tail, dtype=np.int32))
        counter = self._context = self._context or _Counter()
        if counter.num_folded < len(self.prompt):
            counter.fold(self.prompt, counter.num_folded)
            counter.num_folded = len(self.prompt)
        counter.fold(self.output, counter.num_folded - len(self.prompt))
        counter.num_folded = self.num_tokens
        return counter.ids[: counter.num_ids]

    def positions(self, token: int) -> list[int]:
        """Every position of `token` in prompt + output (kept incrementally, for DRY)."""
        for position in range(self._num_positioned, self.num_tokens):
            self._positions.setdefault(self.token(position), []).append(position)
        self._num_positioned = self.num_tokens
        return self._positions.get(token, [])

    def __repr__(self) -> str:
        return f"SamplerState(prompt={len(self.prompt)}, output={len(self.output)})"
