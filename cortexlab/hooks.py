"""Named hook points: `fn(event)` callbacks selected by name, list or glob, scoped or permanent.

docs/hooks.md lists every point (when it fires, in step order), each event's fields and the
exact `data` keys; `engine.hooks({...})` scopes hooks, `engine.add_hook` adds them for good.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

HOOK_POINTS = (
    "request.arrived",
    "request.scheduled",
    "request.first_token",
    "request.preempted",
    "request.finished",
    "step.begin",
    "step.batch",
    "sampler.distribution",
    "kv.allocate",
    "kv.append",
    "kv.free",
    "kv.evict",
    "kv.blocks",
    "step.end",
)
KV_POINTS = ("kv.allocate", "kv.append", "kv.free", "kv.evict")

Hook = Callable[[Any], None]


@dataclass(slots=True)
class RequestEvent:
    """A request changed phase (arrived, first scheduled, first token, preempted, finished).

    `request` is the live `Request` (read what you need; do not keep or change it); `time`
    is the engine clock, `step` the index of the step in progress.
    """

    name: str
    time: float
    step: int
    request: Any


@dataclass(slots=True)
class StepEvent:
    """One engine step began, formed its batch, or ended (`data` holds the step's numbers).

    `data`: ``{}`` at step.begin; the batch's composition at step.batch; duration, queue
    lengths and the ``kv_*`` accounting at step.end; the block tables at kv.blocks (exact keys
    in docs/hooks.md).
    """

    name: str
    time: float
    step: int
    data: dict = field(default_factory=dict)


@dataclass(slots=True)
class KVEvent:
    """An allocator call changed a request's blocks (fired only while a ``kv.*`` hook listens).

    `block_ids`: kv.allocate, the whole new table; kv.append, the blocks added plus the
    copies that replaced shared ones; kv.free, the table given back; kv.evict, the cached
    blocks evicted to make room for `request`. `data`: num_tokens (the request's new
    total), num_cached_tokens (kv.allocate: leading tokens served by the prefix cache),
    copied (kv.append: (src, dst) copy-on-write pairs), forked_from (kv.allocate by fork).
    """

    name: str
    time: float
    step: int
    request: Any
    block_ids: tuple[int, ...]
    data: dict = field(default_factory=dict)


@dataclass(slots=True)
class SamplerEvent:
    """One step's sampled rows (fired only while a hook listens at ``sampler.distribution``).

    Each row is a dict: request_id, token, text (the token decoded alone), logprob and rank
    (1 = most likely) under the final distribution, entropy (nats, final distribution),
    fallback (every token was filtered out), and stages: per stage that acted (``"input"``
    first), num_kept and its top candidates (top_ids, top_probs under that stage's
    distribution).
    """

    name: str
    time: float
    step: int
    rows: list[dict] = field(default_factory=list)


def _resolve(pattern: str) -> list[str]:
    names = [n for n in HOOK_POINTS if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        raise ValueError(f"unknown hook point {pattern!r}; available: {', '.join(HOOK_POINTS)}")
    return names


def _hook_name(fn: Hook) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class HookManager:
    """Registered callbacks per hook point.

    Hooks are user code and must never break a step: a hook that raises is reported once
    (a RuntimeWarning naming the hook, the point and the exception), recorded in
    `errors`, and removed from every point; the step and every request go on.
    """

    def __init__(self) -> None:
        self._hooks: dict[str, list[Hook]] = defaultdict(list)
        self.errors: deque[tuple[str, str, BaseException]] = deque(maxlen=100)

    def add(self, pattern: str | Iterable[str], fn: Hook) -> Callable[[], None]:
        """Call `fn(event)` at every point matching `pattern` (name, glob or list); returns an
        undo function."""
        if not callable(fn):
            raise TypeError(f"hook for {pattern!r} must be callable fn(event), got {fn!r}")
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        names = [n for p in patterns for n in _resolve(p)]
        for n in names:
            self._hooks[n].append(fn)

        def remove() -> None:
            for n in names:
                if fn in self._hooks[n]:
                    self._hooks[n].remove(fn)

        return remove

    @contextmanager
    def scoped(self, hooks: Mapping[str, Hook]) -> Iterator[None]:
        """Hooks active only inside the `with` block."""
        if not isinstance(hooks, Mapping):
            raise TypeError(
                f"hooks must be a mapping of hook point -> fn(event), got {type(hooks).__name__}"
            )
        for p, fn in hooks.items():  # check everything before adding anything
            for pattern in [p] if isinstance(p, str) else p:
                _resolve(pattern)
            if not callable(fn):
                raise TypeError(f"hook for {p!r} must be callable fn(event), got {fn!r}")
        undo = [self.add(p, fn) for p, fn in hooks.items()]
        try:
            yield
        finally:
            for u in undo:
                u()

    def is_active(self, name: str) -> bool:
        """True when something listens at `name` (lets the engine skip building events)."""
        return bool(self._hooks.get(name))

    def fire(self, name: str, event: Any) -> None:
        """Call every hook at `name` with `event`; a hook that raises is reported and removed."""
        for fn in list(self._hooks.get(name, ())):
            try:
                fn(event)
            except Exception as exc:
                self._drop(name, fn, exc)

    def _drop(self, name: str, fn: Hook, exc: Exception) -> None:
        for hooks in self._hooks.values():
            while fn in hooks:
                hooks.remove(fn)
        self.errors.append((name, _hook_name(fn), exc))
        warnings.warn(
            f"hook {_hook_name(fn)} at {name!r} raised {type(exc).__name__}: {exc}; "
            f"it has been removed",
            RuntimeWarning,
            stacklevel=3,
        )
