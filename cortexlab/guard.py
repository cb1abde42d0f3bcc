"""What the engine refuses: broken policy output, stalls, and impossible configurations.

Policies are user code (a notebook cell), and a broken one must fail loudly at the step
where it breaks a rule, naming the policy and the rule, before anything reaches the arena.
The checks cost O(tokens in the batch + blocks held by running requests); the engine runs
them every step unless built with ``check_policies=False``.
"""

from __future__ import annotations

import numbers
import os
import time
from collections import Counter
from itertools import chain
from typing import Any

from cortexlab.request import Request, RequestState
from cortexlab.schedulers.base import Batch, ScheduledSeq, SchedulerState


class EngineError(RuntimeError):
    """A step failed; every request it hit has failed with this error recorded on it."""


class PolicyError(EngineError):
    """A scheduler or allocator broke the engine's contract (or raised)."""

    def __init__(self, policy: object, rule: str) -> None:
        self.policy = policy_name(policy)
        self.rule = rule
        super().__init__(f"{self.policy}: {rule}")


class StepError(EngineError):
    """A step failed outside the policies (forward pass, sampler, detokenizer)."""


class StallError(EngineError):
    """Steps kept running with nothing scheduled and nothing able to change that."""


def policy_name(policy: object) -> str:
    """A policy's class name, or the function's name for a plain-function policy."""
    fn = getattr(policy, "fn", None)  # FunctionScheduler and FunctionStage wrap a function
    if callable(fn):
        return getattr(fn, "__qualname__", repr(fn))
    return type(policy).__qualname__


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_batch(batch: Any, state: SchedulerState, scheduler: object) -> None:
    """Raise PolicyError unless `batch` is something the engine can run as it stands."""

    def broke(rule: str) -> PolicyError:
        return PolicyError(scheduler, rule)

    if not isinstance(batch, Batch):
        raise broke(f"schedule() must return a Batch, got {type(batch).__name__}")
    config = state.config
    running = {id(r) for r in state.running}
    if len(running) > config.max_num_seqs:
        raise broke(
            f"{len(running)} requests are running but max_num_seqs is {config.max_num_seqs}"
        )
    seen: set[int] = set()
    num_tokens = 0
    for s in batch.scheduled:
        if not isinstance(s, ScheduledSeq) or not isinstance(s.request, Request):
            raise broke(f"Batch.scheduled must hold ScheduledSeq(request, n), got {s!r}")
        r, n = s.request, s.num_new_tokens
        if id(r) in seen:
            raise broke(f"request {r.request_id!r} is scheduled twice in one step")
        seen.add(id(r))
        if r.state is not RequestState.RUNNING or id(r) not in running:
            raise broke(
                f"request {r.request_id!r} is scheduled while {r.state.name} and "
                f"{'in' if id(r) in running else 'not in'} state.running; admit it first "
                f"(allocate its blocks and move it to running)"
            )
        if not _is_int(n) or not 1 <= n <= r.num_uncomputed_tokens:
            raise broke(
                f"request {r.request_id!r} is scheduled for num_new_tokens={n!r}; it must be an "
                f"int in [1, {r.num_uncomputed_tokens}] (its uncomputed tokens)"
            )
        num_tokens += n
    if len(batch.scheduled) > config.max_num_seqs:
        raise broke(
            f"the batch holds {len(batch.scheduled)} sequences; max_num_seqs is "
            f"{config.max_num_seqs}"
        )
    if num_tokens > config.max_num_batched_tokens:
        raise broke(
            f"the batch holds {num_tokens} tokens; max_num_batched_tokens is "
            f"{config.max_num_batched_tokens}"
        )


