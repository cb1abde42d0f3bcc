"""Named hook points: `fn(event)` callbacks selected by name, list or glob, scoped or permanent."""

from __future__ import annotations

import fnmatch
from collections import defaultdict
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
    "step.end",
)

Hook = Callable[[Any], None]


@dataclass(slots=True)
class RequestEvent:
    """A request changed phase (arrived, first scheduled, first token, preempted, finished)."""

    name: str
    time: float
    step: int
    request: Any


@dataclass(slots=True)
class StepEvent:
    """One engine step began, formed its batch, or ended (`data` holds the step's numbers)."""

    name: str
    time: float
    step: int
    data: dict = field(default_factory=dict)


def _resolve(pattern: str) -> list[str]:
    names = [n for n in HOOK_POINTS if fnmatch.fnmatchcase(n, pattern)]
    if not names:
        raise ValueError(f"unknown hook point {pattern!r}; available: {', '.join(HOOK_POINTS)}")
    return names


class HookManager:
    """Registered callbacks per hook point."""

    def __init__(self) -> None:
        self._hooks: dict[str, list[Hook]] = defaultdict(list)

    def add(self, pattern: str | Iterable[str], fn: Hook) -> Callable[[], None]:
        """Call `fn(event)` at every point matching `pattern` (name, glob or list); returns an
        undo function."""
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
        """Call every hook at `name` with `event`."""
        for fn in list(self._hooks.get(name, ())):
            fn(event)
