"""cortexlab: a Jupyter-first research toolkit for LLM inference serving on MLX.

Start with `Engine` and `SamplingParams`. The guides (docs/*.md in the repository: every
engine and sampling parameter, writing a scheduler, an allocator, a sampling stage, hooks)
are built with this API reference by `make docs`, as the [guides](guides.html) pages.
"""

# backend must be imported before anything imports mlx: it loads the fast BLAS.
from cortexlab.backend import info, seed  # noqa: I001
from cortexlab import guard, kv, sampling, schedulers, sim
from cortexlab.engine import Completion, Engine, Result
from cortexlab.guard import EngineError, PolicyError, StallError, StepError
from cortexlab.hooks import HOOK_POINTS
from cortexlab.models import Model, load_model
from cortexlab.request import FinishReason, Request, RequestState, SamplingParams
from cortexlab.trace import Trace
from cortexlab.trace_summary import SummaryTrace
from cortexlab import executors, metrics, report, viz, workloads
from cortexlab.experiment import Comparison, compare, compare_allocators, run_workload, sweep

__all__ = [
    "HOOK_POINTS",
    "Comparison",
    "Engine",
    "EngineError",
    "FinishReason",
    "Model",
    "PolicyError",
    "Request",
    "RequestState",
    "Completion",
    "Result",
    "SamplingParams",
    "StallError",
    "StepError",
    "SummaryTrace",
    "Trace",
    "compare",
    "compare_allocators",
    "executors",
    "info",
    "guard",
    "kv",
    "load_model",
    "metrics",
    "report",
    "run_workload",
    "sampling",
    "schedulers",
    "seed",
    "sim",
    "sweep",
    "viz",
    "widgets",
    "workloads",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # cl.widgets imports ipywidgets: only when first used.
    if name == "widgets":
        import importlib

        return importlib.import_module("cortexlab.widgets")
    raise AttributeError(f"module 'cortexlab' has no attribute {name!r}")
