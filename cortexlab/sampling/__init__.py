"""Sampling: an ordered chain of small stages over ``[B, V]`` logits with per-row parameters.

``cl.sampling.available()`` lists the stages; ``distribution(logits, params, ...)`` gives
the probabilities a row draws from; ``explain(logits, params)`` which candidates survive and
which stage cut the others; ``sample(logits, params, seeds, steps)`` draws. The engine uses
``Sampler`` (``Engine(sampling_order=...)``; ``SamplingParams.order`` per request). Every
stage, its parameters, definition and source: ``docs/sampling.md``.
"""

# Importing the stage modules registers them.
from cortexlab.sampling import (  # noqa: F401
    allowed_tokens,
    banned_tokens,
    categorical,
    dry,
    epsilon_cutoff,
    eta_cutoff,
    frequency_penalty,
    greedy,
    logit_bias,
    min_p,
    min_tokens,
    mirostat,
    presence_penalty,
    repetition_penalty,
    temperature,
    top_k,
    top_n_sigma,
    top_p,
    typical_p,
    xtc,
)
from cortexlab.sampling.base import (
    NUM_CANDIDATES,
    FunctionStage,
    SamplingBatch,
    Selection,
    Stage,
    available,
    register,
    stages,
)
from cortexlab.sampling.categorical import Categorical, row_uniform
from cortexlab.sampling.chain import Outcome, Sampled, run, sample
from cortexlab.sampling.distribution import distribution
from cortexlab.sampling.explain import explain
from cortexlab.sampling.greedy import Greedy
from cortexlab.sampling.order import DEFAULT_ORDER, PRESETS, check_params
from cortexlab.sampling.sampler import Sampler
from cortexlab.sampling.state import SamplerState
from cortexlab.sampling.temperature import Temperature
from cortexlab.sampling.top_k import TopK
from cortexlab.sampling.top_p import TopP

__all__ = [
    "DEFAULT_ORDER",
    "NUM_CANDIDATES",
    "PRESETS",
    "Categorical",
    "FunctionStage",
    "Greedy",
    "Outcome",
    "Sampled",
    "Sampler",
    "SamplerState",
    "SamplingBatch",
    "Selection",
    "Stage",
    "Temperature",
    "TopK",
    "TopP",
    "available",
    "check_params",
    "distribution",
    "explain",
    "register",
    "row_uniform",
    "run",
    "sample",
    "stages",
]