def check_block_tables(batch: Batch, state: SchedulerState, allocator: object) -> None:
    """Raise PolicyError unless every block the batch reads or writes is valid and owned.

    Ids lie in [0, num_blocks); each scheduled request's table covers the positions it
    writes; a block written this step belongs to no other running request; a block read
    by several requests is allowed only from allocators that share blocks by reference
    (``can_share_blocks = True``).
    """
    bs, num_blocks = allocator.block_size, allocator.num_blocks
    can_share = bool(getattr(allocator, "can_share_blocks", False))
    # Fast path in C (min, max, set) over every block held; the slow loop below only runs
    # to name the culprit once something is wrong.
    held = list(chain.from_iterable(r.block_table for r in state.running))
    is_ok = (
        not held
        or set(map(type, held)) == {int}
        and min(held) >= 0
        and max(held) < num_blocks
        and (
            len(set(held)) == len(held)
            if not can_share
            else all(len(set(r.block_table)) == len(r.block_table) for r in state.running)
        )
    )
    if not is_ok:
        _find_bad_blocks(state, allocator, num_blocks, can_share)
    written: dict[int, Any] = {}
    for s in batch.scheduled:
        r = s.request
        end = r.num_computed_tokens + s.num_new_tokens
        table = r.block_table
        if len(table) * bs < end:
            raise PolicyError(
                allocator,
                f"request {r.request_id!r} is scheduled up to position {end} but its block "
                f"table holds {len(table)} block(s) of {bs} slots; grow it (append) before "
                f"scheduling",
            )
        if can_share:
            for b in table[r.num_computed_tokens // bs : -(-end // bs)]:
                written[b] = r
    # A written block held by more than one table (each holds a block at most once) is read
    # by someone else; counting in C keeps the common all-clear case cheap.
    counts = Counter(held) if can_share and written else {}
    if any(counts[b] > 1 for b in written if counts):
        for r in state.running:
            for b in r.block_table:
                w = written.get(b)
                if w is not None and w is not r:
                    raise PolicyError(
                        allocator,
                        f"request {w.request_id!r} writes block {b}, which request "
                        f"{r.request_id!r} also reads (copy it on write first)",
                    )


def _find_bad_blocks(state: SchedulerState, allocator: object, num_blocks: int, can_share: bool):
    owner: dict[int, Any] = {}
    for r in state.running:
        table = r.block_table
        for b in table:
            if not _is_int(b) or not 0 <= b < num_blocks:
                raise PolicyError(
                    allocator,
                    f"request {r.request_id!r} holds block id {b!r}, outside the arena's "
                    f"[0, {num_blocks})",
                )
            other = owner.setdefault(b, r)
            if other is not r and not can_share:
                raise PolicyError(
                    allocator,
                    f"block {b} is handed to both request {other.request_id!r} and request "
                    f"{r.request_id!r}",
                )
        if len(set(table)) != len(table):
            raise PolicyError(allocator, f"request {r.request_id!r} holds a block twice: {table}")


class ProgressWatch:
    """Notices when steps keep scheduling nothing while requests wait and nothing changes.

    A step "changes something" when its batch is non-empty or the queues, the allocator's
    free blocks or the pending arrivals differ from the previous step. Stalled means no
    change for at least `min_steps` steps spanning at least `timeout` seconds of real time
    (time matters: a policy may be waiting for the clock).
    """

    def __init__(self, *, timeout: float, min_steps: int = 100) -> None:
        self.timeout = timeout
        self.min_steps = min_steps
        self._signature: tuple | None = None
        self._since = 0.0
        self._num_steps = 0

    def reset(self) -> None:
        """Progress happened."""
        self._signature = None

    def is_stalled(self, signature: tuple) -> bool:
        """Record an empty step with this state signature; True once stalled."""
        if signature != self._signature:
            self._signature, self._since, self._num_steps = signature, time.perf_counter(), 0
            return False
        self._num_steps += 1
        return (
            self._num_steps >= self.min_steps and time.perf_counter() - self._since >= self.timeout
        )

    def explain(self, state: SchedulerState, scheduler: object) -> str:
        """Why the stuck requests are stuck, as far as the engine can tell."""
        allocator = state.allocator
        words = [
            f"no progress in {self._num_steps} steps over "
            f"{time.perf_counter() - self._since:.1f} s: {policy_name(scheduler)} scheduled "
            f"nothing while {len(state.waiting)} request(s) wait and {len(state.running)} run "
            f"({policy_name(allocator)}: {allocator.num_free_blocks} of "
            f"{allocator.num_blocks} blocks free)"
        ]
        if state.waiting:
            head = state.waiting[0]
            n = min(head.num_uncomputed_tokens, state.config.max_num_batched_tokens)
            try:
                fits = allocator.can_allocate(head, n)
            except Exception as exc:  # a broken allocator is itself the explanation
                fits = f"raised {type(exc).__name__}: {exc}"
            words.append(
                f"first waiting request {head.request_id!r}: can_allocate({n} tokens) -> {fits}"
            )
        return "; ".join(words)


def why_impossible(request: Request, model: Any, config: Any, allocator: Any) -> str | None:
    """Why `request` can never run under this engine's configuration, or None if it can."""
    if request.max_num_tokens > model.max_context:
        return (
            f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
            f"({request.params.max_tokens}) = {request.max_num_tokens} exceeds the model's "
            f"context of {model.max_context} tokens"
        )
    budget = config.max_num_batched_tokens
    if not config.enable_chunked_prefill and request.num_prompt_tokens > budget:
        return (
            f"the prompt ({request.num_prompt_tokens} tokens) exceeds "
            f"max_num_batched_tokens={budget} and enable_chunked_prefill is False, so it "
            f"can never be scheduled"
        )
    try:
        fits = allocator.can_ever_fit(request)
    except Exception as exc:
        return f"{type(allocator).__name__}.can_ever_fit raised {exc!r}"
    if not fits:
        return (
            f"prompt + max_tokens = {request.max_num_tokens} tokens can never fit the KV "
            f"arena ({allocator.num_blocks} blocks x {allocator.block_size} "
            f"slots, {type(allocator).__name__})"
        )
    return None


# -- configuration limits ------------------------------------------------------------------

# MLX array dimensions and the arena's row indices are 32-bit.
MAX_ARENA_ROWS = 2**31 - 1
MAX_BLOCK_SIZE = 2**16


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def check_positive_int(name: str, value: object, high: int | None = None) -> int:
    """`value` if it is an int in [1, high], else ValueError naming `name` and the range."""
    if not _is_int(value) or value < 1 or (high is not None and value > high):
        allowed = f"an int in [1, {high}]" if high is not None else "an int >= 1"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def check_engine_options(*, check_policies: object, stall_timeout: object, max_history: object):
    """ValueError naming the first engine option outside its allowed values."""
    if not isinstance(check_policies, bool):
        raise ValueError(f"check_policies must be a bool, got {check_policies!r}")
    if (
        isinstance(stall_timeout, bool)
        or not isinstance(stall_timeout, numbers.Real)
        or not 0 < stall_timeout < float("inf")
    ):
        raise ValueError(f"stall_timeout must be a number of seconds > 0, got {stall_timeout!r}")
    if not _is_int(max_history) or max_history < 0:
        raise ValueError(f"max_history must be an int >= 0, got {max_history!r}")


def _memory_for(model: Any) -> int | None:
    """This machine's memory, or None (no limit) for a weightless shaped model, whose
    simulated arena holds nothing here (cortexlab/roofline.py)."""
    return None if getattr(model, "shape", None) is not None else physical_memory_bytes()


def check_arena_size(model: Any, *, num_blocks: int, block_size: int) -> None:
    """ValueError unless an arena of `num_blocks` x `block_size` fits MLX and this machine."""
    rows = (num_blocks + 1) * model.num_kv_heads * block_size
    if rows > MAX_ARENA_ROWS:
        most = MAX_ARENA_ROWS // (model.num_kv_heads * block_size) - 1
        raise ValueError(
            f"num_blocks={num_blocks} x block_size={block_size} needs {rows} arena rows per "
            f"layer; MLX indexes at most 2**31 - 1, so num_blocks must be <= {most}"
        )
    need = num_blocks * block_size * model.kv_bytes_per_token
    have = _memory_for(model)
    if have is not None and need > have:
        most = have // (block_size * model.kv_bytes_per_token)
        raise ValueError(
            f"num_blocks={num_blocks} x block_size={block_size} needs {_gib(need)} of KV arena "
            f"but this machine has {_gib(have)}; num_blocks must be <= {most}"
        )


def resolve_num_blocks(
    model: Any, *, block_size: int, num_blocks: object, kv_memory_bytes: object, max_num_seqs: int
) -> int:
    """The arena's block count: `num_blocks` if given, else enough for `max_num_seqs` full
    contexts capped by `kv_memory_bytes`; checked against MLX's and the machine's limits."""
    per_block = model.kv_bytes_per_token * block_size
    if num_blocks is None:
        kv_memory_bytes = check_positive_int("kv_memory_bytes", kv_memory_bytes)
        have = _memory_for(model)
        if have is not None and kv_memory_bytes > have:
            raise ValueError(
                f"kv_memory_bytes={kv_memory_bytes} ({_gib(kv_memory_bytes)}) exceeds this "
                f"machine's memory ({_gib(have)})"
            )
        if kv_memory_bytes < per_block:
            raise ValueError(
                f"kv_memory_bytes={kv_memory_bytes} holds no block: one block of {block_size} "
                f"tokens takes {per_block} bytes for this model"
            )
        wanted = -(-max_num_seqs * model.max_context // block_size)
        num_blocks = min(wanted, kv_memory_bytes // per_block)
        most = (MAX_ARENA_ROWS // (model.num_kv_heads * block_size)) - 1
        num_blocks = min(num_blocks, most)
    else:
        num_blocks = check_positive_int("num_blocks", num_blocks)
    check_arena_size(model, num_blocks=num_blocks, block_size=block_size)
    return num_blocks
