"""Engine clocks: real time, or time that advances only by measured work."""

from __future__ import annotations

import time

CLOCKS = ("wall", "measured")


class Clock:
    """Engine time in seconds since the engine was built.

    `wall`: real elapsed time. `measured`: advances only by each step's measured duration
    (plus explicit jumps over idle gaps), so experiments do not wait through idle time.
    """

    def __init__(self, kind: str) -> None:
        if kind not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {kind!r}")
        self.kind = kind
        self._start = time.perf_counter()
        self._measured = 0.0

    def now(self) -> float:
        """Current engine time."""
        if self.kind == "wall":
            return time.perf_counter() - self._start
        return self._measured

    def jump(self, seconds: float) -> None:
        """Skip idle time (measured clock only): nothing runs while it passes."""
        if self.kind == "measured" and seconds > 0:
            self._measured += seconds

    def advance(self, seconds: float) -> None:
        """Add a step's measured duration (no-op for the wall clock)."""
        if self.kind == "measured":
            self._measured += seconds
