"""Byte-level BPE tokenizers with the Apertus special-token layout, on Hugging Face `tokenizers`.

Three ways to get one, all giving the same `tokenizer.json` format and the same ids 0-999:
- `apertus_tokenizer_path()`: the released Apertus tokenizer (fetched, or in $APERTUS_DATA, else rebuilt from
  `mistral-common` once into ~/.cache/apertus).
- `rebuild_apertus(out_dir)`: the byte-identical rebuild from the tekken vocabulary (recipe in
  `data/apertus_tokenizer/README.md` in the repository), checked against the released sha256.
- `train_tokenizer(texts, vocab_size, out_dir)`: a new BPE trained on a corpus, same pre-tokenizer and specials.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import tokenizers

from .util import atomic_write_text, sha256_file

# Ids 0-999 are reserved; these carry names, every other id n is `<SPECIAL_n>` (also 10 and 73).
NAMED_SPECIALS = {
    0: "<unk>", 1: "<s>", 2: "</s>", 3: "<pad>", 4: "[/INST]", 5: "[AVAILABLE_TOOLS]", 6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]", 8: "[/TOOL_RESULTS]", 9: "[TOOL_CALLS]", 11: "[PREFIX]", 12: "[MIDDLE]", 13: "[SUFFIX]",
    14: "\\begin{", 15: "\\end{", 16: "\\text{", 17: "\\boxed{",
    18: "<filename>", 19: "<gh_stars>", 20: "<issue_start>", 21: "<issue_comment>", 22: "<issue_closed>",
    23: "<jupyter_start>", 24: "<jupyter_text>", 25: "<jupyter_code>", 26: "<jupyter_output>", 27: "<empty_output>",
    28: "<commit_before>", 29: "<commit_msg>", 30: "<commit_after>", 31: "<reponame>",
    32: "<think>", 33: "</think>", 34: "<answer>", 35: "</answer>",
    36: "<iban-pii>", 37: "<email-pii>", 38: "<ip-pii>",
    39: "<file_sep>", 40: "<code_to_intermediate>", 41: "<intermediate_to_code>",
    42: "<pr>", 43: "<pr_status>", 44: "<pr_is_merged>", 45: "<pr_base>", 46: "<pr_file>", 47: "<pr_base_code>",
    48: "<pr_diff>", 49: "<pr_diff_hunk>", 50: "<pr_comment>", 51: "<pr_event_id>", 52: "<pr_review>",
    53: "<pr_review_state>", 54: "<pr_review_comment>", 55: "<pr_in_reply_to_review_id>",
    56: "<pr_in_reply_to_comment_id>", 57: "<pr_diff_hunk_comment_line>",
    58: "<|fim_begin|>", 59: "<|fim_hole|>", 60: "<|fim_end|>",
    61: "<|system_start|>", 62: "<|system_end|>", 63: "<|developer_start|>", 64: "<|developer_end|>",
    65: "<|user_start|>", 66: "<|user_end|>", 67: "<|assistant_start|>", 68: "<|assistant_end|>",
    69: "<|inner_prefix|>", 70: "<|inner_suffix|>", 71: "<|tools_prefix|>", 72: "<|tools_suffix|>",
}
NUM_SPECIAL = 1000
NON_SPECIAL_IDS = (14, 15, 16, 17)  # LaTeX openers: added tokens, but decoded even with skip_special_tokens
SPECIAL_TOKENS = [NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>") for i in range(NUM_SPECIAL)]

# The tekken (Mistral NeMo) pre-tokenizer split; Apertus uses it unchanged.
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
APERTUS_SHA256 = "bb201fb226cde11f66c3cf51c5344fb37b1611f00c21e75c324546d854eff2e1"
TEKKEN_FILE = "tekken_240718.json"  # inside the mistral-common wheel
TEKKEN_TOKENS = 130_072  # 131,072 - 1000 specials

# The released configs (docs/recipe.md §1.2): the base model adds BOS and no EOS; the instruct one ends turns
# with id 68.
_BASE_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "add_prefix_space": False, "bos_token": "<s>",
    "clean_up_tokenization_spaces": False, "eos_token": "</s>", "model_max_length": 65536, "pad_token": "<pad>",
    "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
}
_INSTRUCT_CONFIG = {**_BASE_CONFIG, "eos_token": "<|assistant_end|>", "padding_side": "left"}


class Tokenizer:
    """A `tokenizers.Tokenizer` (`.inner`) with the Apertus conventions: BOS prepended, no EOS."""

    def __init__(self, inner: tokenizers.Tokenizer):
        self.inner = inner
        self.vocab_size = inner.get_vocab_size(with_added_tokens=True)
        self.bos_id = inner.token_to_id("<s>")
        self.eos_id = inner.token_to_id("</s>")
        self.pad_id = inner.token_to_id("<pad>")

    @classmethod
    def from_file(cls, path) -> Tokenizer:
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        try:
            return cls(tokenizers.Tokenizer.from_file(str(file)))
        except Exception as e:  # the Rust error names the JSON problem
            raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from e

    def encode(self, text: str, bos: bool = True) -> list[int]:
        # BOS is added here rather than by the post-processor so any tokenizer.json behaves the same.
        self._check_bos(bos)
        ids = self.inner.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: list[str], bos: bool = True) -> list[list[int]]:
        # encode_batch_fast skips offsets; both run on all cores in Rust.
        self._check_bos(bos)
        fast = getattr(self.inner, "encode_batch_fast", self.inner.encode_batch)
        out = [e.ids for e in fast(list(texts), add_special_tokens=False)]
        return [[self.bos_id, *ids] for ids in out] if bos else out

    def _check_bos(self, bos: bool) -> None:
        if bos and self.bos_id is None:
            raise ValueError("this tokenizer has no <s> token: encode with bos=False")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int:
        i = self.inner.token_to_id(name)
        if i is None:
            raise ValueError(f"token {name!r} is not in the vocabulary")
        return i

    def save(self, out_dir, chat_template: str | None = None) -> Path:
        """Write tokenizer.json + tokenizer_config.json (+ chat_template.jinja) loadable by transformers."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "tokenizer.json", self.inner.to_str(pretty=True))
        config = _INSTRUCT_CONFIG if chat_template is not None else _BASE_CONFIG
        atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        if chat_template is not None:
            atomic_write_text(out / "chat_template.jinja", chat_template)
        return out


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes (what ByteLevel pre-tokenization produces)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 94 - 12 - 82)
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _build(vocab: dict[str, int], merges: list[list[str]]) -> tokenizers.Tokenizer:
    """Assemble an Apertus-layout tokenizer.json (field order and values as the released file)."""
    bos_eos = {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]},
               "<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
    doc = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": i not in NON_SPECIAL_IDS}
            for i, t in enumerate(SPECIAL_TOKENS)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": TEKKEN_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": bos_eos,
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
    return tokenizers.Tokenizer.from_str(json.dumps(doc, ensure_ascii=False))


