"""Faster formulations of a llama-family model's ops, applied per forward by the runner.

MLX's CPU ``exp`` is scalar; ``2 ** t`` (``mx.power`` with base 2) is not, so SiLU written as
``x / (1 + 2 ** (-x * log2 e))`` runs ~2.5x faster than ``x * sigmoid(x)`` (mlx-lm's
``swiglu``) and differs from it by rounding only (log-probabilities within ~1e-5 on SmolLM2).

Nothing in mlx-lm is modified or vendored: each MLP *instance* of a supported model gets a
subclass of its own class whose ``__call__`` uses the fast form only while the runner's
forward is building its graph (a context variable), and mlx-lm's exact code otherwise, so
calling the model directly (``model(tokens)``, mlx-lm's generate, the parity references) is
unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math

import mlx.core as mx

# mlx-lm model types whose MLP is exactly `down_proj(swiglu(gate_proj(x), up_proj(x)))`.
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3", "ministral3"})
_SWIGLU_CALL = "self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))"
_LOG2E = math.log2(math.e)

_fast_activation = contextvars.ContextVar("cortexlab_fast_activation", default=False)
_subclasses: dict[type, type] = {}


def fast_swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` as ``gate / (1 + 2 ** (-gate * log2 e)) * up``."""
    return gate / (1 + mx.power(2.0, gate * -_LOG2E)) * up


def _fast_subclass(cls: type) -> type:
    if cls not in _subclasses:
        exact = cls.__call__

        def __call__(self, x):
            if _fast_activation.get():
                return self.down_proj(fast_swiglu(self.gate_proj(x), self.up_proj(x)))
            return exact(self, x)

        _subclasses[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _subclasses[cls]


def _is_swiglu_mlp(mlp) -> bool:
    cls = type(mlp)
    if cls in _subclasses.values():
        return True
    try:
        return _SWIGLU_CALL in inspect.getsource(cls.__call__)
    except (OSError, TypeError):
        return False


def install_fast_activation(module) -> bool:
    """Give each llama-family MLP of `module` the switchable fast SiLU; False if unsupported."""
    model_type = getattr(getattr(module, "args", None), "model_type", None)
    layers = getattr(module, "layers", None)
    if model_type not in LLAMA_FAMILY or not layers:
        return False
    mlps = [getattr(layer, "mlp", None) for layer in layers]
    if not all(m is not None and _is_swiglu_mlp(m) for m in mlps):
        return False
    for mlp in mlps:
        if type(mlp) not in _subclasses.values():
            mlp.__class__ = _fast_subclass(type(mlp))
    return True


@contextlib.contextmanager
def fast_activation(enabled: bool = True):
    """Within this block, patched MLPs build their graph with the fast SiLU."""
    token = _fast_activation.set(enabled)
    try:
        yield
    finally:
        _fast_activation.reset(token)
