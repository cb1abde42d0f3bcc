"""Workloads: arrival processes, length distributions, tenants, priorities, replayed traces.

    wl = cl.workloads.poisson(4.0, num_requests=64, tenants={"a": 3, "b": 1}, seed=0)
    wl.to_frame()                       # one row per request
    for arrival, ids, params, text in wl.materialize(model): ...

Generated prompts are natural English cut from a public-domain novel shipped in the package
(`cortexlab/data/corpus.txt`) to exactly `prompt_len` tokens of the model's tokenizer; each
request generates exactly `output_len` tokens (EOS ignored), so every policy does the same work.
"""

from cortexlab.workloads.distributions import (
    AllAtOnce,
    ArrivalProcess,
    Constant,
    Empirical,
    Fixed,
    Gamma,
    LengthDistribution,
    LogNormal,
    Poisson,
    Uniform,
    Zipf,
)
from cortexlab.workloads.prompts import CORPUS_SOURCE, corpus_text
from cortexlab.workloads.replay import replay
from cortexlab.workloads.synthetic import (
    DEFAULT_NUM_REQUESTS,
    DEFAULT_OUTPUT_LEN,
    DEFAULT_PROMPT_LEN,
    burst,
    constant,
    gamma,
    generate,
    poisson,
)
from cortexlab.workloads.workload import MaterializedRequest, Workload, WorkloadRequest

__all__ = [
    "CORPUS_SOURCE",
    "DEFAULT_NUM_REQUESTS",
    "DEFAULT_OUTPUT_LEN",
    "DEFAULT_PROMPT_LEN",
    "AllAtOnce",
    "ArrivalProcess",
    "Constant",
    "Empirical",
    "Fixed",
    "Gamma",
    "LengthDistribution",
    "LogNormal",
    "MaterializedRequest",
    "Poisson",
    "Uniform",
    "Workload",
    "WorkloadRequest",
    "Zipf",
    "burst",
    "constant",
    "corpus_text",
    "gamma",
    "generate",
    "poisson",
    "replay",
]
