"""Model loading: the embedded GGUF, tiny-random, local mlx-lm folders, and their errors."""

from __future__ import annotations

import json

import cortexlab as cl
from cortexlab.models import gguf
from cortexlab.models.tiny import TINY_CONFIG

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import mlx_lm_greedy, needs_smollm
from mlx.utils import tree_flatten

LLAMA_METADATA = {
    "general.architecture": "llama",
    "llama.attention.head_count": mx.array(2, dtype=mx.uint32),
    "llama.embedding_length": mx.array(8, dtype=mx.uint32),
    "llama.block_count": mx.array(1, dtype=mx.uint32),
    "llama.feed_forward_length": mx.array(16, dtype=mx.uint32),
    "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
}


@needs_smollm
def test_embedded_model_shapes(smollm):
    assert smollm.name == "SmolLM2-135M-Instruct"
    assert smollm.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (smollm.num_layers, smollm.num_kv_heads, smollm.head_dim) == (30, 3, 64)
    assert (smollm.vocab_size, smollm.max_context) == (49152, 8192)
    assert smollm.dtype == mx.float32
    assert smollm.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    assert smollm.module.args.rope_traditional is True
    assert smollm.module.args.tie_word_embeddings is True
    # De-quantized on CPU: plain float32 Linear layers, no packed weights left.
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in smollm.module.named_modules())
    assert cl.load_model() is smollm, "the embedded model is loaded once per process"


@needs_smollm
def test_france_answer_is_exact(smollm):
    engine = cl.Engine(smollm, scheduler="fcfs", allocator="paged", block_size=16)
    [r] = engine.generate(
        ["What is the capital of France?"], cl.SamplingParams(max_tokens=32), chat=True
    )
    assert r.text == "The capital of France is Paris."
    assert r.finish_reason == "stop"


@needs_smollm
def test_quantized_load_matches_dequantized(smollm):
    q = gguf.load_gguf(gguf.embedded_model_path(), quantized=True)
    assert isinstance(q.module.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert q.module.model.layers[0].self_attn.q_proj.bits == 4
    assert q.module.model.embed_tokens.bits == 8
    prompt = mx.array([smollm.encode_prompt("Hi!", chat=True)])
    ql, fl = q.module(prompt)[0, -1], smollm.module(prompt)[0, -1]
    # Same weights, different kernels (fp16 scales inside the quantized matmul): close, and
    # the same greedy choice.
    assert mx.abs(ql - fl).max().item() < 0.1
    assert mx.argmax(ql).item() == mx.argmax(fl).item()


def test_tiny_random_is_deterministic():
    cl.seed(1)
    a = cl.load_model("tiny-random")
    cl.seed(2)
    b = cl.load_model("tiny-random")
    for (name, x), (_, y) in zip(
        tree_flatten(a.module.parameters()), tree_flatten(b.module.parameters()), strict=True
    ):
        assert mx.array_equal(x, y), name
    assert (a.num_layers, a.num_kv_heads, a.head_dim, a.vocab_size) == (2, 2, 16, 259)
    params = cl.SamplingParams(max_tokens=10, ignore_eos=True)
    ta = cl.Engine(a).generate(["same"], params)[0].token_ids
    tb = cl.Engine(b).generate(["same"], params)[0].token_ids
    assert ta == tb


def test_byte_tokenizer_round_trip(tiny):
    tok = tiny.tokenizer
    for text in ["héllo wörld", "emoji 🧪👩‍🔬", "tabs\tand\n\nnewlines  ", ""]:
        assert tok.decode(tok.encode(text)) == text
        detok = tok.detokenizer()
        streamed = "".join(detok.add_token(t) for t in tok.encode(text)) + detok.finalize()
        assert streamed == text
    assert tok.encode("<|im_end|>") == [258]


def _write_folder(path, tiny):
    """A Hugging Face-style llama folder: config, safetensors, a byte-level tokenizer."""
    from cortexlab.models.tokenizer import _bytes_to_unicode

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    for i, special in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        vocab[special] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"})
    )
    (path / "config.json").write_text(json.dumps(TINY_CONFIG))
    mx.save_safetensors(
        str(path / "model.safetensors"), dict(tree_flatten(tiny.module.parameters()))
    )


def test_load_local_folder_through_mlx_lm(tmp_path, tiny):
    _write_folder(tmp_path, tiny)
    model = cl.load_model(tmp_path)
    assert model.source == str(tmp_path)
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (2, 2, 16)
    assert model.tokenizer.encode("hi") == [ord("h"), ord("i")]
    assert 258 in model.tokenizer.eos_token_ids
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 256, 40)]
    [r] = cl.Engine(model).generate([prompt], cl.SamplingParams(max_tokens=8, ignore_eos=True))
    assert r.token_ids == mlx_lm_greedy(tiny, prompt, 8)[0]
    detok = model.tokenizer.detokenizer()
    text = "".join(detok.add_token(t) for t in model.tokenizer.encode("héllo")) + detok.finalize()
    assert text == "héllo"


def test_missing_paths_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        cl.load_model(tmp_path / "nothing-here")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        cl.load_model(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        cl.load_model(tmp_path)


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    mx.save_gguf(str(path), {"a": mx.zeros(4)}, {"general.architecture": "mamba"})
    with pytest.raises(ValueError, match=r"architecture.*'mamba'.*supported: llama"):
        cl.load_model(path)


def test_unsupported_gguf_tensor(tmp_path):
    path = tmp_path / "int.gguf"
    mx.save_gguf(str(path), {"token_embd.weight": mx.zeros((4, 8), dtype=mx.int32)}, LLAMA_METADATA)
    with pytest.raises(ValueError, match=r"unsupported GGUF tensor type .*supported tensor types"):
        cl.load_model(path)
    path = tmp_path / "odd.gguf"
    mx.save_gguf(str(path), {"blk.0.attn_qkv.weight": mx.zeros((4, 8))}, LLAMA_METADATA)
    with pytest.raises(ValueError, match="unsupported GGUF tensor 'blk.0.attn_qkv.weight'"):
        cl.load_model(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match="could not read .* as GGUF"):
        cl.load_model(path)
