"""The PII output filter: recall on a labelled set of PII in generated-like text (values from Faker, a generator we
did not write, in 12 locales), no leak across stream chunk boundaries (every chunking of a text gives exactly the
batch redaction, and every emitted prefix is a prefix of it), holding back little on prose, the salted hash list of
removal requests, the engine-delta wrapper and the CLI."""

import itertools
import json
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest

from apertus.compliance.output_filter import (
    PLACEHOLDERS,
    PIIFilter,
    filter_deltas,
    make_hash_list,
    redact,
)

faker = pytest.importorskip("faker")

LOCALES = ["en_US", "en_GB", "de_DE", "de_CH", "fr_FR", "fr_CH", "it_IT", "es_ES", "nl_NL", "pl_PL", "pt_PT", "sv_SE"]
# Generated-like contexts: a model answering in several languages, PII at the start, middle, end, in brackets,
# before punctuation and newlines.
TEMPLATES = ["You can reach me at {x}.", "Meine Daten: {x}, bitte vertraulich behandeln.", "Contactez-moi : {x}",
             "The value is {x} and nothing else.", "{x}", "Per il bonifico usare {x}.", "(see {x})",
             "Sure! Here it is:\n{x}\nAnything else?", "Mi número es {x}; llámame.", "- {x}\n- second item"]
CARD_TYPES = ["visa16", "visa13", "visa19", "mastercard", "amex", "discover", "diners", "jcb16"]


def _labelled(n_per_kind=300, seed=0):
    f = faker.Faker(LOCALES)
    f.seed_instance(seed)
    cards = faker.Faker("en_US")  # the card brands are per locale; en_US has them all
    cards.seed_instance(seed)
    rng = random.Random(seed)

    def printed_iban():
        ib = f.iban()
        return " ".join(ib[i:i + 4] for i in range(0, len(ib), 4))

    gens = {"email": f.email, "iban": lambda: rng.choice([f.iban(), printed_iban()]), "ip": f.ipv4,
            "card": lambda: _formatted_card(cards.credit_card_number(rng.choice(CARD_TYPES)), rng),
            "phone": f.phone_number}
    return [(kind, x, rng.choice(TEMPLATES).format(x=x)) for kind, g in gens.items() for x in
            (g() for _ in range(n_per_kind))]


def _formatted_card(number, rng):
    sep = rng.choice(["", " ", "-"])
    return sep.join(number[i:i + 4] for i in range(0, len(number), 4)) if sep else number


def _recall(samples):
    hits, total = {}, {}
    for kind, x, text in samples:
        out = redact(text)
        total[kind] = total.get(kind, 0) + 1
        hits[kind] = hits.get(kind, 0) + (x not in out and PLACEHOLDERS[kind] in out)
    return {k: hits[k] / total[k] for k in total}


def test_recall_on_labelled_pii():
    recall = _recall(_labelled())
    print("recall", recall)
    for kind in ("email", "iban", "ip", "card"):
        assert recall[kind] >= 0.99, (kind, recall)
    # Phones use the data pipeline's PHONE_RE, which leaves out US extensions ("x123"), dotted US numbers and bare
    # 10-digit runs (0.22 measured on Faker's formats): a regression floor, reported as a known weakness.
    assert recall["phone"] >= 0.2


def test_false_positives_on_ordinary_numbers():
    clean = ["Version 3.12.1 was released on 2024-05-01.", "It costs 1,299.00 CHF.", "Meet at 10:30 or 14:45.",
             "Order 12345678 shipped.", "The years 1990 to 2020.", "pi is 3.14159265358979", "Room 101, floor 3.",
             "HTTP/1.1 200 OK", "A 4-3-3 formation.", "Use Python 3.11 and torch 2.13.0.",
             "Population: 8,962,258 (2023)."]
    assert [redact(t) for t in clean] == clean


def _chunkings(n, max_cuts=2):
    """Every way to cut a text of length n into at most max_cuts + 1 pieces, plus one piece per character."""
    for k in range(max_cuts + 1):
        yield from itertools.combinations(range(1, n), k)
    yield tuple(range(1, n))


def _stream(text, cuts, filt):
    pieces, prev, emitted = [], 0, ""
    for c in (*cuts, len(text)):
        emitted += filt.feed(text[prev:c])
        pieces.append(emitted)
        prev = c
    return emitted + filt.flush(), pieces


ADVERSARIAL = ["a@b.c-- d", "x a@b.c.d.e-f ok", "1.2.3.4.5 and 10.0.0.1", "4111 1111 1111 1111 2",
               "card 4111-1111-1111-1111.", "DE89 3704 0044 0532 0130 00X", "+41 44 668 18 00!", "(555) 123-4567",
               "CH93 0076 2011 6238 5295 7", "GB82WEST12345698765432 ", "mail:x@y.io,z@w.org", "Jane  Doe said",
               "jane doe-ish", "Doe, Jane", "192.168.001.001x", "ip 8.8.8.8\n", "0171-9876543 abc"]


@pytest.mark.parametrize("text", ADVERSARIAL + [t for _, _, t in _labelled(3, seed=1)])
def test_stream_equals_batch_for_every_chunking(text):
    hl = make_hash_list(["Jane Doe", "Max Muster"], salt=b"s" * 16)
    want = PIIFilter(hash_list=hl).redact(text)
    for cuts in _chunkings(len(text)):
        got, prefixes = _stream(text, cuts, PIIFilter(hash_list=hl))
        assert got == want, (text, cuts)
        assert all(want.startswith(p) for p in prefixes), (text, cuts)  # nothing shown is ever taken back


