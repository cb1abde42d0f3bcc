"""Roofline cost models: estimated step times for named hardware from a model's shapes.

``cl.sim.roofline(shape, hardware)`` prices a step from first principles instead of
timings: each of the step's `BatchFeatures` costs FLOPs (at the hardware's dense peak times
`compute_efficiency`) and bytes (at its memory bandwidth times `memory_efficiency`), and the
step lasts ``step_overhead_s + max(compute, memory)``. These are estimates, not
measurements. Assumed: a step is one forward pass over all its rows, unpadded (as a GPU
engine batches them; the CPU runner's padding and attention waves are not priced), which
reads all layer weights and the LM head once; a row reads the K/V of every token it attends and writes its new tokens' K/V; the matmuls cost
2 FLOPs per weight per token and attention 4 FLOPs per (query, key) pair per head and layer.
Ignored: kernel launch and scheduling overhead (unless `step_overhead_s` is set), the
embedding lookup, norms, activations and softmax, communication between devices (one
device, no tensor parallelism), dequantization work for quantized weights (which only cut
the bytes read), and the fact that compute and memory traffic never overlap perfectly.

`shaped_model(shape)` wraps a shape (no weights) as a `Model` the simulated engine runs, so
a 7B model's scheduling can be studied here with its KV sizes and an H100's KV budget.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from cortexlab.models.base import Model, TokenizerLike

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from cortexlab.sim import CostModel

__all__ = [
    "HARDWARE",
    "MODEL_SHAPES",
    "Hardware",
    "ModelShape",
    "ShapedModel",
    "get_hardware",
    "get_shape",
    "kv_budget",
    "roofline",
    "shaped_model",
]

# Bytes of one KV element -> the dtype a shaped model reports (its KV accounting uses .size).
_KV_DTYPES = {1: mx.int8, 2: mx.bfloat16, 4: mx.float32}


def _int(owner: str, name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{owner}.{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _positive(owner: str, name: str, value: Any, high: float = float("inf")) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not 0 < value <= high or value != value:
        allowed = f"in (0, {high:g}]" if high != float("inf") else "> 0 and finite"
        raise ValueError(f"{owner}.{name} must be a number {allowed}, got {value!r}")
    if value == float("inf"):
        raise ValueError(f"{owner}.{name} must be a number > 0 and finite, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A decoder-only transformer's shapes (a Hugging Face config's numbers), no weights.

    `weight_bytes` is bytes per weight (2 for fp16/bf16, 1 for 8-bit, 0.5 for 4-bit
    quantization, ignoring scales); `kv_bytes` bytes per K/V element (1, 2 or 4);
    `head_dim` defaults to ``hidden_size // num_heads``.
    """

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    intermediate_size: int
    head_dim: int | None = None
    max_context: int = 4096
    tied_embeddings: bool = False
    weight_bytes: float = 2.0
    kv_bytes: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"ModelShape.name must be a non-empty str, got {self.name!r}")
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "vocab_size",
            "intermediate_size",
            "max_context",
        ):
            object.__setattr__(self, name, _int("ModelShape", name, getattr(self, name)))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelShape.num_kv_heads must divide num_heads={self.num_heads}, "
                f"got {self.num_kv_heads}"
            )
        head_dim = self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim
        object.__setattr__(self, "head_dim", _int("ModelShape", "head_dim", head_dim))
        if not isinstance(self.tied_embeddings, bool):
            raise ValueError(
                f"ModelShape.tied_embeddings must be a bool, got {self.tied_embeddings!r}"
            )
        weight_bytes = _positive("ModelShape", "weight_bytes", self.weight_bytes, high=8)
        object.__setattr__(self, "weight_bytes", weight_bytes)
        if self.kv_bytes not in _KV_DTYPES or isinstance(self.kv_bytes, bool):
            raise ValueError(f"ModelShape.kv_bytes must be 1, 2 or 4, got {self.kv_bytes!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, name: str | None = None, **overrides):
        """A shape from a Hugging Face ``config.json`` dict (llama, mistral, qwen2 keys)."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a dict (a config.json), got {config!r}")
        try:
            heads = config["num_attention_heads"]
            values = {
                "name": name or config.get("_name_or_path") or config.get("model_type") or "model",
                "num_layers": config["num_hidden_layers"],
                "hidden_size": config["hidden_size"],
                "num_heads": heads,
                "num_kv_heads": config.get("num_key_value_heads") or heads,
                "vocab_size": config["vocab_size"],
                "intermediate_size": config["intermediate_size"],
                "head_dim": config.get("head_dim"),
                "max_context": config.get("max_position_embeddings") or 4096,
                "tied_embeddings": bool(config.get("tie_word_embeddings", False)),
            }
        except KeyError as exc:
            raise ValueError(
                f"config has no {exc.args[0]!r} (a Hugging Face config.json)"
            ) from None
        return cls(**(values | overrides))

    @property
    def layer_parameters(self) -> int:
        """Matmul weights of the transformer blocks (Q, K, V, O and the gated MLP)."""
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (2 * q_out + 2 * kv_out)
        mlp = 3 * self.hidden_size * self.intermediate_size
        return self.num_layers * (attention + mlp)

    @property
    def num_parameters(self) -> int:
        """All parameters: blocks, norms, the embedding, and the LM head unless tied."""
        embedding = self.vocab_size * self.hidden_size
        norms = (2 * self.num_layers + 1) * self.hidden_size
        head = 0 if self.tied_embeddings else embedding
        return self.layer_parameters + norms + embedding + head

    @property
    def bytes_per_forward(self) -> float:
        """Weight bytes one forward pass reads: every block and the LM head."""
        return (self.layer_parameters + self.vocab_size * self.hidden_size) * self.weight_bytes

    @property
    def weights_nbytes(self) -> float:
        """Bytes the weights occupy."""
        return self.num_parameters * self.weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_bytes

    @property
    def flops_per_token(self) -> int:
        """Matmul FLOPs of one token through the blocks (2 per weight; no LM head)."""
        return 2 * self.layer_parameters

    def to_dict(self) -> dict:
        """The shape as a plain dict (what a roofline cost model's info records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Public configs (config.json on the Hugging Face hub) of well-known models.
MODEL_SHAPES: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        # HuggingFaceTB/SmolLM2-135M(-Instruct): the embedded model's shapes.
        ModelShape(
            "smollm2-135m", 30, 576, 9, 3, 49152, 1536, max_context=8192, tied_embeddings=True
        ),
        # meta-llama/Llama-2-7b-hf: multi-head attention (32 KV heads).
        ModelShape("llama-2-7b", 32, 4096, 32, 32, 32000, 11008, max_context=4096),
        # meta-llama/Meta-Llama-3-8B: grouped-query attention (8 KV heads), 128k vocab.
        ModelShape("llama-3-8b", 32, 4096, 32, 8, 128256, 14336, max_context=8192),
        # mistralai/Mistral-7B-v0.1 (its 4096-token sliding window is not modelled).
        ModelShape("mistral-7b", 32, 4096, 32, 8, 32000, 14336, max_context=32768),
        # Qwen/Qwen2-7B: 4 KV heads, 152k vocab (QKV biases ignored); 32k native context.
        ModelShape("qwen2-7b", 28, 3584, 28, 4, 152064, 18944, max_context=32768),
    )
}


