"""Model loading: the embedded SmolLM2 GGUF, local mlx-lm folders, and `tiny-random`."""

from __future__ import annotations

import os
from pathlib import Path

from cortexlab.models.base import Model, TokenizerLike
from cortexlab.models.gguf import embedded_model_path, load_gguf
from cortexlab.models.hf import load_folder
from cortexlab.models.tiny import ByteTokenizer, tiny_random

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_cache: dict[str, Model] = {}


def load_model(source: str | os.PathLike | None = None, *, quantized: bool | None = None) -> Model:
    """The embedded SmolLM2 (no argument), `"tiny-random"`, a .gguf file or a model folder.

    Nothing is downloaded. The embedded model is loaded once per process and shared.
    """
    if source is None or source == DEFAULT_MODEL:
        key = f"embedded:{quantized}"
        if key not in _cache:
            _cache[key] = load_gguf(embedded_model_path(), quantized=quantized)
        return _cache[key]
    if source == "tiny-random":
        return tiny_random()
    path = Path(source)
    if path.suffix == ".gguf":
        return load_gguf(path, quantized=quantized)
    if path.is_dir():
        return load_folder(path)
    raise FileNotFoundError(
        f"no model at {str(source)!r}: expected None (the embedded {DEFAULT_MODEL}), "
        "'tiny-random', a .gguf file, or a local mlx-lm / Hugging Face model folder "
        "(nothing is downloaded)"
    )


__all__ = [
    "DEFAULT_MODEL",
    "ByteTokenizer",
    "Model",
    "TokenizerLike",
    "embedded_model_path",
    "load_folder",
    "load_gguf",
    "load_model",
    "tiny_random",
]
