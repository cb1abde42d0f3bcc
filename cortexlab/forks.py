"""Parallel samples (``SamplingParams(n=k)``): one prefill, k sequences forked from it.

A request with n > 1 gets n - 1 fork requests at submission (ids ``"<id>#1"``..., seeds
``seed + 1``...). They wait, outside every queue, until the parent has computed its whole
prompt. In that step each fork takes the parent's blocks through the allocator's `fork`
(by reference with copy-on-write for `prefix`; by copy for the others) and samples its
first token from the parent's logits row with its own seed, so sample i equals a separate
request seeded ``seed + i`` while the prompt is computed once. A fork that cannot be
forked then (no free seat or blocks) joins the waiting queue as an ordinary request and
computes its own prompt: the tokens are the same, only the sharing is lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cortexlab.request import MAX_SEED, Request, RequestState

if TYPE_CHECKING:
    from cortexlab.schedulers.base import SchedulerState


def make_forks(parent: Request, claim_id) -> list[Request]:
    """The n - 1 fork requests of `parent` (ids claimed through `claim_id`), linked to it."""
    forks = []
    for i in range(1, parent.params.n):
        fork = Request(
            claim_id(f"{parent.request_id}#{i}"),
            parent.prompt_token_ids,
            parent.params,
            prompt=parent.prompt,
            arrival_time=parent.arrival_time,
        )
        fork.seed = (parent.seed + i) % MAX_SEED
        fork.parent = parent
        forks.append(fork)
    parent.forks = tuple(forks)
    return forks


def fork_ready(parent: Request, state: SchedulerState, now: float) -> tuple[list, list]:
    """Fork `parent`'s waiting forks now that its prompt is computed.

    Returns (forked, released): forked requests are RUNNING, hold the parent's blocks and
    have the prompt computed; released ones could not be forked and must join the waiting
    queue. Call before the parent's own `num_computed_tokens` advances past this step.
    """
    allocator = state.allocator
    can_fork = getattr(allocator, "can_fork", None)
    forked, released = [], []
    for fork in parent.forks:
        if fork.state is not RequestState.WAITING or fork.block_table:
            continue
        seat = len(state.running) < state.config.max_num_seqs
        if seat and can_fork is not None and can_fork(parent, fork):
            allocator.fork(parent, fork)
            fork.num_computed_tokens = parent.num_prompt_tokens
            fork.transition(RequestState.RUNNING, now)
            state.running.append(fork)
            forked.append(fork)
        else:
            released.append(fork)
    return forked, released


def unforked(parent: Request) -> list[Request]:
    """Forks of `parent` still waiting to be forked (never queued, holding nothing)."""
    return [f for f in parent.forks if f.state is RequestState.WAITING and not f.block_table]
