"""`tiny-random`: a small deterministic llama with a byte-level tokenizer, built with no files."""

from __future__ import annotations

import codecs

from cortexlab.models.base import Model, model_from_module

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import llama

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "vocab_size": 256 + len(SPECIAL_TOKENS),
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rope_traditional": False,
    "tie_word_embeddings": False,
}


class ByteDetokenizer:
    """Streams UTF-8 text from byte tokens, holding back incomplete characters."""

    def __init__(self, tokenizer: ByteTokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def add_token(self, token_id: int) -> str:
        """Text completed by this token (may be empty while a character is incomplete)."""
        if token_id < 256:
            delta = self._decoder.decode(bytes([token_id]))
        else:
            delta = self._decoder.decode(b"", final=True) + self._tokenizer.id_to_token(token_id)
            self._decoder.reset()
        self.text += delta
        return delta

    def finalize(self) -> str:
        """Flush held-back bytes (invalid ones become U+FFFD)."""
        delta = self._decoder.decode(b"", final=True)
        self.text += delta
        return delta


class ByteTokenizer:
    """Token i < 256 is byte i; then the ChatML special tokens."""

    vocab_size = 256 + len(SPECIAL_TOKENS)
    eos_token_id = 256 + SPECIAL_TOKENS.index("<|im_end|>")
    eos_token_ids = frozenset({256, 256 + SPECIAL_TOKENS.index("<|im_end|>")})
    bos_token_id = None

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of `text`, with special-token strings mapped to their ids."""
        ids: list[int] = []
        rest = text
        while rest:
            hits = [(rest.find(s), s) for s in SPECIAL_TOKENS if s in rest]
            if not hits:
                ids.extend(rest.encode("utf-8"))
                break
            pos, special = min(hits)
            ids.extend(rest[:pos].encode("utf-8"))
            ids.append(256 + SPECIAL_TOKENS.index(special))
            rest = rest[pos + len(special) :]
        return ids

    def id_to_token(self, token_id: int) -> str:
        """The token's text (a byte's latin-1 character, or the special token's name)."""
        return chr(token_id) if token_id < 256 else SPECIAL_TOKENS[token_id - 256]

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD)."""
        detok = ByteDetokenizer(self)
        parts = [detok.add_token(i) for i in ids if not (skip_special_tokens and int(i) >= 256)]
        return "".join(parts) + detok.finalize()

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """ChatML rendering of `messages`."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text

    def detokenizer(self) -> ByteDetokenizer:
        """A fresh streaming detokenizer."""
        return ByteDetokenizer(self)


def randomize(module, *, seed: int = 0, dtype: mx.Dtype = mx.float32) -> None:
    """Draw `module`'s weights from `seed` (independent of the global RNG), in place."""
    params = tree_flatten(module.parameters())
    keys = mx.random.split(mx.random.key(seed), len(params))
    new = []
    for (name, value), key in zip(params, keys, strict=True):
        if name.endswith("norm.weight"):
            # Norm gains near 1 keep activations in a realistic range.
            arr = 1.0 + 0.1 * mx.random.normal(value.shape, key=key)
        else:
            arr = mx.random.normal(value.shape, key=key) * (value.shape[-1] ** -0.5)
        new.append((name, arr.astype(dtype)))
    module.update(tree_unflatten(new))


def tiny_random(*, seed: int = 0, dtype: mx.Dtype = mx.float32) -> Model:
    """A 2-layer llama with weights drawn from `seed` (independent of the global RNG)."""
    module = llama.Model(llama.ModelArgs.from_dict(TINY_CONFIG))
    randomize(module, seed=seed, dtype=dtype)
    mx.eval(module.parameters())
    module.eval()
    return model_from_module(
        module, ByteTokenizer(), name="tiny-random", source="tiny-random", config=dict(TINY_CONFIG)
    )