@dataclass(frozen=True, slots=True)
class Hardware:
    """One accelerator's peaks: dense FLOP/s at fp16/bf16 and at fp32, memory bandwidth in
    bytes/s, memory in bytes. `notes` says which numbers are published and which estimated."""

    name: str
    fp16_flops: float
    fp32_flops: float
    memory_bandwidth: float
    memory_bytes: float
    notes: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Hardware.name must be a non-empty str, got {self.name!r}")
        for name in ("fp16_flops", "fp32_flops", "memory_bandwidth", "memory_bytes"):
            object.__setattr__(self, name, _positive("Hardware", name, getattr(self, name)))

    def flops(self, weight_bytes: float) -> float:
        """The peak a model with this many bytes per weight runs its matmuls at: fp32 for
        4-byte weights, else fp16/bf16 (quantized weights are dequantized to fp16)."""
        return self.fp32_flops if weight_bytes >= 4 else self.fp16_flops


_APPLE = (
    "Memory bandwidth is Apple's published figure; the TFLOP/s are estimates (GPU cores x "
    "128 FP32 lanes x 2 x the reported GPU clock), Apple publishes none per precision; FP16 "
    "is taken to run at the FP32 rate. Memory is the largest configuration (unified: the OS "
    "and other apps share it)."
)
HARDWARE: dict[str, Hardware] = {
    hw.name: hw
    for hw in (
        Hardware(
            "h100",
            fp16_flops=989e12,
            fp32_flops=67e12,
            memory_bandwidth=3.35e12,
            memory_bytes=80e9,
            notes="NVIDIA H100 SXM5 80GB, published datasheet figures: 989 TFLOP/s dense "
            "BF16/FP16 tensor (1979 with sparsity), 67 TFLOP/s FP32 (non-tensor), 3.35 TB/s "
            "HBM3, 80 GB.",
        ),
        Hardware(
            "m2-max",
            fp16_flops=13.6e12,
            fp32_flops=13.6e12,
            memory_bandwidth=400e9,
            memory_bytes=96e9,
            notes="Apple M2 Max, 38-core GPU (~1.4 GHz): 400 GB/s, up to 96 GB. " + _APPLE,
        ),
        Hardware(
            "m3-max",
            fp16_flops=14.2e12,
            fp32_flops=14.2e12,
            memory_bandwidth=400e9,
            memory_bytes=128e9,
            notes="Apple M3 Max, 40-core GPU (~1.4 GHz): 400 GB/s (the 30-core part has "
            "300 GB/s), up to 128 GB. " + _APPLE,
        ),
        Hardware(
            "m4-max",
            fp16_flops=16.1e12,
            fp32_flops=16.1e12,
            memory_bandwidth=546e9,
            memory_bytes=128e9,
            notes="Apple M4 Max, 40-core GPU (~1.6 GHz): 546 GB/s (the 32-core part has "
            "410 GB/s), up to 128 GB. " + _APPLE,
        ),
    )
}


