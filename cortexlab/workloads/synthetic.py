"""Generated workloads: an arrival process, length distributions, tenants and priorities."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cortexlab.workloads.distributions import (
    AllAtOnce,
    ArrivalProcess,
    Constant,
    Gamma,
    LengthDistribution,
    LogNormal,
    Poisson,
    as_length,
    check_int,
    draw_lengths,
    fail,
)
from cortexlab.workloads.workload import (
    STREAM_ARRIVALS,
    STREAM_OUTPUT_LEN,
    STREAM_PRIORITY,
    STREAM_PROMPT_LEN,
    STREAM_TENANT,
    Workload,
    WorkloadRequest,
)

import numpy as np

# Small enough for two CPU cores and the tiny model's 2048-token context (512 + 128 + room
# for a system prompt), long-tailed like real chat traffic.
DEFAULT_NUM_REQUESTS = 32
DEFAULT_PROMPT_LEN = LogNormal(median=64, sigma=0.7, low=8, high=512)
DEFAULT_OUTPUT_LEN = LogNormal(median=32, sigma=0.6, low=4, high=128)

Length = int | LengthDistribution
Weights = Mapping[Any, float] | Sequence[Any] | None


def _weights(
    field: str, value: Weights, check_key: Callable[[object], Any]
) -> tuple[list, np.ndarray] | None:
    """Keys and normalised weights from a dict key -> weight, or a list (equal weights)."""
    if value is None:
        return None
    rule = "None, a non-empty dict of key -> weight >= 0 (positive sum), or a list of distinct keys"
    if isinstance(value, Mapping):
        keys, weights = list(value.keys()), list(value.values())
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        keys, weights = list(value), [1.0] * len(value)
    else:
        raise fail("workload", field, rule, value)
    ok = all(
        isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        for w in weights
    )
    keys = [check_key(k) for k in keys]
    if not keys or not ok or sum(weights) <= 0 or len(set(keys)) != len(keys):
        raise fail("workload", field, rule, value)
    return keys, np.asarray(weights, dtype=np.float64) / sum(weights)


def _tenant_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise fail("workload", "tenants", "keyed by non-empty str tenant names", name)
    return name


def _priority(value: object) -> int:
    return check_int("workload", "priorities", value, "keyed by int priorities")


def generate(
    arrivals: ArrivalProcess,
    *,
    num_requests: int = DEFAULT_NUM_REQUESTS,
    prompt_len: Length = DEFAULT_PROMPT_LEN,
    output_len: Length = DEFAULT_OUTPUT_LEN,
    tenants: Weights = None,
    priorities: Weights = None,
    system_prompt_len: int = 0,
    seed: int = 0,
) -> Workload:
    """A seeded workload: `num_requests` arrivals from `arrivals` with drawn lengths.

    `prompt_len` draws each request's own prompt text; a shared system prompt of
    `system_prompt_len` tokens goes in front of it, so the table's prompt_len is the sum.
    `tenants` ({name: weight} or a list) and `priorities` ({int: weight} or a list) are
    assigned at random by weight. Each aspect draws from its own stream of `seed`, so e.g.
    changing the tenants keeps the arrival times and lengths.
    """
    if not callable(getattr(arrivals, "arrival_times", None)):
        raise fail("workload", "arrivals", "an arrival process (Poisson, Gamma, ...)", arrivals)
    n = check_int("workload", "num_requests", num_requests, "an int >= 1", lambda v: v >= 1)
    seed = check_int("workload", "seed", seed, "an int >= 0", lambda v: v >= 0)
    shared = check_int(
        "workload", "system_prompt_len", system_prompt_len, "an int >= 0", lambda v: v >= 0
    )
    prompt_dist = as_length("workload", "prompt_len", prompt_len)
    output_dist = as_length("workload", "output_len", output_len)
    tenant_weights = _weights("tenants", tenants, _tenant_name)
    priority_weights = _weights("priorities", priorities, _priority)

    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([seed, stream])

    times = np.asarray(arrivals.arrival_times(rng(STREAM_ARRIVALS), n), dtype=np.float64)
    if times.shape != (n,) or not np.isfinite(times).all() or (times < 0).any():
        raise ValueError(f"workload.arrivals: {arrivals!r} must return {n} finite times >= 0")
    prompts = draw_lengths("workload", "prompt_len", prompt_dist, rng(STREAM_PROMPT_LEN), n)
    outputs = draw_lengths("workload", "output_len", output_dist, rng(STREAM_OUTPUT_LEN), n)
    tenant_of = ["default"] * n
    if tenant_weights is not None:
        names, p = tenant_weights
        tenant_of = [names[i] for i in rng(STREAM_TENANT).choice(len(names), size=n, p=p)]
    priority_of = [0] * n
    if priority_weights is not None:
        levels, p = priority_weights
        priority_of = [levels[i] for i in rng(STREAM_PRIORITY).choice(len(levels), size=n, p=p)]
    requests = [
        WorkloadRequest(
            index=i,
            arrival_time=float(times[i]),
            prompt_len=shared + int(prompts[i]),
            output_len=int(outputs[i]),
            tenant=tenant_of[i],
            priority=priority_of[i],
        )
        for i in range(n)
    ]
    return Workload(
        requests, name=repr(arrivals), seed=seed, system_prompt_len=shared, arrivals=arrivals
    )


def poisson(rate: float, **options: Any) -> Workload:
    """Poisson arrivals at `rate` requests per second; `options` as for `generate`."""
    return generate(Poisson(rate), **options)


def gamma(rate: float, cv: float, **options: Any) -> Workload:
    """Gamma gaps at mean `rate`/s with coefficient of variation `cv` (> 1: bursty); `options`
    as for `generate`."""
    return generate(Gamma(rate, cv), **options)


def constant(rate: float, **options: Any) -> Workload:
    """One arrival every 1 / `rate` seconds; `options` as for `generate`."""
    return generate(Constant(rate), **options)


def burst(num_requests: int = DEFAULT_NUM_REQUESTS, **options: Any) -> Workload:
    """Every request arrives at time 0 (an offline batch); `options` as for `generate`."""
    return generate(AllAtOnce(), num_requests=num_requests, **options)
