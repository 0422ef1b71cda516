"""PII replacement as in the Apertus data pipeline (docs/recipe.md §5): emails, IPv4 addresses and IBANs become
placeholder tokens that exist in the Apertus vocabulary (`<email-pii>` 37, `<ip-pii>` 38, `<iban-pii>` 36).

`APERTUS_*` are the regexes of swiss-ai/pretrain-data `pii_formatter.py`, verbatim. `anonymize(exact=True)` applies
them exactly as that formatter does, byte for byte: per kind (email, then IP, then IBAN) it finds all matches, then
calls `str.replace(match, placeholder)` for each match not seen before in the document. So a matched string is also
replaced where it sits inside a longer one: "192.168.1.1 and 192.168.1.100" -> "<ip-pii> and <ip-pii>00", and
"a@b.com, xa@b.com" -> "<email-pii>, x<email-pii>".

The default is cleaner, with documented deviations: each match is replaced in place (`re.sub`, never inside another
token); an IP must not sit inside a longer dotted number ("1.2.3.4.5", "256.1.1.1" would otherwise lose a piece);
and IBANs are found in every country's length, compact or printed in groups, when their ISO 13616 mod-97 checksum
holds. The Apertus IBAN regex matches only the printed form with four 4-digit groups and 1-2 more characters: it
finds IBANs of 21-22 characters whose first 16 BBAN characters are digits (CH, DE, HR, ...), replaces only the first
22 characters of longer such IBANs (FR, IT, ...: the tail is left behind), and misses every compact IBAN and every
IBAN with letters in its first groups (GB, NL, ...). Everything the Apertus regexes replace, the default replaces too,
except those partial IP and IBAN matches.

The opt-in extended set adds phone numbers and payment-card numbers (Luhn-checked). The engine's PII output filter
reuses these compiled patterns: import them from here.
"""

from __future__ import annotations

import re

PLACEHOLDERS = {"email": "<email-pii>", "ip": "<ip-pii>", "iban": "<iban-pii>", "phone": "<phone-pii>",
                "card": "<card-pii>"}

# --- Apertus, verbatim (swiss-ai/pretrain-data src/data_pipeline_pretrain/pipeline/formatters/pii_formatter.py) ---
APERTUS_EMAIL = (
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
    r"(?:(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|\[(?:(?:25[0-5]|2[0-4]"
    r"[0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[A-Za-z0-9-]*[A-Za-z0-9]:)])"
)
APERTUS_IP = r"(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
APERTUS_IBAN = r"[A-Z]{2}[0-9]{2}(?: [0-9]{4}){4} [A-Z0-9]{1,2}"

EMAIL_RE = re.compile(APERTUS_EMAIL)
IP_RE = re.compile(r"(?<![0-9.])" + APERTUS_IP + r"(?![0-9]|\.[0-9])")
APERTUS_IP_RE = re.compile(APERTUS_IP)
APERTUS_IBAN_RE = re.compile(APERTUS_IBAN)
# An IBAN candidate: country, check digits, then alphanumerics in optional groups of up to 4 (compact or printed).
IBAN_CANDIDATE_RE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){8,30}")
# ISO 13616 registry lengths (SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}

# --- extended set (opt-in) ---
CARD_RE = re.compile(r"(?<![0-9-])(?:[0-9][ -]?){12,18}[0-9](?![0-9-])")
PHONE_RE = re.compile(
    r"(?<![\w+])\+[1-9][0-9]{0,2}(?:[ .-]?\(?[0-9]{1,4}\)?){2,6}(?![\w])"  # international: +41 44 668 18 00
    r"|(?<![\w(])\([0-9]{3}\)[ .-]?[0-9]{3}[ .-][0-9]{4}(?![\w])"  # North American (555) 123-4567
    r"|(?<![\w.-])[0-9]{3}-[0-9]{3}-[0-9]{4}(?![\w-])"  # 555-123-4567
    r"|(?<![\w.-])0[0-9]{1,4}(?:[ /-][0-9]{2,8}){1,4}(?![\w-])"  # national trunk prefix: 044 668 18 00, 0171-9876543
)


def iban_valid(compact: str) -> bool:
    """ISO 13616 check: registry length and mod-97 == 1 (letters count as 10..35)."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact.isalnum():
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def _iban_spans(text: str) -> list[tuple[int, int]]:
    """Spans of checksum-valid IBANs, cut at the registry length so a following word is never swallowed."""
    spans = []
    for m in IBAN_CANDIDATE_RE.finditer(text):
        want = IBAN_LENGTHS.get(m.group()[:2])
        if want is None:
            continue
        chars, end = 0, m.start()
        for end in range(m.start(), m.end()):
            if text[end] != " ":
                chars += 1
            if chars == want:
                break
        end += 1
        if chars != want or (end < len(text) and text[end].isalnum()):
            continue
        if iban_valid(text[m.start():end].replace(" ", "")):
            spans.append((m.start(), end))
    return spans


def _sub(pattern: re.Pattern, kind: str, text: str, counts: dict, check=None) -> str:
    def repl(m: re.Match) -> str:
        if check is not None and not check(m.group()):
            return m.group()
        counts[kind] += 1
        return PLACEHOLDERS[kind]

    return pattern.sub(repl, text)


def _card_ok(s: str) -> bool:
    digits = re.sub(r"[ -]", "", s)
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def _phone_ok(s: str) -> bool:
    n = sum(c.isdigit() for c in s)
    return 8 <= n <= 15 if s.startswith("+") else 9 <= n <= 12 if s.startswith("0") else n == 10


def _apertus_replace(pattern: re.Pattern, kind: str, text: str, counts: dict, seen: set) -> str:
    """The Apertus formatter's step for one kind: findall, then str.replace for each match not seen in the document
    before (in any kind), everywhere in the text."""
    for match in pattern.findall(text):
        if match not in seen:
            seen.add(match)
            counts[kind] += text.count(match)
            text = text.replace(match, PLACEHOLDERS[kind])
    return text


def anonymize(text: str, *, extended: bool = False, exact: bool = False) -> tuple[str, dict[str, int]]:
    """Replace PII by placeholders; returns (new_text, {kind: replacements}).

    Kinds: email, ip, iban (+ phone, card when `extended`). `exact=True` reproduces the Apertus formatter
    byte for byte (its three regexes, its order, its str.replace of each distinct match; see the module docstring)
    and ignores `extended`.
    """
    counts = {"email": 0, "ip": 0, "iban": 0}
    if exact:
        seen: set[str] = set()
        for pattern, kind in ((EMAIL_RE, "email"), (APERTUS_IP_RE, "ip"), (APERTUS_IBAN_RE, "iban")):
            text = _apertus_replace(pattern, kind, text, counts, seen)
        return text, counts
    text = _sub(EMAIL_RE, "email", text, counts)
    text = _sub(IP_RE, "ip", text, counts)
    spans = _iban_spans(text)  # whole valid IBANs first, so the Apertus regex cannot cut one in two
    for a, b in reversed(spans):
        text = text[:a] + PLACEHOLDERS["iban"] + text[b:]
    counts["iban"] += len(spans)
    text = _sub(APERTUS_IBAN_RE, "iban", text, counts)
    if extended:
        counts.update(card=0, phone=0)
        text = _sub(CARD_RE, "card", text, counts, _card_ok)
        text = _sub(PHONE_RE, "phone", text, counts, _phone_ok)
    return text, counts