def _lookup(kind: str, value: Any, table: Mapping[str, Any], cls: type) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str) and value.lower() in table:
        return table[value.lower()]
    raise ValueError(f"unknown {kind} {value!r}: pass a {cls.__name__} or one of {sorted(table)}")


def get_shape(shape: ModelShape | str) -> ModelShape:
    """A `ModelShape`, or the preset of that name (`MODEL_SHAPES`)."""
    return _lookup("model shape", shape, MODEL_SHAPES, ModelShape)


def get_hardware(hardware: Hardware | str) -> Hardware:
    """A `Hardware`, or the preset of that name (`HARDWARE`)."""
    return _lookup("hardware", hardware, HARDWARE, Hardware)


def roofline(
    shape: ModelShape | str,
    hardware: Hardware | str,
    *,
    compute_efficiency: float = 0.6,
    memory_efficiency: float = 0.8,
    step_overhead_s: float = 0.0,
) -> CostModel:
    """An estimated `CostModel` for `shape` on `hardware`: ``step_overhead_s + max(compute,
    memory)`` per step, from FLOPs at ``peak x compute_efficiency`` and bytes at
    ``bandwidth x memory_efficiency`` (both in (0, 1]; 1 gives the ideal roofline).

    Compute: 2 FLOPs per block weight per token (prompt or decode), the LM head per sampled
    row, 4 per attended (query, key) pair per head and layer. Memory: all block and LM-head
    weights once per step, every attended token's K/V per row, each new token's K/V
    written, fp32 logits per sampled row. An estimate; see this module's
    docstring for what it ignores.
    """
    from cortexlab.sim import CostModel  # here: cortexlab.sim imports this module

    shape, hardware = get_shape(shape), get_hardware(hardware)
    ce = _positive("roofline", "compute_efficiency", compute_efficiency, high=1.0)
    me = _positive("roofline", "memory_efficiency", memory_efficiency, high=1.0)
    ok = isinstance(step_overhead_s, numbers.Real) and not isinstance(step_overhead_s, bool)
    if not ok or not 0 <= step_overhead_s < float("inf"):
        raise ValueError(
            f"roofline.step_overhead_s must be a finite number >= 0, got {step_overhead_s!r}"
        )
    flops = hardware.flops(shape.weight_bytes) * ce
    bandwidth = hardware.memory_bandwidth * me
    per_token = shape.flops_per_token / flops
    kv_write = shape.kv_bytes_per_token / bandwidth
    return CostModel(
        step_s=float(step_overhead_s),
        prefill_token_s=per_token,
        decode_row_s=per_token,
        sampled_row_s=2 * shape.hidden_size * shape.vocab_size / flops,
        attention_pair_s=4 * shape.num_layers * shape.num_heads * shape.head_dim / flops,
        memory={
            "step_s": shape.bytes_per_forward / bandwidth,
            "context_token_s": shape.kv_bytes_per_token / bandwidth,
            "prefill_token_s": kv_write,
            "decode_row_s": kv_write,
            "sampled_row_s": 4 * shape.vocab_size / bandwidth,
        },
        info={
            "method": "roofline",
            "estimate": True,
            "shape": shape.to_dict(),
            "hardware": {f.name: getattr(hardware, f.name) for f in fields(hardware)},
            "compute_efficiency": ce,
            "memory_efficiency": me,
        },
    )


