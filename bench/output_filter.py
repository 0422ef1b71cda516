"""PII output filter on a token stream: what it costs per streamed token, beside the stream without a filter and
beside a naive streaming filter that re-redacts the whole text so far at every token (with the data pipeline's
`anonymize`) and holds back a fixed window of the longest PII it could meet.

The stream is generated-like text (prose in several languages with e-mails, IBANs, IPs, cards and phones from
Faker) tokenized by the real Apertus tokenizer and decoded token by token, as the engine streams it.

    python bench/output_filter.py [--tokens 2000]
The log (bench/_log.py) goes to bench/results/output_filter.json
"""

import argparse
import random
import statistics

from _log import BenchLog, ratio
from _timing import interleaved

from apertus.compliance.output_filter import PIIFilter, redact
from apertus.data.pii import anonymize
from apertus.tokenizer import Tokenizer, apertus_tokenizer_path

WINDOW = 64  # the naive filter's fixed hold-back: the widest bounded pattern (an IBAN candidate)


def stream_pieces(n_tokens: int) -> list[str]:
    import faker

    f = faker.Faker(["en_US", "de_DE", "fr_FR", "it_IT", "de_CH"])
    f.seed_instance(0)
    rng = random.Random(0)
    gens = [f.email, f.iban, f.ipv4, f.credit_card_number, f.phone_number]
    parts = []
    tok = Tokenizer.from_file(apertus_tokenizer_path())
    while True:
        parts.append(f.paragraph(nb_sentences=3))
        if rng.random() < 0.5:
            parts.append(f"You can use {rng.choice(gens)()} for that.")
        ids = tok.encode(" ".join(parts), bos=False)
        if len(ids) >= n_tokens:
            break
    from tokenizers.decoders import DecodeStream

    ds, pieces = DecodeStream(skip_special_tokens=False), []
    for t in ids[:n_tokens]:
        pieces.append(ds.step(tok.inner, t) or "")
    return pieces


def no_filter(pieces):
    out = []
    for p in pieces:
        out.append(p)
    return "".join(out)


def ours(pieces):
    f = PIIFilter()
    out = [f.feed(p) for p in pieces]
    out.append(f.flush())
    return "".join(out)


def naive(pieces):
    text, shown = "", 0
    out = []
    for p in pieces:
        text += p
        red = anonymize(text, extended=True)[0]
        upto = max(shown, len(red) - WINDOW)
        out.append(red[shown:upto])
        shown = upto
    red = anonymize(text, extended=True)[0]
    out.append(red[shown:])
    return "".join(out)


def held_back(pieces) -> list[int]:
    """Characters not yet shown after each token (the filter's pending text)."""
    f, held = PIIFilter(), []
    for p in pieces:
        f.feed(p)
        held.append(len(f._buf))
    return held


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    log = BenchLog("output_filter")
    pieces = stream_pieces(args.tokens)
    text = "".join(pieces)
    assert ours(pieces) == redact(text)
    t = interleaved({"none": lambda: no_filter(pieces), "ours": lambda: ours(pieces),
                     "naive": lambda: naive(pieces)}, rounds=args.rounds)
    n = len(pieces)
    held = held_back(pieces)  # the naive filter holds back min(WINDOW, text so far) characters
    print(f"{n} tokens, {len(text):,} characters, {redact(text).count('-pii>')} placeholders")
    for name in ("none", "ours", "naive"):
        print(f"  {name:<6} {1e6 * t[name] / n:9.2f} µs/token   {n / t[name]:12,.0f} tokens/s")
    print(f"ours: +{1e6 * (t['ours'] - t['none']) / n:.2f} µs per streamed token; naive full rescan / ours = "
          f"{t['naive'] / t['ours']:.1f}x")
    print(f"characters held back per token: ours median {statistics.median(held):.0f}, mean "
          f"{statistics.mean(held):.1f}, max {max(held)}; naive {WINDOW} (fixed window)")
    log.row(f"PII filter on a streamed token stream ({n:,} tokens), cost per token over no filter",
            f"+{1e6 * (t['ours'] - t['none']) / n:.2f} µs/token",
            f"naive re-redaction each token +{1e6 * (t['naive'] - t['none']) / n:.2f} µs/token",
            ratio((t["naive"] - t["none"]) / (t["ours"] - t["none"])) if t["ours"] > t["none"] else "")
    log.write({"tokens": n, "characters": len(text), "placeholders": redact(text).count("-pii>"),
               "rounds": args.rounds, "seconds": t, "held_back_chars": {
                   "median": statistics.median(held), "mean": statistics.mean(held), "max": max(held),
                   "naive_window": WINDOW}})


if __name__ == "__main__":
    main()
