"""A registry per strategy kind: register by name, look up by name or pass objects through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to factories for one kind of strategy (schedulers, allocators, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: make a class or factory available under `name` (re-registering replaces)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            self._factories[name] = factory
            if isinstance(factory, type):
                factory.name = name  # type: ignore[attr-defined]
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered as `name`; unknown names raise listing the known ones."""
        try:
            return self._factories[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.available())}"
            ) from None

    def create(self, spec: str | Any, /, **kwargs: Any) -> T:
        """Build from a registered name, or return an already-built object unchanged."""
        if isinstance(spec, str):
            return self.get(spec)(**kwargs)
        return spec

    def available(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.available()})"
