"""Tokenizer: the released ids, the byte-identical rebuild, training, transformers loading, fertility evaluation."""

import json
import subprocess
import sys

import pytest

from apertus.chat import encode_chat
from apertus.cli import main
from apertus.tokenizer import (
    NON_SPECIAL_IDS,
    SPECIAL_TOKENS,
    Tokenizer,
    apertus_tokenizer_path,
    tiny_tokenizer,
    train_tokenizer,
)
from apertus.tokenizer_eval import fertility, gini, read_flores, read_udhr
from apertus.util import sha256_file

# data/apertus_tokenizer/README.md (with the post-processor's BOS)
VECTORS = [
    ("Hello world!", [1, 22177, 4304, 1033]),
    ("Grüezi mitenand, wie gaht's?", [1, 20560, 109664, 4606, 2635, 1262, 1421, 1044, 5843, 17019, 1478, 1681, 1063]),
    ("Alle Menschen sind frei und gleich an Würde und Rechten geboren.",
     [1, 72121, 18828, 5989, 49803, 1673, 16955, 1420, 40251, 1558, 1673, 1871, 20355, 76741, 1046]),
    ("世界人权宣言", [1, 29659, 3405, 46130, 128108]),
    ("<|user_start|>Hi<|user_end|>", [1, 65, 37133, 66]),
]


@pytest.fixture(scope="module")
def apertus(apertus_tokenizer_json):
    return Tokenizer.from_file(apertus_tokenizer_json)


@pytest.fixture(scope="module")
def released(apertus_tokenizer_json):
    return json.loads(apertus_tokenizer_json.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def udhr():
    return read_udhr()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, udhr):
    """A 4096-token BPE on a UDHR sample of 80 languages (a couple of seconds)."""
    texts = [udhr[k] for k in sorted(udhr)[::5]]
    return train_tokenizer(texts, 4096, tmp_path_factory.mktemp("trained")), texts


@pytest.mark.parametrize("text,ids", VECTORS)
def test_reference_vectors(apertus, text, ids):
    assert apertus.encode(text) == ids
    assert apertus.encode(text, bos=False) == ids[1:]
    assert apertus.decode(ids) == "<s>" + text
    assert apertus.decode(ids, skip_special_tokens=True) == text.replace("<|user_start|>", "").replace("<|user_end|>",
                                                                                                        "")


def test_layout_and_lookup(apertus, released):
    assert apertus.vocab_size == 131072 and (apertus.bos_id, apertus.eos_id, apertus.pad_id) == (1, 2, 3)
    # our hard-coded special-token table is the released one, flags included
    assert [(t["id"], t["content"], t["special"]) for t in released["added_tokens"]] == [
        (i, t, i not in NON_SPECIAL_IDS) for i, t in enumerate(SPECIAL_TOKENS)]
    for name, i in [("<iban-pii>", 36), ("<email-pii>", 37), ("<ip-pii>", 38), ("<|system_start|>", 61),
                    ("<|assistant_end|>", 68), ("<|tools_suffix|>", 72), ("<SPECIAL_999>", 999), ("\\boxed{", 17)]:
        assert apertus.token_id(name) == i
    with pytest.raises(ValueError, match="not in the vocabulary"):
        apertus.token_id("<|no_such_token|>")
    assert 37 in apertus.encode("mail <email-pii> now", bos=False)


def test_encode_batch_and_from_directory(apertus, apertus_tokenizer_json):
    texts = [t for t, _ in VECTORS] + ["", " \n\t", "x" * 5000]
    assert apertus.encode_batch(texts) == [apertus.encode(t) for t in texts]
    assert apertus.encode_batch(texts, bos=False) == [apertus.encode(t, bos=False) for t in texts]
    same_dir = Tokenizer.from_file(apertus_tokenizer_json.parent)
    assert same_dir.encode("Hello world!") == [1, 22177, 4304, 1033]
    assert apertus_tokenizer_path().resolve() == apertus_tokenizer_json.resolve()


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path)
    import tokenizers

    no_bos = Tokenizer(tokenizers.Tokenizer(tokenizers.models.BPE()))
    with pytest.raises(ValueError, match="no <s>"):
        no_bos.encode("x")
    assert no_bos.encode_batch(["x"], bos=False) == [[]]


