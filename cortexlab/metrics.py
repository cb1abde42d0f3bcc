"""Serving metrics, defined once: latencies, throughput, goodput under an SLO, fairness.

Definitions (seconds on the engine clock; "steps" variants count engine steps). Step counts
are deterministic when arrivals do not depend on timing (a burst, or requests submitted
between steps); with timed arrivals on the measured clock, the step a request arrives in
depends on how long earlier steps took, so they move by a step or so run to run. They match vLLM's benchmark definitions where the
two overlap (TTFT, TPOT, ITL, E2E, request and output-token throughput, goodput):

- ``queue_delay``: arrival -> first scheduled.
- ``ttft`` (time to first token): arrival -> first output token.
- ``tpot`` (time per output token): (E2E - TTFT) / (output tokens - 1), per request;
  undefined (NaN) for requests with fewer than two tokens.
- ``itl`` (inter-token latency): every gap between consecutive output tokens of a request,
  pooled over all requests (so long requests weigh more than in TPOT).
- ``e2e``: arrival -> finish.  ``normalized_latency``: E2E / output tokens (Orca, vLLM papers).
- Latency statistics (mean, p50, p90, p99 with numpy's default linear interpolation) are
  over finished requests only, as vLLM's are over successful ones: a request that failed or
  was cancelled early would otherwise make a policy look faster.
- ``*_steps``: the same spans in engine steps. TTFT and E2E count the step where a request
  arrived and the step where the event happened (TTFT of a request prefilled in its arrival
  step = 1); ``queue_delay_steps`` counts the steps it waited before one scheduled it (0 if
  scheduled in its arrival step); ``tpot_steps`` is (finish step - first-token step) /
  (output tokens - 1), 1.0 for a request that decoded every step.
- ``throughput_rps`` / ``output_tps``: finished requests / their output tokens per second of
  the run, from the first arrival to the last finish.
- ``goodput``: requests that finished within every SLO bound given (inclusive, e.g.
  TTFT <= 1 s and TPOT <= 0.1 s); ``goodput_share`` of all requests and ``goodput_rps`` per
  second. Failed and cancelled requests never count as good; a one-token request has no
  TPOT and cannot violate a TPOT bound (vLLM counts its TPOT as 0).
- ``service`` per tenant: prompt tokens x 1 (for requests that were ever scheduled) + output
  tokens x 2 (VTC's default weights, Sheng et al., OSDI 2024). ``service_gap``: the paper's
  fairness measure, max over tenant pairs and over intervals of consecutive steps in which
  both tenants have unfinished arrived requests, of |service(a) - service(b)| received in
  the interval; here a step serves a tenant 1 per prefill (or recomputed) token and 2 per
  decode token the model processes, as the `fair` scheduler charges. A fair scheduler keeps
  it bounded.
- KV slots (`kv_breakdown`, `kv_waste`): after each step every slot of the arena is exactly
  one of holding (a real token), reserved (held by a sequence, no token yet, not internal),
  internal (internal fragmentation: the unused tail of a sequence's last block, and buddy's
  rounding past its maximum), cached (prefix cache, unreferenced, evictable), external
  (external fragmentation: free or cached slots the first waiting request could not be
  given under the allocator's policy, counted here within free), free (the rest).
  ``kv_waste`` averages each share of all slots over the steps with at least one running
  sequence; ``token_utilization`` is holding / (holding + reserved + internal), the share
  of allocated slots that hold tokens (the PagedAttention paper's measure).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import combinations

import numpy as np
import pandas as pd

LATENCIES = ("queue_delay", "ttft", "tpot", "itl", "e2e", "normalized_latency")
STEP_LATENCIES = ("queue_delay_steps", "ttft_steps", "tpot_steps", "e2e_steps")
STATISTICS = ("mean", "p50", "p90", "p99")
PREFILL_WEIGHT, DECODE_WEIGHT = 1.0, 2.0
SLO_METRICS = ("ttft", "tpot", "e2e", "itl_max", "normalized_latency")


def _stats(values: Iterable[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return dict.fromkeys(STATISTICS, float("nan")) | {"count": 0}
    # numpy's default (linear interpolation between the closest ranks), as vLLM reports.
    p50, p90, p99 = (float(p) for p in np.percentile(v, [50, 90, 99]))
    return {"mean": float(v.mean()), "p50": p50, "p90": p90, "p99": p99, "count": int(v.size)}


def check_slo(slo: Mapping[str, float] | None) -> dict[str, float]:
    """The SLO as {metric: bound}, or ValueError naming the bad key or bound."""
    if slo is None:
        return {}
    if not isinstance(slo, Mapping):
        raise ValueError(f"slo must be a dict like {{'ttft': 1.0, 'tpot': 0.1}}, got {slo!r}")
    for key, bound in slo.items():
        if key not in SLO_METRICS:
            raise ValueError(f"slo key {key!r} is not one of {', '.join(SLO_METRICS)}")
        if isinstance(bound, bool) or not isinstance(bound, int | float) or not bound > 0:
            raise ValueError(f"slo[{key!r}] must be a number > 0, got {bound!r}")
    return dict(slo)


def per_request(requests: pd.DataFrame, token_times: Mapping) -> pd.DataFrame:
    """The requests table plus the derived per-request columns used below."""
    df = requests.copy()
    if df.empty:
        return df
    n = df["num_output_tokens"].replace(0, np.nan)
    df["normalized_latency"] = df["e2e"] / n
    df["itl_max"] = [
        float(np.max(np.diff(token_times.get(r, ())))) if len(token_times.get(r, ())) > 1 else 0.0
        for r in df["request_id"]
    ]
    for name, start, end, extra in (
        ("queue_delay_steps", "arrival_step", "first_scheduled_step", 0),
        ("ttft_steps", "arrival_step", "first_token_step", 1),
        ("e2e_steps", "arrival_step", "finish_step", 1),
    ):
        if start in df and end in df:
            df[name] = df[end] - df[start] + extra
    if "first_token_step" in df and "finish_step" in df:
        df["tpot_steps"] = (df["finish_step"] - df["first_token_step"]) / (n - 1).where(n > 1)
    return df


def is_good(df: pd.DataFrame, slo: Mapping[str, float]) -> pd.Series:
    """Per request: finished, and within every SLO bound."""
    good = df["state"] == "finished"
    for key, bound in slo.items():
        # A request with one token has no TPOT: it cannot violate a TPOT bound.
        good &= df[key].fillna(0.0) <= bound
    return good


def service_by_tenant(requests: pd.DataFrame) -> pd.Series:
    """Weighted tokens served per tenant (prompt x 1 + output x 2)."""
    if requests.empty:
        return pd.Series(dtype=float)
    prompt = requests["num_prompt_tokens"]
    if "first_scheduled_time" in requests:
        # A request never scheduled (cancelled while queued, failed on submit) got no prefill.
        prompt = prompt.where(requests["first_scheduled_time"].notna(), 0)
    service = PREFILL_WEIGHT * prompt + DECODE_WEIGHT * requests["num_output_tokens"]
    return service.groupby(requests["tenant"]).sum().astype(float)


def service_gap(requests: pd.DataFrame, steps: pd.DataFrame) -> float:
    """Largest service difference between two tenants over an interval both stayed backlogged."""
    if requests.empty or steps.empty or "request_ids" not in steps or requests.tenant.nunique() < 2:
        return float("nan")
    tenant_of = dict(zip(requests.request_id, requests.tenant, strict=True))
    tenants = sorted(set(tenant_of.values()))
    index = {t: i for i, t in enumerate(tenants)}
    num_steps = int(steps["step"].max()) + 1
    served = np.zeros((num_steps, len(tenants)))
    for step, ids, counts, prefill in zip(
        steps["step"],
        steps["request_ids"],
        steps["num_new_tokens"],
        steps["is_prefill"],
        strict=True,
    ):
        if not isinstance(ids, list):
            continue  # an empty step
        for rid, n, p in zip(ids, counts, prefill, strict=True):
            if rid in tenant_of:
                served[step, index[tenant_of[rid]]] += n * (PREFILL_WEIGHT if p else DECODE_WEIGHT)
    backlog = np.zeros((num_steps, len(tenants)), dtype=bool)
    for tenant, start, end in zip(
        requests.tenant, requests.arrival_step, requests.finish_step, strict=True
    ):
        if np.isfinite(start):
            stop = int(end) + 1 if np.isfinite(end) else num_steps
            backlog[int(start) : stop, index[tenant]] = True
    # Sheng et al.'s measure: over any interval in which both stay backlogged, the spread
    # (max - min) of the running difference of their service. A difference does not carry
    # from one backlogged interval to the next: VTC lifts a returning tenant's counter.
    gap = 0.0
    for a, b in combinations(range(len(tenants)), 2):
        both = backlog[:, a] & backlog[:, b]
        running = low = high = 0.0
        for step in range(num_steps):
            if not both[step]:
                running = low = high = 0.0
                continue
            running += served[step, a] - served[step, b]
            low, high = min(low, running), max(high, running)
            gap = max(gap, high - low)
    return gap


KV_PARTS = ("holding", "reserved", "internal", "cached", "external", "free")


def kv_breakdown(steps: pd.DataFrame) -> pd.DataFrame:
    """Per step with KV columns: its slots split into `KV_PARTS` plus num_slots (each row sums
    to it). Reads the engine's ``kv_*`` step columns; older traces without kv_internal_slots,
    kv_cached_slots or kv_external_slots give kv_fragmented_slots, 0 and 0."""
    required = ["kv_used_slots", "kv_reserved_slots", "kv_free_slots"]
    missing = [c for c in required if c not in steps.columns]
    if missing:
        raise ValueError(f"the steps table lacks KV column(s) {missing}")
    rows = steps.dropna(subset=required)

    def column(name: str, *older: str) -> pd.Series:
        for c in (name, *older):
            if c in rows.columns:
                return rows[c].astype(float).fillna(0.0)
        return pd.Series(0.0, index=rows.index)

    used, reserved, free = (rows[c].astype(float) for c in required)
    internal = column("kv_internal_slots", "kv_fragmented_slots")
    cached = column("kv_cached_slots")
    total = used + reserved + cached + free
    if "kv_num_slots" in rows.columns:
        total = rows["kv_num_slots"].astype(float).fillna(total)
    # The engine's count may include cached slots; a plot can only carve it out of free.
    external = np.minimum(column("kv_external_slots").clip(lower=0.0), free)
    return pd.DataFrame(
        {
            "holding": used,
            "reserved": reserved - internal,
            "internal": internal,
            "cached": cached,
            "external": external,
            "free": total - used - reserved - cached - external,
            "num_slots": total,
        },
        index=rows.index,
    )


def kv_waste(steps: pd.DataFrame) -> dict[str, float]:
    """Mean (and peak) share of KV slots per `KV_PARTS` over the steps with a running
    sequence, token_utilization, and the prefix cache's hit rate, evictions and sharing."""
    parts = kv_breakdown(steps)
    rows = steps.loc[parts.index]
    if "num_running" in rows.columns:
        busy = rows["num_running"].fillna(0).to_numpy() > 0
    else:  # a hand-made table: a step that holds something had a sequence running
        busy = (parts["holding"] + parts["reserved"] + parts["internal"]).to_numpy() > 0
    parts = parts[busy]
    shares = parts[list(KV_PARTS)].div(parts["num_slots"].where(parts["num_slots"] > 0), axis=0)
    held = parts["holding"] + parts["reserved"] + parts["internal"]
    token_utilization = parts["holding"] / held.where(held > 0)
    names = {p: f"{p}_share" for p in KV_PARTS} | {"holding": "utilization"}
    out = {names[p]: _mean(shares[p]) for p in KV_PARTS}
    out["token_utilization"] = _mean(token_utilization)
    for p in ("holding", "reserved", "internal", "external", "cached"):
        out[f"peak_{names[p]}"] = float(shares[p].max()) if len(shares) else float("nan")
    out["num_busy_steps"] = float(len(parts))
    # The largest batch the arena sustained: how many sequences held blocks at once.
    running = steps["num_running"].dropna() if "num_running" in steps.columns else ()
    out["max_num_running"] = float(running.max()) if len(running) else float("nan")

    def total(column: str) -> float:  # a cumulative count: its last (largest) value
        values = steps[column].dropna() if column in steps.columns else ()
        return float(values.max()) if len(values) else float("nan")

    lookups = total("kv_lookup_tokens")
    out["hit_tokens"] = total("kv_hit_tokens")
    out["hit_rate"] = total("kv_hit_tokens") / lookups if lookups > 0 else float("nan")
    out["evicted_blocks"] = total("kv_evicted_blocks")
    sharing = steps["kv_max_sharing"] if "kv_max_sharing" in steps.columns else pd.Series()
    out["max_sharing"] = float(sharing.max()) if sharing.notna().any() else float("nan")
    return out


