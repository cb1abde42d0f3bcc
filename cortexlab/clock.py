"""Engine clocks: real time, time that advances only by measured work, or simulated time."""

from __future__ import annotations

import time

CLOCKS = ("wall", "measured", "simulated")


class Clock:
    """Engine time in seconds since the engine was built.

    `wall`: real elapsed time. `measured`: advances only by each step's measured duration
    (plus explicit jumps over idle gaps), so experiments do not wait through idle time.
    `simulated`: advances only by the durations it is given (a cost model's step times) and
    the same idle jumps, so it never depends on how fast this machine runs.
    """

    def __init__(self, kind: str) -> None:
        if kind not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {kind!r}")
        self.kind = kind
        self._start = time.perf_counter()
        self._measured = 0.0

    @property
    def is_virtual(self) -> bool:
        """True when time passes only by `advance` and `jump` (measured, simulated)."""
        return self.kind != "wall"

    def now(self) -> float:
        """Current engine time."""
        if self.kind == "wall":
            return time.perf_counter() - self._start
        return self._measured

    def jump(self, seconds: float) -> None:
        """Skip idle time (measured and simulated clocks): nothing runs while it passes."""
        if self.kind != "wall" and seconds > 0:
            self._measured += seconds

    def advance(self, seconds: float) -> None:
        """Add a step's duration, measured or simulated (no-op for the wall clock)."""
        if self.kind != "wall":
            self._measured += seconds
