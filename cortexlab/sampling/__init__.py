"""Sampling: a chain of small stages over ``[B, V]`` logits with per-row parameters.

``sample(logits, params, seeds, steps)`` is the entry point. Stages register by name in
``stages``; one file each (greedy, temperature, top_k, top_p, categorical).
"""

# Importing the stage modules registers them.
from cortexlab.sampling import categorical, greedy, temperature, top_k, top_p  # noqa: F401
from cortexlab.sampling.base import SamplingBatch, Stage, stages
from cortexlab.sampling.categorical import Categorical, row_uniform
from cortexlab.sampling.chain import DEFAULT_CHAIN, sample
from cortexlab.sampling.greedy import Greedy
from cortexlab.sampling.temperature import Temperature
from cortexlab.sampling.top_k import TopK
from cortexlab.sampling.top_p import TopP

__all__ = [
    "DEFAULT_CHAIN",
    "Categorical",
    "Greedy",
    "SamplingBatch",
    "Stage",
    "Temperature",
    "TopK",
    "TopP",
    "row_uniform",
    "sample",
    "stages",
]