def _mean(values: pd.Series) -> float:
    values = values.dropna()
    return float(values.mean()) if len(values) else float("nan")


def metrics_table(
    requests: pd.DataFrame,
    steps: pd.DataFrame,
    token_times: Mapping,
    *,
    slo: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """One row per statistic (mean, p50, p90, p99, count): latencies in seconds and steps,
    then throughput, goodput, preemptions and per-tenant service (in the `mean` column)."""
    slo = check_slo(slo)
    df = per_request(requests, token_times)
    rows: dict[str, dict] = {}
    if df.empty:
        return pd.DataFrame(columns=[*STATISTICS, "count"])
    finished = df[df["state"] == "finished"]
    itl = [g for r in finished["request_id"] for g in np.diff(token_times.get(r, ()))]
    for name in LATENCIES:
        rows[name] = _stats(itl if name == "itl" else finished[name])
    for name in STEP_LATENCIES:
        if name in df:
            rows[name] = _stats(finished[name])
    for name, value in scalars(df, steps, slo).items():
        rows[name] = {"mean": value, "count": len(df)}
    table = pd.DataFrame.from_dict(rows, orient="index")[[*STATISTICS, "count"]]
    table.index.name = "metric"
    return table


def scalars(df: pd.DataFrame, steps: pd.DataFrame, slo: Mapping[str, float]) -> dict[str, float]:
    """Run-level numbers: counts, duration, throughput, goodput, preemptions, fairness."""
    finished = df[df["state"] == "finished"]
    start = df["arrival_time"].min()
    end = df["finish_time"].max()
    duration = float(end - start) if np.isfinite(end - start) and end > start else float("nan")
    out = {
        "num_requests": float(len(df)),
        "num_finished": float(len(finished)),
        "num_failed": float((df["state"] == "failed").sum()),
        "num_cancelled": float((df["state"] == "cancelled").sum()),
        "duration": duration,
        "throughput_rps": len(finished) / duration,
        "output_tps": float(finished["num_output_tokens"].sum()) / duration,
        "num_preemptions": float(df["num_preemptions"].sum()),
    }
    if slo:
        good = is_good(df, slo)
        out["goodput_share"] = float(good.mean())
        out["goodput_rps"] = float(good.sum()) / duration
    for tenant, service in service_by_tenant(df).items():
        out[f"service[{tenant}]"] = service
    if df["tenant"].nunique() > 1 and "arrival_step" in df:
        out["service_gap"] = service_gap(df, steps)
    return out


def summary_row(
    requests: pd.DataFrame,
    steps: pd.DataFrame,
    token_times: Mapping,
    *,
    slo: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The metrics table flattened to one dict (`ttft_p50`, `throughput_rps`, ...)."""
    return flatten(metrics_table(requests, steps, token_times, slo=slo))


def flatten(table: pd.DataFrame) -> dict[str, float]:
    """A `metrics_table` as one dict: ``<latency>_<statistic>`` and the run-level scalars."""
    row: dict[str, float] = {}
    for name, stats in table.iterrows():
        if pd.isna(stats["p50"]) and stats["count"] and name not in LATENCIES:
            row[name] = float(stats["mean"])
        else:
            for s in STATISTICS:
                row[f"{name}_{s}"] = float(stats[s])
    return row
