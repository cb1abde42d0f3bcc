"""Request schedulers: a registry of policies, each choosing every step's batch.

A scheduler is an object with `schedule(state) -> Batch` (a class registered by name, an
instance, or a class) or a plain function `schedule(state) -> Batch`.
"""

from typing import Any

from cortexlab.registry import Registry
from cortexlab.schedulers.base import (
    BaseScheduler,
    Batch,
    FunctionScheduler,
    ScheduledSeq,
    Scheduler,
    SchedulerConfig,
    SchedulerState,
)


class _SchedulerRegistry(Registry[Scheduler]):
    """Registers classes (built with no arguments) or plain `schedule(state)` functions."""

    def register(self, name: str):
        """Decorator: make a scheduler class or a `schedule(state) -> Batch` function `name`."""
        store = super().register(name)

        def deco(policy):
            if isinstance(policy, type):
                store(policy)
            elif callable(policy):
                store(lambda: FunctionScheduler(policy, name))
            else:
                raise TypeError(f"scheduler {name!r} must be a class or a function, got {policy!r}")
            return policy

        return deco


schedulers: Registry[Scheduler] = _SchedulerRegistry("scheduler")
register = schedulers.register


def available() -> list[str]:
    """Registered scheduler names."""
    return schedulers.available()


def as_scheduler(spec: Any) -> Scheduler:
    """A scheduler from a registered name, a class, an object with `schedule`, or a function."""
    if isinstance(spec, str):
        return schedulers.create(spec)
    if isinstance(spec, type):
        if not callable(getattr(spec, "schedule", None)):
            raise TypeError(f"scheduler class {spec.__qualname__} has no schedule(state) method")
        return spec()
    if callable(getattr(spec, "schedule", None)):
        return spec
    if callable(spec):
        return FunctionScheduler(spec)
    raise TypeError(
        f"scheduler must be a registered name ({', '.join(schedulers.available())}), a "
        f"scheduler object with schedule(state), or a function schedule(state) -> Batch; "
        f"got {spec!r}"
    )


# Imported after `register` exists: each policy module registers itself on import.
from cortexlab.schedulers.fair import VTCScheduler  # noqa: E402
from cortexlab.schedulers.fcfs import FCFSScheduler  # noqa: E402
from cortexlab.schedulers.ltr import LearningToRankScheduler  # noqa: E402
from cortexlab.schedulers.mlfq import MLFQScheduler  # noqa: E402
from cortexlab.schedulers.priority import PriorityScheduler  # noqa: E402
from cortexlab.schedulers.ranked import RankedScheduler  # noqa: E402
from cortexlab.schedulers.sarathi import SarathiScheduler  # noqa: E402
from cortexlab.schedulers.sjf import SJFScheduler  # noqa: E402

__all__ = [
    "BaseScheduler",
    "Batch",
    "FCFSScheduler",
    "FunctionScheduler",
    "LearningToRankScheduler",
    "MLFQScheduler",
    "PriorityScheduler",
    "RankedScheduler",
    "SJFScheduler",
    "SarathiScheduler",
    "as_scheduler",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerState",
    "VTCScheduler",
    "available",
    "register",
    "schedulers",
]
