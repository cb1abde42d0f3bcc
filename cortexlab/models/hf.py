"""Load a local mlx-lm / Hugging Face model folder through mlx-lm (never downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cortexlab.models.base import Model, model_from_module

import mlx.core as mx


class _StreamAdapter:
    """mlx-lm's streaming detokenizer behind cortexlab's add_token/finalize interface."""

    def __init__(self, detok) -> None:
        self._detok = detok
        self._detok.reset()
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """Text completed by this token."""
        self._detok.add_token(int(token_id))
        delta = self._detok.last_segment
        self.text += delta
        return delta

    def finalize(self) -> str:
        """Flush whatever the detokenizer held back."""
        self._detok.finalize()
        delta = self._detok.last_segment
        self.text += delta
        return delta


class MlxLmTokenizer:
    """mlx-lm's TokenizerWrapper behind the cortexlab tokenizer interface."""

    def __init__(self, wrapper) -> None:
        self.wrapper = wrapper
        self.eos_token_ids = frozenset(int(i) for i in wrapper.eos_token_ids)
        self.eos_token_id = wrapper.eos_token_id
        self.bos_token_id = wrapper.bos_token_id
        self.vocab_size = len(wrapper)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`."""
        return list(self.wrapper.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        return self.wrapper.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, tokenize: bool = False
    ):
        """The model's chat template applied to `messages`."""
        out = self.wrapper.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize
        )
        return list(out) if tokenize else out

    def detokenizer(self) -> _StreamAdapter:
        """A fresh streaming detokenizer."""
        return _StreamAdapter(self.wrapper.detokenizer)


def load_folder(path: str | os.PathLike, *, dtype: mx.Dtype | None = None) -> Model:
    """Load a model folder holding config.json, *.safetensors and tokenizer files."""
    from mlx_lm.utils import load

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json: not an mlx-lm / Hugging Face model")
    module, wrapper = load(str(folder))
    if dtype is not None:
        module.set_dtype(dtype)
    config = json.loads(config_path.read_text())
    return model_from_module(
        module, MlxLmTokenizer(wrapper), name=folder.name, source=str(folder), config=config
    )
