"""Chunking by the embedding model's own tokens.

A chunk is measured in the tokens its model will see, so no chunk is silently truncated by
the model, and the chunker hands the model those ids: the text is tokenized once, in Rust,
with character offsets, and every chunk is a contiguous slice of that token sequence with
the model's special tokens around it. Its text is the character span of the slice.

Where to cut is decided on the token sequence. Each gap between two tokens gets a level,
from the text between them: paragraph break, sentence end, whitespace (or a CJK character
on either side, as CJK has no spaces), or none (inside a word). A chunk takes as many
tokens as the budget allows and ends at the last gap of the highest level in its window;
gaps that would leave the chunk less than a quarter full are not considered, so a heading
does not become a chunk of its own. The next chunk starts up to `overlap` tokens back, at
the earliest sentence start in that stretch, else the earliest word start. Every chunk
ends beyond the one before it, so chunking always ends, whatever the overlap.

Only the gap levels are computed in Python, one pass over the offsets; finding a cut uses
`bytearray.rfind`, so a 1 MB document chunks in about the time it takes to tokenize.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from tokenizers import Encoding, Tokenizer

_WORD, _SENTENCE, _PARAGRAPH = 1, 2, 3
#: Beyond this, `model_max_length` is the "no limit" sentinel of transformers.
_NO_LIMIT = 1_000_000

#: Possessive, and anchored at the start of a run, so a long run of dots stays linear.
_SENTENCE_END = re.compile(
    r"(?<![.!?…])[.!?…]++[\"'”’)\]}»]*+(?=\s|$)|[。！？]++[\"'”’)\]}»」』）]*+"
)
_PARAGRAPH_GAP = re.compile(r"\n[^\S\n]*\n")
_SPACE = re.compile(r"\s")
#: Characters BERT-style tokenizers split one per token: CJK ideographs and CJK punctuation.
_CJK = re.compile(
    "[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
    "\U00020000-\U0002a6df\U0002a700-\U0002ceaf\U0002f800-\U0002fa1f]"
)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens `ids` (with the special tokens) of `text`, which is `source[start:end]`."""

    index: int
    text: str
    start: int
    end: int
    ids: list[int]


