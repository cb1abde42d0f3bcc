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


def available() -> list[str]:
    """Registered scheduler names, sorted."""
    return schedulers.available()


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
    "LearningToRankScheduler",
    "MLFQScheduler",
    "PriorityScheduler",
    "RankedScheduler",
    "SJFScheduler",
    "SarathiScheduler",
    "ScheduledSeq",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerState",
    "VTCScheduler",
    "available",
    "register",
    "schedulers",
]
