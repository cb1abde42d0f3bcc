"""Request schedulers: a registry of policies, each choosing every step's batch."""

from cortexlab.registry import Registry
from cortexlab.schedulers.base import (
    BaseScheduler,
    Batch,
    ScheduledSeq,
    Scheduler,
    SchedulerConfig,
    SchedulerState,
)

schedulers: Registry[Scheduler] = Registry("scheduler")
register = schedulers.register

# Imported after `register` exists: each policy module registers itself on import.
from cortexlab.schedulers.fcfs import FCFSScheduler  # noqa: E402

__all__ = [
    "BaseScheduler",
    "Batch",
    "FCFSScheduler",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerState",
    "register",
    "schedulers",
]
