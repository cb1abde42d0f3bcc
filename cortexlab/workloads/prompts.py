"""Natural prompts of an exact token length, cut from the public-domain corpus shipped in the package.

The corpus is encoded once per tokenizer (cached); a prompt is then a slice of those token
ids starting at a word, so materializing thousands of requests encodes almost nothing.
"""

from __future__ import annotations

import functools
import importlib.resources
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

CORPUS_SOURCE = (
    "Jane Austen, Persuasion, Volume I (1817, public domain; see cortexlab/data/README.md)"
)


@functools.cache
def corpus_text() -> str:
    """The shipped corpus: plain English prose, paragraphs separated by blank lines."""
    return importlib.resources.files("cortexlab").joinpath("data/corpus.txt").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class EncodedCorpus:
    """The corpus as one tokenizer's ids, with the token positions where a word begins."""

    ids: np.ndarray
    word_starts: np.ndarray
    pieces: dict[int, str]  # each distinct token id's own text

    def cut(
        self, tokenizer: Any, start: int, length: int, *, after_text: bool = False
    ) -> list[int]:
        """`length` token ids of corpus text from the word at token `start` (wrapping at the end).

        `after_text`: the ids follow a shared system prompt. Then the word's own first token
        is kept as it is (" Sir" in a byte-level BPE), so requests share nothing beyond the
        system prompt unless they start with the same word; a separate space token would be
        one more token every request shares.
        """
        first = int(self.ids[start % len(self.ids)])
        piece = self.pieces[first]
        if piece[:1].isspace() and not after_text:
            # Byte-level BPEs glue the space to the next word: re-encode that one word
            # without its space so the prompt does not open with a blank.
            head = list(tokenizer.encode(piece.lstrip()))
        else:
            head = [first]
        rest = np.take(self.ids, np.arange(start + 1, start + length), mode="wrap")
        return (head + rest.tolist())[:length]


def _encode_corpus(tokenizer: Any) -> EncodedCorpus:
    ids = np.asarray(tokenizer.encode(corpus_text()), dtype=np.int64)
    distinct = np.unique(ids)
    pieces = {int(t): tokenizer.decode([int(t)]) for t in distinct}
    # Per distinct id, then spread over the corpus by indexing: a few thousand decodes, not 50k.
    lookup = np.searchsorted(distinct, ids)
    leading_space = np.array([pieces[int(t)][:1].isspace() for t in distinct])[lookup]
    trailing_space = np.array([pieces[int(t)][-1:].isspace() for t in distinct])[lookup]
    blank = np.array([not pieces[int(t)].strip() for t in distinct])[lookup]
    after_space = np.concatenate([[True], trailing_space[:-1]])
    word_starts = np.flatnonzero(~blank & (leading_space | after_space))
    if len(word_starts) < min(1000, len(ids) // 8):
        # A tokenizer whose single-token decode drops the word's space (SentencePiece) hides
        # the boundaries: fall back to any token, so prompts stay distinct if less tidy.
        word_starts = np.arange(len(ids))
    return EncodedCorpus(ids=ids, word_starts=word_starts, pieces=pieces)


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encoded_corpus(tokenizer: Any) -> EncodedCorpus:
    """The corpus encoded with `tokenizer`, cached for as long as the tokenizer lives."""
    try:
        return _cache[tokenizer]
    except KeyError:
        _cache[tokenizer] = encoded = _encode_corpus(tokenizer)
        return encoded
    except TypeError:  # not weak-referenceable or not hashable: encode without caching
        return _encode_corpus(tokenizer)
