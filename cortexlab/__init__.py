"""cortexlab: a Jupyter-first research toolkit for LLM inference serving on MLX."""

# backend must be imported before anything imports mlx: it loads the fast BLAS.
from cortexlab.backend import info, seed  # noqa: I001

__all__ = ["info", "seed"]
__version__ = "0.1.0"
