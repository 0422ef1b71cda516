"""PII output filter for generation: the filter Apertus promised but did not ship (docs/recipe.md §9).

Redacts e-mail addresses, IBANs (ISO 13616 checksum, every registry length, or the printed form the Apertus data
pipeline removed), payment-card numbers (Luhn), IPv4 addresses and phone numbers, with the placeholders of the data
pipeline (`<email-pii>`, `<iban-pii>`, `<card-pii>`, `<ip-pii>`, `<phone-pii>`), plus the strings of removal requests
(names or any text) given only as salted hashes (`<removed-pii>`), so the list that ships with a model leaks nothing
in clear text. The patterns and validators are those of `apertus.data.pii`.

What is redacted (the batch semantics, `redact(text)`): scanning left to right, at the first position where some
kind has a (validated) match, the longest such match is replaced (ties: the order of KINDS), and scanning resumes
after it. Whether a kind matches at a position is a property of that position only (the regexes' 1-character
lookbehinds see the real text), never of where a previous search started.

Streaming (`feed` / `flush`): the output of any chunking of a text is exactly `redact(text)`, so no part of a
match is ever emitted. Text is held back only from the first position whose verdict could still change:
- a pattern consumes only characters of its alphabet (`_Kind.alphabet`) and looks at most `lookahead` characters past
  a match, so the verdict at position s is final once a character outside the alphabet (or the pattern's maximum
  width) is followed by `lookahead` known characters;
- a removal-request match is a run of at most `max_words` words; its verdict is final once the words are complete
  and the last one cannot be the prefix of a longer request (the list carries hashes of the prefixes too).
So ordinary prose holds back about the last word; a digit group, an upper-case run or a word with `@` holds back until
it is decided. A single whitespace-free run (e-mail alphabet) is held until it ends.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..data.pii import (
    APERTUS_IBAN_RE,
    CARD_RE,
    EMAIL_RE,
    IBAN_CANDIDATE_RE,
    IBAN_LENGTHS,
    IP_RE,
    PHONE_RE,
    PLACEHOLDERS,
    iban_valid,
    luhn_valid,
)
from ..util import atomic_write_json

try:  # the maximum width of a pattern, from the parser of `re` itself
    from re import _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_parse as _sre_parse

PLACEHOLDERS = {**PLACEHOLDERS, "removed": "<removed-pii>"}
CONTEXT = 16  # characters of already-emitted text kept for the 1-character lookbehinds and word boundaries
HASH_FORMAT = "apertus-pii-hashes/1"


def _width(pattern: re.Pattern) -> int | None:
    hi = _sre_parse.parse(pattern.pattern).getwidth()[1]
    return None if hi >= 2**31 else hi


def _card(text: str, m: re.Match) -> int | None:
    """The longest Luhn-valid card number the match starts with (it may run into a following number: "4063996316836
    4993 ..."), ending where the pattern's lookahead allows (before a space, not a digit or hyphen)."""
    s = m.group()
    for end in range(len(s), 12, -1):
        if not s[end - 1].isdigit() or (end < len(s) and s[end] != " "):
            continue
        digits = s[:end].replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits):
            return m.start() + end
    return None


def _phone(text: str, m: re.Match) -> int | None:
    s = m.group()
    n = sum(c.isdigit() for c in s)
    ok = 8 <= n <= 15 if s.startswith("+") else 9 <= n <= 12 if s.startswith("0") else n == 10
    return m.end() if ok else None


def _iban(text: str, m: re.Match) -> int | None:
    """A checksum-valid IBAN cut at its registry length (not followed by a letter or digit), else the printed form
    the Apertus pipeline replaces (4 x 4 digit groups), starting at the same place."""
    want = IBAN_LENGTHS.get(m.group()[:2])
    if want is not None:
        chars, end = 0, m.start()
        while end < m.end() and chars < want:
            chars += text[end] != " "
            end += 1
        if chars == want and not (end < len(text) and text[end].isalnum()) \
                and iban_valid(text[m.start():end].replace(" ", "")):
            return end
    printed = APERTUS_IBAN_RE.match(text, m.start())
    return printed.end() if printed else None


@dataclass
class _Kind:
    name: str
    pattern: re.Pattern
    check: Callable[[str, re.Match], int | None]  # -> end of the accepted span, or None
    alphabet: str  # a character class holding every character the pattern can consume
    lookahead: int  # characters past a match the pattern (or check) looks at, at least 1
    outside: re.Pattern = field(init=False)
    width: int | None = field(init=False)  # the longest text one attempt can consume; None: unbounded

    def __post_init__(self):
        self.outside, self.width = re.compile(f"[^{self.alphabet}]"), _width(self.pattern)