def kv_budget(
    shape: ModelShape | str, hardware: Hardware | str, *, memory_utilization: float = 0.9
) -> int:
    """Bytes left for the KV cache: ``memory x memory_utilization`` minus the weights (as
    vLLM's ``gpu_memory_utilization``; activations are not reserved). Pass it to a
    simulated engine as ``kv_memory_bytes``."""
    shape, hardware = get_shape(shape), get_hardware(hardware)
    share = _positive("kv_budget", "memory_utilization", memory_utilization, high=1.0)
    budget = int(hardware.memory_bytes * share - shape.weights_nbytes)
    if budget < shape.kv_bytes_per_token:
        raise ValueError(
            f"{shape.name}'s weights ({shape.weights_nbytes / 1e9:.1f} GB) leave no KV cache "
            f"in {share:g} x {hardware.memory_bytes / 1e9:.0f} GB of {hardware.name}"
        )
    return budget


@dataclass(slots=True, repr=False)  # Model's short repr, not every field
class ShapedModel(Model):
    """A `Model` with a shape and a tokenizer but no weights: only a simulated engine
    (``clock="simulated"``, ``backend="sim"``) runs it. Its KV accounting uses the shape's
    layers, KV heads, head size and KV bytes; its arena holds no memory."""

    shape: ModelShape | None = None

    @property
    def num_parameters(self) -> int:
        """The shape's parameter count (there are no weights to count)."""
        return self.shape.num_parameters

    @property
    def layers(self) -> list:
        """No transformer blocks: a shaped model has no weights."""
        raise AttributeError(f"{self.name} is a shape without weights (only simulated)")


def shaped_model(
    shape: ModelShape | str,
    tokenizer: Model | TokenizerLike | None = None,
    *,
    max_context: int | None = None,
) -> ShapedModel:
    """A weightless `Model` of `shape` for the simulated engine and workloads.

    `tokenizer` (a tokenizer, or a `Model` whose tokenizer to use; default the embedded
    model's) encodes workload prompts; prompt lengths are counted in its tokens. The model's
    `vocab_size` is the larger of the shape's and the tokenizer's vocabulary, so every id
    the tokenizer makes is valid (costs use the shape's vocabulary).
    """
    shape = get_shape(shape)
    if tokenizer is None:
        from cortexlab.models import load_model

        tokenizer = load_model()
    vocab = shape.vocab_size
    if isinstance(tokenizer, Model):
        vocab = max(vocab, tokenizer.vocab_size)
        tokenizer = tokenizer.tokenizer
    elif not callable(getattr(tokenizer, "encode", None)):
        raise ValueError(f"tokenizer must be a tokenizer or a Model, got {tokenizer!r}")
    else:
        size = getattr(tokenizer, "vocab_size", None)
        vocab = max(vocab, size) if isinstance(size, int) else vocab
    context = shape.max_context if max_context is None else max_context
    context = _int("shaped_model", "max_context", context)
    return ShapedModel(
        module=nn.Module(),
        tokenizer=tokenizer,
        name=shape.name,
        source=f"shape:{shape.name}",
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        vocab_size=vocab,
        max_context=context,
        dtype=_KV_DTYPES[shape.kv_bytes],
        config=shape.to_dict(),
        shape=shape,
    )
