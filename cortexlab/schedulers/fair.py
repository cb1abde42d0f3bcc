"""Virtual Token Counter: per-tenant fair sharing of served tokens."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from cortexlab.request import Request
from cortexlab.schedulers import register
from cortexlab.schedulers.base import BaseScheduler, Batch, SchedulerState


def _check_weight(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not (0 < value and math.isfinite(value))
    ):
        raise ValueError(f"{name} must be a finite real > 0, got {value!r}")
    return float(value)


@register("fair")
class VTCScheduler(BaseScheduler):
    """Virtual Token Counter (Sheng et al. 2024, "Fairness in Serving Large Language
    Models", OSDI 2024), keyed by `SamplingParams.tenant`.

    Each tenant has a counter of the service it received: `input_weight` per prefill
    token (prompt, or recomputed after preemption) and `output_weight` per decode token
    the model processes for it, divided by the tenant's weight. Running requests continue
    oldest first; then, while a request fits, the tenant with the smallest counter among
    those with waiting requests admits its oldest one. A tenant that becomes backlogged
    again has its counter lifted to the smallest counter of the tenants already queued (or,
    if none is, of the tenants running), so idle time earns no credit. For two backlogged
    tenants the paper bounds the service gap over any interval by
    ``2 * max(input_weight * L_input, output_weight * M)``, with L_input the longest prompt
    and M the most tokens a running batch holds. When memory is short, the newest running
    request of the tenant with the largest counter is preempted (recompute).

    Args:
        input_weight: cost of a prefill token (the paper's w_p; > 0).
        output_weight: cost of a decode token (the paper's w_q; > 0; 2 in its experiments).
        tenant_weights: tenant -> share weight (> 0); a tenant of weight 2 is entitled to
            twice the service. Unlisted tenants weigh 1.
    """

    def __init__(
        self,
        *,
        input_weight: float = 1.0,
        output_weight: float = 2.0,
        tenant_weights: Mapping[str, float] | None = None,
    ) -> None:
        self.input_weight = _check_weight("input_weight", input_weight)
        self.output_weight = _check_weight("output_weight", output_weight)
        weights = dict(tenant_weights or {})
        for tenant, weight in weights.items():
            if not isinstance(tenant, str) or not tenant:
                raise ValueError(f"tenant_weights keys must be non-empty str, got {tenant!r}")
            weights[tenant] = _check_weight(f"tenant_weights[{tenant!r}]", weight)
        self.tenant_weights = weights
        self.counters: dict[str, float] = {}
        self._queued: set[str] = set()  # tenants with waiting requests after the last step

    def charge(self, request: Request, num_new_tokens: int) -> None:
        """Add the cost of serving `num_new_tokens` of `request` to its tenant's counter."""
        weight = self.input_weight if request.is_prefill else self.output_weight
        tenant = request.params.tenant
        self.counters[tenant] += weight * num_new_tokens / self.tenant_weights.get(tenant, 1.0)

    def victim(self, state: SchedulerState, request: Request, batch: Batch) -> Request:
        """The newest unscheduled running request of the tenant with the largest counter."""
        scheduled = {id(s.request) for s in batch.scheduled}
        candidates = [r for r in state.running if id(r) not in scheduled]
        # max() keeps the first of equal keys, so walk newest first.
        return max(reversed(candidates), key=lambda r: self.counters[r.params.tenant])

    def schedule(self, state: SchedulerState) -> Batch:
        """Running requests first, then admissions from the least-served tenant."""
        queues: dict[str, list[Request]] = {}
        for request in state.waiting:
            queues.setdefault(request.params.tenant, []).append(request)
        running_tenants = {r.params.tenant for r in state.running}
        self._lift(queues, running_tenants)
        batch = Batch()
        budget = self.continue_running(
            state, batch, state.config.max_num_batched_tokens, on_scheduled=self.charge
        )
        if not batch.preempted:
            heads = {tenant: 0 for tenant in queues}  # index of each tenant's next request
            while heads and budget and len(state.running) < state.config.max_num_seqs:
                tenant = min(heads, key=self.counters.__getitem__)
                request = queues[tenant][heads[tenant]]
                n = self.chunk(state, request, budget)
                if not n or not self.can_admit(state, request, n):
                    break  # no overtaking: the least-served tenant's request goes first
                n = self.admit(state, request, n)
                self.charge(request, n)
                batch.add(request, n)
                budget -= n
                heads[tenant] += 1
                if heads[tenant] == len(queues[tenant]):
                    del heads[tenant]
        self._queued = {r.params.tenant for r in state.waiting}
        return batch

    def _lift(self, queues: dict[str, list[Request]], running_tenants: set[str]) -> None:
        """Give newly backlogged tenants a counter; lift them so idle time earns nothing."""
        still_queued = [self.counters[t] for t in self._queued if t in queues]
        for tenant in queues:
            self.counters.setdefault(tenant, 0.0)
        for tenant in running_tenants:
            self.counters.setdefault(tenant, 0.0)
        for tenant in queues.keys() - self._queued:
            others = still_queued or [self.counters[t] for t in running_tenants - {tenant}]
            if others:
                self.counters[tenant] = max(self.counters[tenant], min(others))
        # Forget tenants with nothing queued whose counter a lift would overwrite anyway,
        # so a long run with many short-lived tenants keeps its memory flat.
        present = queues.keys() | running_tenants
        if len(self.counters) > len(present):
            floor = min((self.counters[t] for t in present), default=math.inf)
            self.counters = {t: c for t, c in self.counters.items() if t in present or c > floor}