# In priority order (ties between matches of equal length at the same position).
KINDS = {
    "email": _Kind("email", EMAIL_RE, lambda t, m: m.end(), r"A-Za-z0-9!#$%&'*+/=?^_`{|}~.@\[\]:\-", 1),
    "iban": _Kind("iban", IBAN_CANDIDATE_RE, _iban, "A-Z0-9 ", 1),
    "card": _Kind("card", CARD_RE, _card, r"0-9 \-", 1),
    "ip": _Kind("ip", IP_RE, lambda t, m: m.end(), r"0-9.", 2),
    "phone": _Kind("phone", PHONE_RE, _phone, r"0-9 +().\-/", 1),
}
WORD_RE = re.compile(r"(?<!\w)\w+")
SEPARATOR_RE = re.compile(r"\W{1,3}")  # what may stand between the words of a removal request ("Doe, Jane")


# --- removal requests as salted hashes ------------------------------------------------------------------------------

def normalize_words(text: str) -> list[str]:
    return WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())


def _digest(salt: bytes, words: list[str]) -> str:
    return hashlib.sha256(salt + b"\0" + " ".join(words).encode()).hexdigest()


def make_hash_list(requests: Iterable[str], salt: bytes | None = None) -> dict:
    """The publishable list for removal requests (names, addresses, any strings): SHA-256 of salt + the normalized
    words, for each request and each of its word prefixes (so a stream holds back only while a prefix matches).
    Sorted, so the order of requests is not kept. A salted hash hides the strings from a reader and from precomputed
    tables, not from someone who guesses a candidate and hashes it: publish only what a request asked to suppress."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    full, prefixes, max_words = set(), set(), 0
    for req in requests:
        words = normalize_words(req)
        if not words:
            continue
        full.add(_digest(salt, words))
        prefixes.update(_digest(salt, words[:k]) for k in range(1, len(words)))
        max_words = max(max_words, len(words))
    return {"format": HASH_FORMAT, "algorithm": "sha256(salt + 0x00 + casefolded NFKC words joined by spaces)",
            "salt": salt.hex(), "max_words": max_words, "hashes": sorted(full), "prefixes": sorted(prefixes)}


def load_hash_list(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: hash list not found (make one with `apertus redact --make-hash-list`)")
    try:
        d = json.loads(path.read_text())
        if d.get("format") != HASH_FORMAT:
            raise ValueError(f"format is {d.get('format')!r}, not {HASH_FORMAT}")
        bytes.fromhex(d["salt"])
        int(d["max_words"])
        list(d["hashes"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a PII hash list ({e})") from None
    return d


def write_hash_list(requests_file: str | Path, out: str | Path) -> dict:
    """Reads one request per line (blank lines skipped) and writes the salted hash list (atomically)."""
    lines = Path(requests_file).read_text(encoding="utf-8").splitlines()
    hl = make_hash_list(line for line in lines if line.strip())
    atomic_write_json(out, hl)
    return hl


def hash_list_text(hash_list: dict, out: str | Path) -> str:
    """What `write_hash_list` wrote, in one line."""
    return f"wrote {out}: {len(hash_list['hashes'])} salted hashes (up to {hash_list['max_words']} words)"


class _Requests:
    def __init__(self, hl: dict):
        self.salt, self.max_words = bytes.fromhex(hl["salt"]), int(hl["max_words"])
        self.full, self.prefixes = set(hl["hashes"]), set(hl.get("prefixes", ()))

    def at(self, text: str, start: int, end_of_text: bool) -> tuple[int | None, bool]:
        """(end of the longest request starting with the word at `start` or None, whether that verdict is final)."""
        best, words, pos = None, [], start
        while True:
            w = WORD_RE.match(text, pos)
            if w is None:  # no word here: the chain ends
                return best, True
            if w.end() == len(text) and not end_of_text:
                return best, False  # the word may go on
            words.append(unicodedata.normalize("NFKC", w.group()).casefold())
            h = _digest(self.salt, words)
            if h in self.full:
                best = w.end()
            if len(words) >= self.max_words or h not in self.prefixes:
                return best, True
            sep = SEPARATOR_RE.match(text, w.end())
            if sep is None:
                return best, True
            if sep.end() == len(text) and not end_of_text:
                return best, False  # the separator (and the next word) may still come
            pos = sep.end()


# --- the filter -----------------------------------------------------------------------------------------------------

class PIIFilter:
    """Streaming redaction: `feed(text)` returns the text that is safe to show now, `flush()` the rest at the end.
    `redact(text)` does both at once. `counts` holds the replacements per kind."""

    def __init__(self, kinds: Iterable[str] | None = None, hash_list: dict | str | Path | None = None):
        names = list(KINDS) if kinds is None else list(kinds)
        bad = [k for k in names if k not in KINDS]
        if bad:
            raise ValueError(f"unknown PII kind(s) {', '.join(bad)}; known: {', '.join(KINDS)}")
        self.kinds = [KINDS[k] for k in KINDS if k in names]
        if isinstance(hash_list, (str, Path)):
            hash_list = load_hash_list(hash_list)
        self.requests = _Requests(hash_list) if hash_list and hash_list.get("hashes") else None
        self.counts = dict.fromkeys([k.name for k in self.kinds] + (["removed"] if self.requests else []), 0)
        self._ctx, self._buf = "", ""

    def feed(self, text: str) -> str:
        self._buf += text
        return self._emit(final=False)

    def flush(self) -> str:
        out = self._emit(final=True)
        self._ctx = ""
        return out

    def redact(self, text: str) -> str:
        return self.feed(text) + self.flush()

    # --- internals ------------------------------------------------------------------------------------------------
    def _hold(self, s: str, off: int) -> int:
        """The first position of `s` (>= off) whose verdict may change when more text arrives."""
        n, hold = len(s), len(s)
        for k in self.kinds:
            # the last character outside the alphabet with `lookahead` known characters after it
            q = n - k.lookahead
            while q >= off and not k.outside.match(s, q):
                q -= 1
            if k.width is not None:
                q = max(q, n - k.lookahead - k.width)
            hold = min(hold, max(q + 1, off))
        if self.requests is not None:
            starts = [m.start() for m in WORD_RE.finditer(s, off)][-(self.requests.max_words + 1):]
            for st in starts:
                if st < hold and not self.requests.at(s, st, False)[1]:
                    hold = st
                    break
        return hold

    def _next(self, s: str, pos: int, limit: int, final: bool) -> tuple[int, int, str] | None:
        """The leftmost, then longest, match starting in [pos, limit): (start, end, kind)."""
        best = None
        for k in self.kinds:
            p = pos
            while p < limit:
                m = k.pattern.search(s, p)
                if m is None or m.start() >= limit or (best and m.start() > best[0]):
                    break
                end = k.check(s, m)
                if end is not None:
                    if best is None or m.start() < best[0] or end > best[1]:
                        best = (m.start(), end, k.name)
                    break
                p = m.start() + 1
        if self.requests is not None:
            for w in WORD_RE.finditer(s, pos, limit):
                if best and w.start() > best[0]:
                    break
                end = self.requests.at(s, w.start(), final)[0]
                if end is not None:
                    if best is None or w.start() < best[0] or end > best[1]:
                        best = (w.start(), end, "removed")
                    break
        return best

    def _emit(self, final: bool) -> str:
        s, off = self._ctx + self._buf, len(self._ctx)
        limit = len(s) if final else self._hold(s, off)
        out, p = [], off
        while (m := self._next(s, p, limit, final)) is not None:
            start, end, kind = m
            out += [s[p:start], PLACEHOLDERS[kind]]
            self.counts[kind] += 1
            p = end  # a match starting before `limit` is final, even where it ends past it
        if p < limit:
            out.append(s[p:limit])
            p = limit
        self._ctx, self._buf = s[max(0, p - CONTEXT):p], s[p:]
        return "".join(out)


def redact(text: str, kinds: Iterable[str] | None = None, hash_list: dict | str | Path | None = None) -> str:
    """The text with every PII match replaced by its placeholder (what a stream of it shows)."""
    return PIIFilter(kinds, hash_list).redact(text)


def filter_stream(pieces: Iterable[str], filt: PIIFilter) -> Iterator[str]:
    """Redacts a stream of text pieces (empty pieces are yielded while text is held back)."""
    for piece in pieces:
        yield filt.feed(piece)
    yield filt.flush()


def filter_deltas(deltas: Iterable, filt: PIIFilter) -> Iterator:
    """Redacts the `.text` of engine stream deltas in place (the last one, with `finish_reason`, also gets what
    was held back); token ids and log-probabilities pass unchanged."""
    for d in deltas:
        d.text = filt.feed(d.text)
        if getattr(d, "finish_reason", None) is not None:
            d.text += filt.flush()
        yield d


# --- the command line (`apertus redact`, `--pii-filter` of generate, chat and serve) ---------------------------------


def filter_factory(hash_list: str | Path | None = None):
    """One streaming filter per reply, all sharing the removal requests of the salted hash list file, if any."""
    requests = load_hash_list(hash_list) if hash_list else None
    return lambda: PIIFilter(hash_list=requests)


def redact_stream(inp, out, kinds: list[str] | None = None, hash_list: str | Path | None = None,
                  chunk: int = 0) -> dict[str, int]:
    """Copy `inp` to `out` redacted, `chunk` characters at a time (0: line by line), writing each piece as soon as
    the filter lets it go; returns the replacements per kind."""
    filt = PIIFilter(kinds, hash_list)
    while piece := inp.read(chunk) if chunk else inp.readline():
        out.write(filt.feed(piece))
        out.flush()
    out.write(filt.flush())
    return filt.counts