def test_matches_transformers_on_udhr(apertus, apertus_tokenizer_json, udhr):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(apertus_tokenizer_json.parent))
    texts = [udhr[k][:3000] for k in sorted(udhr)[::7]]
    assert hf(texts)["input_ids"] == apertus.encode_batch(texts)  # BOS like the base model, no EOS


def test_save_loads_in_transformers(apertus, tmp_path, data_dir):
    transformers = pytest.importorskip("transformers")
    template = (data_dir / "apertus_tokenizer" / "chat_template.jinja").read_text()
    apertus.save(tmp_path / "instruct", chat_template=template)
    apertus.save(tmp_path / "base")
    assert sha256_file(tmp_path / "base" / "tokenizer.json") == sha256_file(apertus_tokenizer_path())
    inst = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "instruct"))
    base = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "base"))
    assert inst("Hello world!").input_ids == base("Hello world!").input_ids == [1, 22177, 4304, 1033]
    assert (inst.eos_token, inst.padding_side, base.eos_token) == ("<|assistant_end|>", "left", "</s>")
    assert inst.chat_template == template and base.chat_template is None


def test_rebuild_is_byte_identical(tmp_path, apertus_tokenizer_json, capsys):
    pytest.importorskip("mistral_common")
    assert main(["tokenizer", "apertus", "--out", str(tmp_path / "ap")]) == 0
    assert (tmp_path / "ap" / "tokenizer.json").read_bytes() == apertus_tokenizer_json.read_bytes()
    out = capsys.readouterr().out
    assert "bb201fb226cde11f" in out and "config: instruct (eos <|assistant_end|>, chat template)" in out
    config = json.loads((tmp_path / "ap" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|assistant_end|>" and (tmp_path / "ap" / "chat_template.jinja").is_file()


# --- training ------------------------------------------------------------------------------------------------------


def test_trained_layout_matches_apertus(trained, released):
    tok, _ = trained
    assert tok.vocab_size == 4096
    doc = json.loads(tok.inner.to_str())
    assert doc["added_tokens"] == released["added_tokens"]  # ids 0-999, names, flags
    for key in ("pre_tokenizer", "post_processor", "decoder", "normalizer"):
        assert doc[key] == released[key]
    ours = {i: t for t, i in doc["model"]["vocab"].items()}
    theirs = {i: t for t, i in released["model"]["vocab"].items()}
    assert [ours[i] for i in range(1256)] == [theirs[i] for i in range(1256)]  # specials, then the 256 bytes
    # so chat token ids are Apertus's
    ids, _ = encode_chat(tok, [{"role": "user", "content": "Hoi"}], add_generation_prompt=True, date="2025-09-02")
    hoi = tok.encode("Hoi", bos=False)
    assert ids[:2] == [1, 61] and ids[-len(hoi) - 3:] == [65, *hoi, 66, 67] and {62, 63, 64} <= set(ids)


def test_trained_is_deterministic_across_processes(trained, tmp_path):
    tok, texts = trained
    again = train_tokenizer(texts, 4096)
    assert again.inner.to_str() == tok.inner.to_str()
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    code = ("import json,sys; from apertus.tokenizer import train_tokenizer; "
            "t=[json.loads(l)['text'] for l in open(sys.argv[1])]; print(train_tokenizer(t, 4096).inner.to_str())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "corpus.jsonl")], capture_output=True,
                         text=True, check=True, env={"PYTHONHASHSEED": "123", **__import__("os").environ})
    assert out.stdout.strip() == tok.inner.to_str()


def test_trained_round_trips_udhr_in_transformers(trained, udhr):
    transformers = pytest.importorskip("transformers")
    tok, _ = trained
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tok.save(d)
        auto = transformers.AutoTokenizer.from_pretrained(d)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{d}/tokenizer.json")
    langs = sorted(udhr)
    scripts = {k.split("_")[-1] for k in langs}
    assert len(langs) >= 400 and len(scripts) >= 30
    texts = [udhr[k] for k in langs]
    ours = tok.encode_batch(texts, bos=False)
    theirs = auto(texts, add_special_tokens=False)["input_ids"]
    assert theirs == ours
    for text, ids in zip(texts, ours, strict=True):
        assert tok.decode(ids) == text
    assert fast.batch_decode(theirs[:60]) == texts[:60]
    assert auto("Hoi")["input_ids"][0] == 1  # BOS, as the base model


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="1000 specials"):
        train_tokenizer(["abc"], 1200)


def test_tiny_tokenizer_is_cached(tmp_path):
    a = tiny_tokenizer(tmp_path / "tiny", vocab_size=1500)
    stamp = (tmp_path / "tiny" / "tokenizer.json").stat().st_mtime_ns
    b = tiny_tokenizer(tmp_path / "tiny", vocab_size=1500)
    assert (tmp_path / "tiny" / "tokenizer.json").stat().st_mtime_ns == stamp
    assert a.vocab_size == b.vocab_size == 1500 and b.encode("Hoi") == a.encode("Hoi")


# --- evaluation ----------------------------------------------------------------------------------------------------


def test_gini():
    assert gini([2.0, 2.0, 2.0]) == 0.0
    assert gini([0.0, 0.0, 1.0]) == pytest.approx(2 / 3)
    xs = [0.3, 0.1, 0.7, 0.25, 0.9]
    brute = sum(abs(a - b) for a in xs for b in xs) / (2 * len(xs) ** 2 * (sum(xs) / len(xs)))
    assert gini(xs) == pytest.approx(brute)


def test_fertility_counts(apertus):
    rows = fertility(apertus, {"eng_Latn": "Hello world!", "deu_Latn": "Grüezi mitenand, wie gaht's?"})
    assert rows["eng_Latn"] | {} == {"tokens": 3, "words": 2, "bytes": 12, "tokens_per_word": 1.5,
                                     "tokens_per_byte": 0.25, "premium": 1.0}
    assert rows["deu_Latn"]["tokens"] == 12 and rows["deu_Latn"]["premium"] == 4.0


def test_cli_train_and_eval(tmp_path, capsys):
    flores = read_flores()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    langs = ["eng_Latn", "deu_Latn", "fra_Latn", "zho_Hans", "arb_Arab", "hin_Deva", "rus_Cyrl", "amh_Ethi"]
    for lang in langs:
        (corpus / f"{lang}.txt").write_text(flores[lang], encoding="utf-8")
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "2000", "--out",
                 str(tmp_path / "tok")]) == 0
    meta = json.loads((tmp_path / "tok" / "training.json").read_text())
    assert meta["documents"] == len(langs) and meta["vocab_size"] <= 2000
    assert meta["tokenizer_sha256"] == sha256_file(tmp_path / "tok" / "tokenizer.json")
    trained = capsys.readouterr().out
    assert trained.startswith("trained a ") and f"({meta['documents']:,} documents)" in trained
    assert trained.endswith(f"-> {tmp_path / 'tok'} (sha256 {meta['tokenizer_sha256'][:16]}...)\n")
    out = tmp_path / "eval"
    assert main(["tokenizer", "eval", "--tokenizer", "apertus", f"small={tmp_path / 'tok'}", "--corpus", str(corpus),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| apertus |" in printed and "| small |" in printed and "Gini" in printed
    assert printed.endswith(f"|\n\n{len(langs)} languages; per-language table, JSON and chart in "
                            f"{out}/fertility.{{md,json,png}}\n")
    result = json.loads((out / "fertility.json").read_text())
    assert set(result) == {"apertus", "small"} and set(result["small"]["languages"]) == set(langs)
    small = Tokenizer.from_file(tmp_path / "tok")
    for lang in langs:
        assert result["small"]["languages"][lang]["tokens"] == len(small.encode(flores[lang], bos=False))
    tpb = [r["tokens_per_byte"] for r in result["apertus"]["languages"].values()]
    assert result["apertus"]["summary"]["gini_tokens_per_byte"] == pytest.approx(gini(tpb))
    assert (out / "fertility.png").stat().st_size > 10_000 and "| zho_Hans |" in (out / "fertility.md").read_text()
    assert main(["tokenizer", "eval", "--tokenizer", "apertus", "--corpus", str(tmp_path / "missing")]) == 2
