"""Byte-level BPE tokenizer rebuilt from a GGUF's embedded vocabulary, with streaming decode.

A GGUF carries its tokenizer as metadata (vocabulary, merges, token types, special ids and a
Jinja chat template) rather than as a ``tokenizer.json``.  :class:`Tokenizer` reassembles that
into a HuggingFace ``tokenizers`` pipeline, so the BPE itself is the battle-tested Rust one and
only the wiring lives here.  :class:`IncrementalDetokenizer` turns a stream of generated ids into
text deltas without ever emitting half of a multi-byte UTF-8 character.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, overload

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

# llama.cpp's token-type enum (gguf `tokenizer.ggml.token_type`).
_TOKEN_TYPE_CONTROL = 3  # special tokens such as <|im_start|>: matched whole, skippable on decode
_TOKEN_TYPE_USER_DEFINED = 4  # added tokens that are matched whole but are ordinary text

_SUPPORTED_MODELS = {"gpt2": "byte-level BPE"}
# `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer. Each needs its own split rules, and using
# the wrong ones silently changes token ids, so only the ones reproduced exactly are accepted.
_SUPPORTED_PRE = ("gpt-2", "smollm")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table used to spell byte-level tokens."""
    # Printable Latin-1 bytes stand for themselves; the rest are shifted past U+0100 so that every
    # token is a visible string without whitespace/control characters (e.g. space -> 'Ġ').
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def _plain(value: Any) -> Any:
    """Turn an ``mx.array`` / numpy metadata value into plain Python (scalars, lists)."""
    # mx.load returns scalars as 0-d arrays and int arrays as mx.array; both expose tolist(). Any
    # other reader (e.g. the `gguf` package, hand-built dicts in tests) may already hand us lists.
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _optional_id(md: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    """Read an optional token-id field, validating it against the vocabulary size."""
    if key not in md:
        return None
    value = int(_plain(md[key]))
    if not 0 <= value < n_vocab:
        raise ValueError(f"GGUF field {key!r} = {value} is outside the vocabulary (size {n_vocab})")
    return value


class Tokenizer:
    """A GGUF byte-level BPE tokenizer backed by the HuggingFace ``tokenizers`` library."""

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        *,
        token_types: Sequence[int] | None = None,
        pre: str = "gpt-2",
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        """Build from raw vocabulary pieces; prefer :meth:`from_gguf_metadata`."""
        if pre not in _SUPPORTED_PRE:
            raise ValueError(
                f"GGUF field 'tokenizer.ggml.pre' is {pre!r}; supported pre-tokenizers: "
                f"{', '.join(_SUPPORTED_PRE)}"
            )
        if token_types is not None and len(token_types) != len(tokens):
            raise ValueError(
                f"GGUF field 'tokenizer.ggml.token_type' has {len(token_types)} entries but "
                f"'tokenizer.ggml.tokens' has {len(tokens)}"
            )
        self._tokens: list[str] = list(tokens)
        vocab = {tok: i for i, tok in enumerate(self._tokens)}
        if len(vocab) != len(self._tokens):
            raise ValueError("GGUF field 'tokenizer.ggml.tokens' contains duplicate tokens")
        # Byte-level tokens never contain a real space (0x20 is spelled 'Ġ'), so the single space
        # in each 'left right' merge is an unambiguous separator.
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
        tok = _HFTokenizer(bpe)
        if pre == "smollm":
            # SmolLM2's tokenizer.json: every digit becomes its own pre-token *before* the GPT-2
            # regex runs, which also changes how whitespace next to digits groups ("a  1").
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            )
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()

        types = list(token_types) if token_types is not None else [1] * len(self._tokens)
        control = [i for i, t in enumerate(types) if t == _TOKEN_TYPE_CONTROL]
        user_defined = [i for i, t in enumerate(types) if t == _TOKEN_TYPE_USER_DEFINED]
        # Registering them as added tokens makes the Rust side match them verbatim in input text
        # (instead of BPE-splitting '<|im_start|>' into '<', '|', ...) and keeps their vocab ids.
        # normalized=False: match the literal string, no byte-level re-spelling.
        if control:
            tok.add_special_tokens(
                [AddedToken(self._tokens[i], special=True, normalized=False) for i in control]
            )
        if user_defined:
            tok.add_tokens(
                [AddedToken(self._tokens[i], special=False, normalized=False) for i in user_defined]
            )
        self._tok = tok
        self._special_ids = frozenset(control)
        self._added_ids = frozenset(control) | frozenset(user_defined)
        self._bos = bos_token_id
        self._eos = eos_token_id
        self._pad = pad_token_id
        self._add_bos = add_bos_token
        eos = {i for i in (eos_token_id, *extra_eos_token_ids) if i is not None}
        self._eos_ids = frozenset(eos)
        self._chat_template = chat_template
        self._compiled_template: Any = None
        # Raw bytes of every token, computed once so streaming decode is a table lookup.
        self._token_bytes: list[bytes] = [self._spell_bytes(i) for i in range(len(self._tokens))]

    @classmethod
    def from_gguf_metadata(cls, md: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata, e.g. ``mx.load(path, return_metadata=True)[1]``."""
        model = md.get("tokenizer.ggml.model")
        if model not in _SUPPORTED_MODELS:
            supported = ", ".join(f"{k!r} ({v})" for k, v in _SUPPORTED_MODELS.items())
            hint = " (SentencePiece)" if model == "llama" else ""
            raise ValueError(
                f"GGUF field 'tokenizer.ggml.model' is {model!r}{hint}; "
                f"only {supported} is supported"
            )
        tokens = _plain(md.get("tokenizer.ggml.tokens"))
        if not tokens:
            raise ValueError(
                "GGUF field 'tokenizer.ggml.tokens' is missing or empty; a byte-level BPE "
                "tokenizer needs the vocabulary"
            )
        merges = _plain(md.get("tokenizer.ggml.merges"))
        if not merges:
            raise ValueError(
                "GGUF field 'tokenizer.ggml.merges' is missing or empty; a byte-level BPE "
                "tokenizer needs its merge list"
            )
        n = len(tokens)
        token_types = _plain(md.get("tokenizer.ggml.token_type"))
        # GGUFs converted without a pre-tokenizer name are plain GPT-2 byte-level BPE.
        pre = str(_plain(md.get("tokenizer.ggml.pre", "gpt-2")))
        vocab = {t: i for i, t in enumerate(tokens)}
        extra_eos = [_optional_id(md, k, n) for k in ("tokenizer.ggml.eot_token_id",)]
        # Chat-tuned models often end a turn with their EOS (<|im_end|>) but can still emit the
        # base model's document end, which must stop generation too.
        if "<|endoftext|>" in vocab:
            extra_eos.append(vocab["<|endoftext|>"])
        add_bos = md.get("tokenizer.ggml.add_bos_token")
        template = md.get("tokenizer.chat_template")
        return cls(
            tokens,
            merges,
            token_types=token_types,
            pre=pre,
            bos_token_id=_optional_id(md, "tokenizer.ggml.bos_token_id", n),
            eos_token_id=_optional_id(md, "tokenizer.ggml.eos_token_id", n),
            pad_token_id=_optional_id(md, "tokenizer.ggml.padding_token_id", n),
            extra_eos_token_ids=[i for i in extra_eos if i is not None],
            add_bos_token=bool(_plain(add_bos)) if add_bos is not None else False,
            chat_template=str(template) if template is not None else None,
        )

    # --- vocabulary -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids (including special tokens)."""
        return len(self._tokens)

    @property
    def bos_token_id(self) -> int | None:
        """Beginning-of-sequence id, or None if the GGUF names none."""
        return self._bos

    @property
    def eos_token_id(self) -> int | None:
        """The GGUF's end-of-sequence id, or None if it names none."""
        return self._eos

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that should stop generation (GGUF eos/eot plus '<|endoftext|>' if present)."""
        return self._eos_ids

    @property
    def pad_token_id(self) -> int | None:
        """Padding id, or None if the GGUF names none."""
        return self._pad

    @property
    def add_bos_token(self) -> bool:
        """Whether the GGUF asks for BOS to be prepended when encoding with special tokens."""
        return self._add_bos

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of control tokens (GGUF token_type 3), e.g. '<|im_start|>'."""
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        """The GGUF's Jinja chat template, or None."""
        return self._chat_template

    def id_to_token(self, token_id: int) -> str:
        """Vocabulary string of an id, in byte-level spelling (' the' is 'Ġthe')."""
        if not 0 <= token_id < len(self._tokens):
            raise IndexError(f"token id {token_id} outside vocabulary of size {len(self._tokens)}")
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string (byte-level spelling), or None if it is not in the vocab."""
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes a token contributes to decoded text (may be a partial UTF-8 character)."""
        if not 0 <= token_id < len(self._tokens):
            raise IndexError(f"token id {token_id} outside vocabulary of size {len(self._tokens)}")
        return self._token_bytes[token_id]

    def _spell_bytes(self, token_id: int) -> bytes:
        token = self._tokens[token_id]
        if token_id in self._added_ids:
            # Added tokens are matched and emitted as literal text, not byte-level spelling.
            return token.encode("utf-8")
        # Characters outside the byte alphabet cannot come from a real byte-level vocab; keeping
        # their UTF-8 keeps decode total instead of raising on an odd GGUF.
        return b"".join(
            bytes((_UNICODE_TO_BYTE[c],)) if c in _UNICODE_TO_BYTE else c.encode("utf-8")
            for c in token
        )

    # --- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; prepends BOS only if asked and the GGUF says add_bos_token."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._add_bos and self._bos is not None:
            ids.insert(0, self._bos)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences become U+FFFD."""
        id_list = self._check_ids(ids)
        return self._tok.decode(id_list, skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        # Accept mx/numpy arrays as well as lists; the Rust decoder silently drops unknown ids,
        # which would hide bugs in a sampler, so reject them here.
        seq = ids.tolist() if hasattr(ids, "tolist") else ids
        id_list = [int(i) for i in seq]
        n = len(self._tokens)
        bad = [i for i in id_list if not 0 <= i < n]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside vocabulary of size {n}")
        return id_list

    def detokenizer(self, *, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """A fresh streaming decoder whose output matches :meth:`decode` with the same option."""
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # --- chat template --------------------------------------------------------------------------

    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = ...,
        tokenize: Literal[False] = ...,
        **template_kwargs: Any,
    ) -> str: ...

    @overload
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = ...,
        tokenize: Literal[True],
        **template_kwargs: Any,
    ) -> list[int]: ...

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Render ``messages`` with the GGUF's chat template (ids when ``tokenize=True``)."""
        template = self._compile_template()
        bos = self._tokens[self._bos] if self._bos is not None else ""
        eos = self._tokens[self._eos] if self._eos is not None else ""
        text = template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
            **template_kwargs,
        )
        # The template already writes any BOS/role markers itself, so adding BOS again here would
        # duplicate it (HF does the same).
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _compile_template(self) -> Any:
        if self._chat_template is None:
            raise ValueError(
                "GGUF has no 'tokenizer.chat_template'; cannot apply a chat template to this model"
            )
        if self._compiled_template is None:
            # Imported lazily: plain encode/decode should not pay for jinja2.
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise jinja2.exceptions.TemplateError(message)

            def tojson(
                x: Any,
                ensure_ascii: bool = False,
                indent: int | None = None,
                separators: tuple[str, str] | None = None,
                sort_keys: bool = False,
            ) -> str:
                return json.dumps(
                    x,
                    ensure_ascii=ensure_ascii,
                    indent=indent,
                    separators=separators,
                    sort_keys=sort_keys,
                )

            def strftime_now(fmt: str) -> str:
                return datetime.now().strftime(fmt)

            # Same environment as transformers' apply_chat_template, so templates written for HF
            # (whitespace control, loop controls, tojson without ASCII escaping) render identically;
            # sandboxed because templates come from downloaded model files.
            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = strftime_now
            self._compiled_template = env.from_string(self._chat_template)
        return self._compiled_template

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self._bos}, eos={self._eos}, "
            f"specials={len(self._special_ids)})"
        )