# --- the released tokenizer ------------------------------------------------------------------------------------


def build_apertus() -> tokenizers.Tokenizer:
    """The released Apertus tokenizer, rebuilt from the tekken vocabulary shipped in `mistral-common`."""
    import base64
    from importlib import resources

    try:
        src = resources.files("mistral_common") / "data" / TEKKEN_FILE
    except ModuleNotFoundError as e:
        raise FileNotFoundError("rebuilding the Apertus tokenizer needs mistral-common: "
                                "pip install 'apertus[mistral]' (or pip install mistral-common)") from e
    tekken = json.loads(src.read_text(encoding="utf-8"))
    tokens = [base64.b64decode(e["token_bytes"]) for e in tekken["vocab"][:TEKKEN_TOKENS]]
    rank = {t: r for r, t in enumerate(tokens)}
    b2u = byte_to_unicode()
    names = ["".join(b2u[b] for b in t) for t in tokens]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({s: r + NUM_SPECIAL for r, s in enumerate(names)})
    # tiktoken -> BPE (transformers' conversion): every split of a token into two tokens is a merge, ordered by the
    # merged token's rank, then by the ranks of the halves. Tokens are visited in rank order, so no global sort.
    merges = []
    for t in tokens:
        pairs = sorted((rank[t[:i]], rank[t[i:]]) for i in range(1, len(t)) if t[:i] in rank and t[i:] in rank)
        merges.extend([names[a], names[b]] for a, b in pairs)
    return _build(vocab, merges)


def rebuild_apertus(out_dir, chat_template: str | None = None) -> Path:
    """Write the rebuilt released tokenizer to `out_dir` after checking its sha256; returns the tokenizer.json."""
    tok = Tokenizer(build_apertus())
    digest = hashlib.sha256(tok.inner.to_str(pretty=True).encode("utf-8")).hexdigest()
    if digest != APERTUS_SHA256:
        raise ValueError(f"rebuilt tokenizer.json hashes to {digest}, not the released {APERTUS_SHA256}: "
                         "a different mistral-common or tokenizers version changed the output")
    return tok.save(out_dir, chat_template=chat_template) / "tokenizer.json"


def rebuilt_text(file: Path, base: bool = False) -> str:
    """What `rebuild_apertus` wrote (`apertus tokenizer apertus`), with which of the released configs."""
    config = "base (BOS, no EOS)" if base else "instruct (eos <|assistant_end|>, chat template)"
    return (f"rebuilt {file} from mistral-common's tekken vocabulary: sha256 {APERTUS_SHA256} (the released file)\n"
            f"  config: {config}")


def apertus_tokenizer_path() -> Path:
    """The released tokenizer.json: one in the data folder (`$APERTUS_DATA`, or put there by `apertus data fetch
    apertus_tokenizer`), else one rebuilt from mistral-common once into ~/.cache/apertus (hash-checked)."""
    from .embedded import cache_root, data_root

    in_data = data_root() / "apertus_tokenizer" / "tokenizer.json"
    if in_data.is_file():
        return in_data
    cache = cache_root() / "apertus_tokenizer"
    if (cache / "tokenizer.json").is_file():
        return cache / "tokenizer.json"
    return rebuild_apertus(cache)


