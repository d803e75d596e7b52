"""Text cleaning before chunking: HTML to text, Unicode and whitespace normalisation.

Cleaning runs inside upsert on documents of up to 10 MB, so every step is one pass of a
module-level compiled regex or a C routine, and the HTML parser only runs when the text
contains something that looks like an HTML tag (plain text such as "a < b" is never parsed,
and never loses its angle brackets). HTML goes through lxml's recovering parser, which
turns any garbage into some tree; should it still fail, a regex strip is the fallback, so
cleaning never raises.

Line endings are always normalised to "\\n": they are encoding, not content. Everything
else follows the index's `Cleaning` rules.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Iterable

from lxml import etree

from dify_serving.specs import Cleaning

#: Tag names that make a text count as HTML; a bare "<" or "List<String>" does not.
_HTML_TAGS = (
    "a|abbr|address|article|aside|b|blockquote|body|br|caption|center|code|dd|del|details|div|"
    "dl|dt|em|figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|"
    "ins|kbd|label|li|link|main|mark|meta|nav|noscript|ol|option|p|pre|q|s|samp|script|section|"
    "select|small|span|strike|strong|style|sub|summary|sup|table|tbody|td|template|textarea|"
    "tfoot|th|thead|title|tr|tt|u|ul|var"
)
_LOOKS_HTML = re.compile(rf"<(?:/?(?:{_HTML_TAGS})(?=[\s/>])[^<>]*>|!--|!doctype\b)", re.I)

_DROPPED_ELEMENTS = ("script", "style", "noscript", "head", "template", "title")
_PARAGRAPH_ELEMENTS = frozenset(
    "address article aside blockquote center details dialog div dl fieldset figcaption figure "
    "footer form h1 h2 h3 h4 h5 h6 header hr main nav ol p pre section table ul".split()
)
_LINE_ELEMENTS = frozenset("br caption dd dt li option summary tr".split())
_CELL_ELEMENTS = frozenset("td th".split())

_TAG = re.compile(r"<[^<>]*>")
_SURROGATES = re.compile("[\ud800-\udfff]")
_LINE_BREAKS = re.compile("\r\n?|[\x0b\x0c\x85\u2028]")
#: Unicode categories Cc and Cf, less "\t" and "\n" (Unicode 15).
_CONTROL = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
    "\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb"
    "\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0001\U000e0020-\U000e007f]+"
)
_URL = re.compile(r"\b(?:https?://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]}]", re.I)
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]{1,64}@[^\W_](?:[\w-]{0,62}[^\W_])?"
    r"(?:\.[^\W_](?:[\w-]{0,62}[^\W_])?)*\.[^\W\d_]{2,63}\b"
)
#: A run of horizontal whitespace that is not already a single " ".
_HSPACE = re.compile(r" [^\S\n]+|[^\S\n ][^\S\n]*")
_LINE_EDGE = re.compile(r" ?\n ?")
_BLANK_LINES = re.compile(r"\n{3,}")
_LOOSE_BLANK_LINES = re.compile(r"\n(?:[^\S\n]*\n){2,}")


def looks_like_html(text: str) -> bool:
    """Whether the text contains an HTML tag, comment or doctype."""
    return _LOOKS_HTML.search(text) is not None


def html_to_text(markup: str) -> str:
    """The visible text of an HTML document, with block elements as line breaks."""
    try:
        parser = etree.HTMLParser(
            encoding="utf-8",
            remove_comments=True,
            remove_pis=True,
            no_network=True,
            recover=True,
            huge_tree=True,
        )
        root = etree.fromstring(markup.encode("utf-8", "replace"), parser)
        if root is None:
            return ""
        etree.strip_elements(root, *_DROPPED_ELEMENTS, with_tail=False)
        for element in root.iter():
            tag = element.tag
            if not isinstance(tag, str):
                continue
            tag = tag.lower()
            if tag in _PARAGRAPH_ELEMENTS:
                element.text = "\n\n" + (element.text or "")
                element.tail = "\n\n" + (element.tail or "")
            elif tag in _LINE_ELEMENTS:
                element.tail = "\n" + (element.tail or "")
            elif tag in _CELL_ELEMENTS:
                element.tail = " " + (element.tail or "")
        text = "".join(root.itertext())
    except (etree.LxmlError, ValueError):
        text = html.unescape(_TAG.sub(" ", markup))
    return _LOOSE_BLANK_LINES.sub("\n\n", text)


def drop_control_chars(text: str) -> str:
    """The text without control and format characters, keeping "\\n" and "\\t"."""
    return _CONTROL.sub("", text)


def collapse_whitespace(text: str) -> str:
    """One space between words, trimmed lines, at most one blank line, stripped ends."""
    text = _HSPACE.sub(" ", text)
    text = _LINE_EDGE.sub("\n", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return text.strip()


def clean_text(text: str, rules: Cleaning) -> str:
    """The text cleaned as the index's rules ask."""
    if not text:
        return ""
    if _SURROGATES.search(text):
        text = _SURROGATES.sub("", text)
    text = _LINE_BREAKS.sub("\n", text).replace("\u2029", "\n\n")
    if rules.drop_control_chars:
        text = drop_control_chars(text)
    if rules.strip_html and looks_like_html(text):
        text = html_to_text(text)
        if rules.drop_control_chars:
            text = drop_control_chars(text)
    if rules.normalize_unicode and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if rules.remove_urls:
        text = _URL.sub("", text)
    if rules.remove_emails and "@" in text:
        text = _EMAIL.sub("", text)
    if rules.collapse_whitespace:
        text = collapse_whitespace(text)
    return text


def dedupe(texts: Iterable[str]) -> list[int]:
    """Indexes of the first occurrence of each distinct text, in order."""
    seen: set[str] = set()
    keep: list[int] = []
    for i, text in enumerate(texts):
        if text not in seen:
            seen.add(text)
            keep.append(i)
    return keep