class IncrementalDetokenizer:
    """Streaming decoder: feed ids one at a time, get back only complete UTF-8 text."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        """Create a decoder over ``tokenizer``'s vocabulary; see :meth:`Tokenizer.detokenizer`."""
        self._token_bytes = tokenizer._token_bytes
        self._skip = tokenizer.special_token_ids if skip_special_tokens else frozenset()
        # Python's incremental UTF-8 decoder buffers a trailing incomplete sequence and, with
        # errors="replace", substitutes maximal invalid subparts exactly like a one-shot
        # bytes.decode (and like Rust's from_utf8_lossy used by `tokenizers`), so the streamed
        # text equals decode() of the whole sequence while each step costs O(len(token)).
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chunks: list[str] = []
        self._finalized = False

    def add_token(self, token_id: int) -> str:
        """Consume one id; return the text it completes ('' if its bytes are still pending)."""
        if self._finalized:
            raise RuntimeError("add_token() called after finalize()")
        if not 0 <= token_id < len(self._token_bytes):
            raise ValueError(
                f"token id {token_id} outside vocabulary of size {len(self._token_bytes)}"
            )
        if token_id in self._skip:
            return ""
        delta = self._decoder.decode(self._token_bytes[token_id])
        if delta:
            self._chunks.append(delta)
        return delta

    def add_tokens(self, token_ids: Iterable[int]) -> str:
        """Consume several ids; return the concatenated delta."""
        return "".join(self.add_token(int(i)) for i in token_ids)

    def finalize(self) -> str:
        """Flush held-back bytes (U+FFFD for an incomplete trailing sequence); idempotent."""
        if self._finalized:
            return ""
        self._finalized = True
        delta = self._decoder.decode(b"", final=True)
        if delta:
            self._chunks.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            # Collapse so repeated reads stay cheap.
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def has_pending(self) -> bool:
        """Whether bytes of an incomplete character are being held back."""
        return bool(self._decoder.getstate()[0])
