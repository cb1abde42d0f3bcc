"""Sarathi-Serve's stall-free batching: decodes first, prefill chunks fill the rest."""

from __future__ import annotations

from cortexlab.schedulers import register
from cortexlab.schedulers.base import BaseScheduler, Batch, SchedulerState


@register("sarathi")
class SarathiScheduler(BaseScheduler):
    """Stall-free batching with chunked prefills (Agrawal et al. 2024, "Taming
    Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve", OSDI 2024).

    Every step first gives each running decode its one token, so a long prompt never
    stalls generation; then running prefills (chunked, or recomputing after preemption)
    continue oldest first, and waiting requests join in arrival order, their prompt
    chunks filling whatever remains of the per-step token budget. Requests are admitted
    only while every running one could still get a token within the budget, which is what
    keeps the stall-free promise. Memory is found by preempting (recompute) the newest
    running request not yet in the step's batch, as vLLM does. Chunked prefill is the
    policy, so it refuses to run with ``enable_chunked_prefill=False`` (a prompt longer
    than the budget would otherwise wait forever).

    Args:
        token_budget: tokens per step (int >= 1); None uses the engine's
            `max_num_batched_tokens`, and a larger value is capped by it. Sarathi-Serve
            picks it from a latency SLO: smaller budgets mean shorter steps.
    """

    def __init__(self, *, token_budget: int | None = None) -> None:
        if token_budget is not None and (
            isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1
        ):
            raise ValueError(f"token_budget must be None or an int >= 1, got {token_budget!r}")
        self.token_budget = token_budget

    def budget(self, state: SchedulerState) -> int:
        """This step's token budget: `token_budget` capped by the engine's limit."""
        limit = state.config.max_num_batched_tokens
        return limit if self.token_budget is None else min(self.token_budget, limit)

    def check_config(self, config) -> None:
        """Refuse ``enable_chunked_prefill=False``: chunked prefill is this policy."""
        if not config.enable_chunked_prefill:
            raise ValueError(
                "the sarathi scheduler needs enable_chunked_prefill=True: its prefills are "
                "chunks that fill each step's token budget"
            )

    def schedule(self, state: SchedulerState) -> Batch:
        """Decodes, then ongoing prefills, then new prefills, within the token budget."""
        self.check_config(state.config)
        batch = Batch()
        budget = self.budget(state)
        # The admission rule below keeps len(running) <= budget, so decodes always fit.
        decodes = [r for r in state.running if not r.is_prefill]
        prefills = [r for r in state.running if r.is_prefill]
        budget = self.continue_running(state, batch, budget, order=[*decodes, *prefills])
        if not batch.preempted:  # memory is short: admit nobody new this step
            # At most one running request per budget token, so every decode fits next step.
            max_num_running = min(state.config.max_num_seqs, self.budget(state))
            self.admit_in_order(state, batch, budget, max_num_running=max_num_running)
        return batch
