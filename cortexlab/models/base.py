"""The `Model` handle: an mlx-lm module, its tokenizer, and the shapes the KV cache needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn


class TokenizerLike(Protocol):
    """What the engine needs from a tokenizer (GGUF, byte-level or an mlx-lm wrapper)."""

    eos_token_ids: frozenset[int]

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str: ...

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, tokenize: bool = False
    ) -> Any: ...

    def detokenizer(self) -> Any: ...


@dataclass(slots=True)
class Model:
    """A loaded model: call it like the mlx-lm module it wraps."""

    module: nn.Module
    tokenizer: TokenizerLike
    name: str
    source: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    dtype: mx.Dtype
    config: dict = field(default_factory=dict)

    def __call__(self, tokens: mx.array, cache: Any = None) -> mx.array:
        """Logits for `tokens` ([B, L]) given per-layer caches."""
        return self.module(tokens, cache=cache)

    @property
    def layers(self) -> list:
        """The transformer blocks (one KV cache each)."""
        return self.module.layers

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.size

    @property
    def num_parameters(self) -> int:
        """Number of parameters (quantized weights counted as stored elements)."""
        from mlx.utils import tree_flatten

        return sum(v.size for _, v in tree_flatten(self.module.parameters()))

    def encode_prompt(self, prompt: str, *, chat: bool = False) -> list[int]:
        """Token ids for a prompt, wrapped in the chat template when `chat`."""
        if chat:
            return list(
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
                )
            )
        return self.tokenizer.encode(prompt)

    def summary(self) -> dict:
        """The model's facts as a flat dict."""
        return {
            "name": self.name,
            # The file or folder name only: the full path differs machine to machine.
            "source": Path(self.source).name,
            "layers": self.num_layers,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab": self.vocab_size,
            "max_context": self.max_context,
            "dtype": str(self.dtype).removeprefix("mlx.core."),
            "parameters": self.num_parameters,
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in self.summary().items())
        return f"<table>{rows}</table>"

    def __repr__(self) -> str:
        s = self.summary()
        return (
            f"Model({s['name']!r}, layers={s['layers']}, kv_heads={s['kv_heads']}, "
            f"head_dim={s['head_dim']}, vocab={s['vocab']}, dtype={s['dtype']})"
        )


def model_from_module(
    module: nn.Module, tokenizer: TokenizerLike, *, name: str, source: str, config: dict
) -> Model:
    """Wrap an mlx-lm llama-style module, reading the KV shapes from its first attention."""
    attn = module.layers[0].self_attn
    num_kv_heads = getattr(attn, "n_kv_heads", None) or attn.num_key_value_heads
    head_dim = getattr(attn, "head_dim", None) or attn.k_proj.weight.shape[0] // num_kv_heads
    args = getattr(module, "args", None)
    vocab = config.get("vocab_size") or getattr(args, "vocab_size", 0)
    max_context = (
        config.get("max_position_embeddings") or getattr(args, "max_position_embeddings", 0) or 4096
    )
    norm_weight = module.model.norm.weight if hasattr(module, "model") else None
    dtype = norm_weight.dtype if norm_weight is not None else mx.float32
    return Model(
        module=module,
        tokenizer=tokenizer,
        name=name,
        source=source,
        num_layers=len(module.layers),
        num_kv_heads=int(num_kv_heads),
        head_dim=int(head_dim),
        vocab_size=int(vocab),
        max_context=int(max_context),
        dtype=dtype,
        config=config,
    )
