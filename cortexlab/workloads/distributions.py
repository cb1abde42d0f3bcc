"""Length distributions and arrival processes: small frozen dataclasses, validated when built.

A length distribution has ``sample(rng, n) -> int array`` (every value >= 1); an arrival
process has ``arrival_times(rng, n) -> float array`` (first arrival at 0, non-decreasing).
Any object with that method plugs in, so a distribution written in a notebook cell works too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Zipf draws through an explicit CDF over [low, high]; this caps that table's size.
MAX_ZIPF_RANGE = 1_000_000


def fail(owner: str, field: str, rule: str, value: object) -> ValueError:
    """The error every check raises: which field, the allowed range, and what came."""
    return ValueError(f"{owner}.{field} must be {rule}, got {value!r}")


def check_int(
    owner: str, field: str, value: object, rule: str, ok: Callable[[int], bool] = lambda v: True
) -> int:
    """`value` as an int (numpy ints count, bool does not) or a ValueError naming `field`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(int(value)):
        raise fail(owner, field, rule, value)
    return int(value)


def check_float(
    owner: str, field: str, value: object, rule: str, ok: Callable[[float], bool]
) -> float:
    """`value` as a finite float or a ValueError naming `field`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise fail(owner, field, rule, value)
    as_float = float(value)
    if not math.isfinite(as_float) or not ok(as_float):
        raise fail(owner, field, rule, value)
    return as_float


def _put(obj: object, field: str, value: object) -> None:
    # Normalised values are written back past the frozen guard (as SamplingParams does).
    object.__setattr__(obj, field, value)


class LengthDistribution(Protocol):
    """Draws token counts."""

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


class ArrivalProcess(Protocol):
    """Draws arrival times in seconds from 0."""

    def arrival_times(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class Fixed:
    """Every request gets `value` tokens."""

    value: int

    def __post_init__(self) -> None:
        _put(
            self, "value", check_int("Fixed", "value", self.value, "an int >= 1", lambda v: v >= 1)
        )

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` copies of `value`."""
        return np.full(n, self.value, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class Uniform:
    """Uniform integers in [low, high], both ends included."""

    low: int
    high: int

    def __post_init__(self) -> None:
        _put(self, "low", check_int("Uniform", "low", self.low, "an int >= 1", lambda v: v >= 1))
        rule = f"an int >= low ({self.low})"
        _put(self, "high", check_int("Uniform", "high", self.high, rule, lambda v: v >= self.low))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` uniform draws."""
        return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Log-normal around `median` (sigma is the log's standard deviation), rounded, clipped."""

    median: float
    sigma: float = 1.0
    low: int = 1
    high: int | None = None

    def __post_init__(self) -> None:
        o = "LogNormal"
        _put(
            self,
            "median",
            check_float(o, "median", self.median, "a finite float > 0", lambda v: v > 0),
        )
        _put(
            self,
            "sigma",
            check_float(o, "sigma", self.sigma, "a finite float >= 0", lambda v: v >= 0),
        )
        _put(self, "low", check_int(o, "low", self.low, "an int >= 1", lambda v: v >= 1))
        if self.high is not None:
            rule = f"None or an int >= low ({self.low})"
            _put(self, "high", check_int(o, "high", self.high, rule, lambda v: v >= self.low))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` draws, rounded to the nearest int and clipped to [low, high]."""
        values = np.rint(rng.lognormal(math.log(self.median), self.sigma, size=n))
        return np.clip(values, self.low, self.high).astype(np.int64)


@dataclass(frozen=True, slots=True)
class Zipf:
    """Bounded Zipf on [low, high]: P(low + k) is proportional to (k + 1) ** -a."""

    a: float
    low: int = 1
    high: int = 1024

    def __post_init__(self) -> None:
        _put(self, "a", check_float("Zipf", "a", self.a, "a finite float > 0", lambda v: v > 0))
        _put(self, "low", check_int("Zipf", "low", self.low, "an int >= 1", lambda v: v >= 1))
        rule = (
            f"an int in [low, low + {MAX_ZIPF_RANGE}) = [{self.low}, {self.low + MAX_ZIPF_RANGE})"
        )
        ok = lambda v: self.low <= v < self.low + MAX_ZIPF_RANGE  # noqa: E731
        _put(self, "high", check_int("Zipf", "high", self.high, rule, ok))

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` draws by inverting the CDF (bounded, so any a > 0 is a distribution)."""
        weights = np.arange(1, self.high - self.low + 2, dtype=np.float64) ** -self.a
        cdf = np.cumsum(weights / weights.sum())
        index = np.searchsorted(cdf, rng.random(n), side="right")
        return self.low + np.minimum(index, len(cdf) - 1).astype(np.int64)


@dataclass(frozen=True, slots=True)
class Empirical:
    """Draws from observed `values`, equally likely or with `weights`."""

    values: Sequence[int]
    weights: Sequence[float] | None = None

    def __post_init__(self) -> None:
        rule = "a non-empty list of ints >= 1"
        if isinstance(self.values, str | bytes) or not isinstance(
            self.values, Sequence | np.ndarray
        ):
            raise fail("Empirical", "values", rule, self.values)
        values = tuple(
            check_int("Empirical", "values", v, rule, lambda v: v >= 1) for v in self.values
        )
        if not values:
            raise fail("Empirical", "values", rule, self.values)
        _put(self, "values", values)
        if self.weights is not None:
            rule = f"None or {len(values)} finite floats >= 0 with a positive sum"
            weights = self.weights
            if not isinstance(weights, Sequence | np.ndarray) or len(weights) != len(values):
                raise fail("Empirical", "weights", rule, weights)
            checked = tuple(
                check_float("Empirical", "weights", w, rule, lambda v: v >= 0) for w in weights
            )
            if sum(checked) <= 0:
                raise fail("Empirical", "weights", rule, weights)
            _put(self, "weights", checked)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` draws with replacement."""
        p = None if self.weights is None else np.asarray(self.weights) / sum(self.weights)
        return rng.choice(np.asarray(self.values, dtype=np.int64), size=n, p=p)


def as_length(owner: str, field: str, value: object) -> LengthDistribution:
    """An int means Fixed(int); anything with `sample` passes through."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if value < 1:
            raise fail(owner, field, "an int >= 1 or a length distribution", value)
        return Fixed(int(value))
    if not callable(getattr(value, "sample", None)):
        raise fail(
            owner, field, "an int >= 1 or a length distribution (Fixed, LogNormal...)", value
        )
    return value  # type: ignore[return-value]


def draw_lengths(
    owner: str, field: str, dist: LengthDistribution, rng: np.random.Generator, n: int
) -> np.ndarray:
    """`n` lengths from `dist`, checked: a custom distribution may return anything."""
    values = np.asarray(dist.sample(rng, n))
    if values.shape != (n,) or not np.issubdtype(values.dtype, np.integer) or (values < 1).any():
        raise ValueError(f"{owner}.{field}: {dist!r}.sample must return {n} ints >= 1")
    return values.astype(np.int64)


def _starting_at_zero(gaps: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(gaps)])


@dataclass(frozen=True, slots=True)
class Poisson:
    """Memoryless arrivals at `rate` requests per second (exponential gaps)."""

    rate: float

    def __post_init__(self) -> None:
        _put(
            self,
            "rate",
            check_float("Poisson", "rate", self.rate, "a finite float > 0", lambda v: v > 0),
        )

    def arrival_times(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` times from 0 with exponential gaps of mean 1 / rate."""
        return _starting_at_zero(rng.exponential(1.0 / self.rate, size=max(n - 1, 0)))


@dataclass(frozen=True, slots=True)
class Gamma:
    """Gamma-distributed gaps with mean 1 / rate and coefficient of variation `cv`.

    cv = 1 is Poisson; cv > 1 bunches requests into bursts; cv < 1 is more regular.
    """

    rate: float
    cv: float

    def __post_init__(self) -> None:
        _put(
            self,
            "rate",
            check_float("Gamma", "rate", self.rate, "a finite float > 0", lambda v: v > 0),
        )
        _put(self, "cv", check_float("Gamma", "cv", self.cv, "a finite float > 0", lambda v: v > 0))

    def arrival_times(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` times from 0; gaps have shape 1 / cv**2 and scale cv**2 / rate."""
        shape = 1.0 / self.cv**2
        return _starting_at_zero(rng.gamma(shape, 1.0 / (shape * self.rate), size=max(n - 1, 0)))


@dataclass(frozen=True, slots=True)
class Constant:
    """Evenly spaced arrivals, one every 1 / rate seconds."""

    rate: float

    def __post_init__(self) -> None:
        _put(
            self,
            "rate",
            check_float("Constant", "rate", self.rate, "a finite float > 0", lambda v: v > 0),
        )

    def arrival_times(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """0, 1/rate, 2/rate, ..."""
        return np.arange(n, dtype=np.float64) / self.rate


@dataclass(frozen=True, slots=True)
class AllAtOnce:
    """Every request arrives at time 0 (a burst: the whole queue is there from the start)."""

    def arrival_times(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` zeros."""
        return np.zeros(n, dtype=np.float64)