class Chunker:
    """Splits cleaned text into chunks of at most `max_tokens` model tokens."""

    def __init__(self, tokenizer: Any, max_tokens: int = 512, overlap: int = 64) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if not isinstance(backend, Tokenizer):
            raise TypeError("chunking needs a fast (Rust-backed) Hugging Face tokenizer")
        if overlap < 0:
            raise ValueError(f"overlap must not be negative, got {overlap}")
        self._backend = Tokenizer.from_str(backend.to_str())
        self._backend.no_truncation()
        self._backend.no_padding()
        self._prefix, self._suffix = _special_tokens(self._backend)
        model_limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if 0 < model_limit < _NO_LIMIT:
            max_tokens = min(max_tokens, model_limit)
        self.max_tokens = max_tokens
        self.budget = max_tokens - len(self._prefix) - len(self._suffix)
        if self.budget < 1:
            raise ValueError(f"max_tokens {max_tokens} leaves no room beside the special tokens")
        self.overlap = min(overlap, self.budget - 1)
        self._min_fill = max(1, self.budget // 4)

    def split(self, text: str) -> list[Chunk]:
        """The chunks of one text."""
        if not text or text.isspace():
            return []
        return self._pack(text, self._backend.encode(text, add_special_tokens=False))

    def split_many(self, texts: list[str]) -> list[list[Chunk]]:
        """The chunks of each text, tokenized as one batch."""
        encodings = self._backend.encode_batch(texts, add_special_tokens=False)
        return [
            [] if not text or text.isspace() else self._pack(text, encoding)
            for text, encoding in zip(texts, encodings, strict=True)
        ]

    def _pack(self, text: str, encoding: Encoding) -> list[Chunk]:
        ids: list[int] = encoding.ids
        n = len(ids)
        if n == 0:
            return []
        starts, ends = _spans(encoding.offsets, len(text))
        levels = _gap_levels(text, starts, ends)
        budget, overlap, min_fill = self.budget, self.overlap, self._min_fill
        chunks: list[Chunk] = []
        head = text[: starts[0]]
        first = len(head) - len(head.lstrip())
        start, done = 0, 0
        while True:
            stop = min(start + budget, n)
            if stop < n:
                stop = _last_best(levels, max(start + min_fill, done + 1), stop)
            begin = starts[start] if start else first
            end = ends[stop - 1]
            gap_end = starts[stop] if stop < n else len(text)
            if gap_end > end:
                end += len(text[end:gap_end].rstrip())
            if end > begin:
                chunk_ids = [*self._prefix, *ids[start:stop], *self._suffix]
                chunks.append(Chunk(len(chunks), text[begin:end], begin, end, chunk_ids))
            if stop == n:
                return chunks
            done = stop
            start = _overlap_start(levels, max(start + 1, stop - overlap), stop)


def _special_tokens(backend: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence."""
    encoding = backend.encode("a", add_special_tokens=True)
    content = [i for i, seq in enumerate(encoding.sequence_ids) if seq is not None]
    if not content:
        return [], []
    return encoding.ids[: content[0]], encoding.ids[content[-1] + 1 :]


def _spans(offsets: list[tuple[int, int]], length: int) -> tuple[list[int], list[int]]:
    """Token start and end offsets; a token without characters borrows its neighbours'."""
    starts = [o[0] for o in offsets]
    ends = [o[1] for o in offsets]
    if any(map(operator.eq, starts, ends)):
        empty = [s == e for s, e in offsets]
        preceding = 0
        for i, blank in enumerate(empty):
            if blank:
                ends[i] = preceding
            else:
                preceding = ends[i]
        following = length
        for i in range(len(empty) - 1, -1, -1):
            if empty[i]:
                starts[i] = following
            else:
                following = starts[i]
    return starts, ends


def _gap_levels(text: str, starts: list[int], ends: list[int]) -> bytearray:
    """For each token, how good a place to cut the gap just before it is."""
    n = len(starts)
    sentence_ends = {m.end() for m in _SENTENCE_END.finditer(text)}
    cjk = _CJK.search(text) is not None
    levels = bytearray(n + 1)
    levels[0] = levels[n] = _PARAGRAPH
    for i in range(1, n):
        a = ends[i - 1]
        b = starts[i]
        if b > a:
            gap = text[a:b]
            if "\n" in gap and _PARAGRAPH_GAP.search(gap):
                levels[i] = _PARAGRAPH
            elif a in sentence_ends:
                levels[i] = _SENTENCE
            elif gap.isspace() or _SPACE.search(gap):
                levels[i] = _WORD
        elif b == a:
            if a in sentence_ends:
                levels[i] = _SENTENCE
            elif cjk and (_CJK.match(text, a - 1) or _CJK.match(text, a)):
                levels[i] = _WORD
    return levels


def _last_best(levels: bytearray, low: int, high: int) -> int:
    """The last cut in [low, high] of the highest level there; `high` if none is better."""
    for level in (_PARAGRAPH, _SENTENCE, _WORD):
        cut = levels.rfind(level, low, high + 1)
        if cut >= 0:
            return cut
    return high


def _overlap_start(levels: bytearray, low: int, stop: int) -> int:
    """Where the next chunk starts: the earliest sentence, else word, start in [low, stop)."""
    if low >= stop:
        return stop
    sentences = [levels.find(level, low, stop) for level in (_PARAGRAPH, _SENTENCE)]
    found = [cut for cut in sentences if cut >= 0]
    if found:
        return min(found)
    word = levels.find(_WORD, low, stop)
    if word >= 0:
        return word
    return stop if levels[stop] else low