def tokenizer_file(spec: str | Path) -> Path:
    """What a recipe's `tokenizer = ...` names: "apertus" is the released tokenizer (`apertus_tokenizer_path`), anything
    else a tokenizer.json or a folder holding one, as given."""
    return apertus_tokenizer_path() if str(spec) == "apertus" else Path(spec)


# --- training --------------------------------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir=None, *, min_frequency: int = 2,
                    chat_template: str | None = None, progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE like Apertus's: tekken split + ByteLevel, ids 0-999 the Apertus specials, the 256
    bytes at 1000-1255 in byte order, learned tokens after. Deterministic for the same texts and settings."""
    if vocab_size < NUM_SPECIAL + 256:
        raise ValueError(f"vocab size {vocab_size} leaves no room: the layout needs {NUM_SPECIAL} specials + 256 bytes")
    model = tokenizers.models.BPE(ignore_merges=True)
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(TEKKEN_PATTERN), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
        special_tokens=[tokenizers.AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    trained = json.loads(tok.to_str())["model"]
    # The trainer orders the alphabet by code point; Apertus puts byte b at id 1000 + b. BPE ids are only names
    # (merge priority is the merges list), so renumbering changes nothing but the ids.
    b2u = byte_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    vocab.update({b2u[b]: NUM_SPECIAL + b for b in range(256)})
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    result = Tokenizer(_build(vocab, trained["merges"]))
    if out_dir is not None:
        result.save(out_dir, chat_template=chat_template)
    return result


def train_from_corpus(corpus: list[str], vocab_size: int, out_dir, *, min_frequency: int = 2,
                      max_bytes: int | None = None, progress: bool = False) -> tuple[Tokenizer, dict]:
    """Train on corpora named as `iter_corpus` reads them (udhr, flores, .txt/.jsonl files or directories), up to
    `max_bytes`; writes the tokenizer and `training.json` (inputs, sizes, sha256) to `out_dir`."""
    import time

    from .tokenizer_eval import iter_corpus

    texts, n_bytes = [], 0
    for spec in corpus:
        for _, text in iter_corpus(spec):
            size = len(text.encode("utf-8"))
            if max_bytes is not None and n_bytes + size > max_bytes:
                break
            texts.append(text)
            n_bytes += size
    if not texts:
        raise ValueError(f"no text found in {corpus}")
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, vocab_size, out_dir, min_frequency=min_frequency, progress=progress)
    meta = {"corpus": list(corpus), "documents": len(texts), "bytes": n_bytes, "vocab_size": tok.vocab_size,
            "requested_vocab_size": vocab_size, "min_frequency": min_frequency,
            "tokenizer_sha256": sha256_file(Path(out_dir) / "tokenizer.json"),
            "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write_text(Path(out_dir) / "training.json", json.dumps(meta, indent=2) + "\n")
    return tok, meta


def trained_text(tok: Tokenizer, meta: dict, out_dir) -> str:
    """What `train_from_corpus` trained and wrote, in one line."""
    return (f"trained a {tok.vocab_size:,}-token BPE on {meta['bytes'] / 1e6:.1f} MB ({meta['documents']:,} "
            f"documents) in {meta['seconds']:.1f} s -> {out_dir} (sha256 {meta['tokenizer_sha256'][:16]}...)")


def tiny_tokenizer(cache_dir, vocab_size: int = 2048, languages: int = 60, chars_per_language: int = 4000) -> Tokenizer:
    """A small tokenizer trained on a UDHR sample, cached in `cache_dir` (for tests of other areas: ~1 s)."""
    cache = Path(cache_dir)
    if (cache / "tokenizer.json").is_file():
        return Tokenizer.from_file(cache)
    from .tokenizer_eval import read_udhr

    texts = [t[:chars_per_language] for t in read_udhr(limit=languages).values()]
    return train_tokenizer(texts, vocab_size, cache)


def compare(tokenizer_specs: list[str], corpus_specs: list[str], out_dir) -> dict:
    """`apertus tokenizer eval`: `tokenizer_eval.evaluate` on named tokenizers and corpora. A tokenizer spec is
    `apertus` (the released tokenizer) or a tokenizer.json / its directory, `NAME=PATH` naming its column; corpora as
    `iter_corpus` reads them, the texts of one language joined."""
    from .tokenizer_eval import evaluate, iter_corpus

    texts: dict[str, str] = {}
    for spec in corpus_specs:
        for lang, text in iter_corpus(spec):
            texts[lang] = texts[lang] + "\n" + text if lang in texts else text
    tokenizers = {}
    for spec in tokenizer_specs:
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        file = apertus_tokenizer_path() if path == "apertus" else path
        tokenizers[name or (path if path == "apertus" else Path(path).name or path)] = Tokenizer.from_file(file)
    return evaluate(tokenizers, texts, out_dir)