def test_random_chunkings_of_long_texts():
    rng = random.Random(3)
    samples = _labelled(40, seed=2)
    text = " ".join(t for _, _, t in samples)
    want = redact(text)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, len(text) // 3)))
        assert _stream(text, cuts, PIIFilter())[0] == want
    assert all(x not in want for kind, x, _ in samples if kind != "phone")


def test_holds_back_little_on_prose():
    f = PIIFilter()
    text = "The cat sat on the mat and looked at the garden for a long while. "
    shown = "".join(f.feed(ch) for ch in text)
    assert len(text) - len(shown) <= 2  # at most the trailing ". " (a phone number could still start there)
    f = PIIFilter()
    shown = f.feed("Write to jane.doe@exam")
    assert shown == "Write to "  # the address is held back until it is decided
    assert f.feed("ple.com now") == "<email-pii> " and f.flush() == "now"


def test_hash_list_leaks_nothing_and_matches_normalized(tmp_path):
    hl = make_hash_list(["Jane Doe", "Rue du Marché 4"])
    blob = json.dumps(hl)
    assert "jane" not in blob.lower() and "march" not in blob.lower()
    assert make_hash_list(["Jane Doe"])["hashes"] != make_hash_list(["Jane Doe"])["hashes"]  # fresh salt each time
    f = PIIFilter(hash_list=hl)
    assert f.redact("I met JANE   doe at rue du marché 4. Jane Doering too.") == \
        "I met <removed-pii> at <removed-pii>. Jane Doering too."
    assert f.counts["removed"] == 2
    path = tmp_path / "list.json"
    path.write_text(blob)
    assert PIIFilter(hash_list=path).redact("jane doe") == "<removed-pii>"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a PII hash list"):
        PIIFilter(hash_list=path)


def test_filter_deltas_and_kinds():
    deltas = [SimpleNamespace(text=t, token_ids=[i], finish_reason=None) for i, t in
              enumerate(["Mail ", "a@b", ".org", " or ", "10.0.0", ".1"])]
    deltas[-1].finish_reason = "stop"
    out = list(filter_deltas(deltas, PIIFilter()))
    assert "".join(d.text for d in out) == "Mail <email-pii> or <ip-pii>"
    assert [d.token_ids for d in out] == [[i] for i in range(6)]
    assert PIIFilter(kinds=["email"]).redact("a@b.org 10.0.0.1") == "<email-pii> 10.0.0.1"
    with pytest.raises(ValueError, match="unknown PII kind"):
        PIIFilter(kinds=["names"])


def test_cli_redact(tmp_path):
    req = tmp_path / "requests.txt"
    req.write_text("Jane Doe\n\n")
    hl = tmp_path / "hl.json"
    r = subprocess.run([sys.executable, "-m", "apertus.cli", "redact", "--make-hash-list", str(req), "--out",
                        str(hl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "apertus.cli", "redact", "--hash-list", str(hl), "--chunk", "3"],
                       input="Jane Doe: jane@example.com, IBAN CH93 0076 2011 6238 5295 7\n", capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "<removed-pii>: <email-pii>, IBAN <iban-pii>\n"


def test_engine_streams_redacted_text(tmp_path):
    """A tiny model that has memorized a sentence with an e-mail and an IP: the engine's stream with the filter on
    is exactly the redaction of its unfiltered output, piece by piece and in `handle.text`."""
    import torch
    from data_helpers import tiny_tokenizer

    from apertus.config import preset
    from apertus.infer import Engine, SamplingParams
    from apertus.model import build_model
    from apertus.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tiny_tokenizer(tmp_path))
    secret = " reach jane.doe@example.org or 10.0.0.1 today"
    ids = torch.tensor([tok.encode("Please" + secret)])
    cfg = preset("tiny")
    cfg.num_hidden_layers, cfg.vocab_size = 2, 640
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    params = SamplingParams(temperature=0, max_tokens=ids.shape[1] - 2)
    with Engine(model.eval(), tokenizer=tok) as engine:
        raw = engine.generate(["Please"], params)[0].text
    assert "jane.doe@example.org" in raw  # memorized
    with Engine(model, tokenizer=tok, output_filter=PIIFilter) as engine:
        handle = engine.submit("Please", params)
        pieces = [d.text for d in handle]
    assert "".join(pieces) == handle.text == redact(raw)
    assert "<email-pii>" in handle.text and "<ip-pii>" in handle.text and "@" not in "".join(pieces)

    from apertus.checkpoint import save_model  # the CLI flag: `apertus generate --pii-filter`

    save_model(model, tmp_path / "ckpt", extra_files={"tokenizer.json": (tmp_path / "tokenizer.json").read_text()})
    cmd = [sys.executable, "-m", "apertus.cli", "generate", str(tmp_path / "ckpt"), "--prompt", "Please",
           "--temperature", "0", "--max-tokens", str(params.max_tokens), "--device", "cpu"]
    plain = subprocess.run(cmd, capture_output=True, text=True)
    filtered = subprocess.run(cmd + ["--pii-filter"], capture_output=True, text=True)
    assert plain.returncode == filtered.returncode == 0, filtered.stderr
    assert "jane.doe@example.org" in plain.stdout and filtered.stdout == redact(plain.stdout)
