"""Retrospective removal (`apertus optout apply`) and `optout check` on a small built dataset: the removed documents'
tokens are in no shard any more (scanned byte by byte), every other document is unchanged (hashes and tokens), only
the affected shards are rewritten, the manifest/index/run.json stay consistent (`verify`), an interrupted removal is
completed, and training from the rebuilt dataset works."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from compliance_helpers import ROBOTS, build_dataset, shard_tokens
from data_helpers import text_of

from apertus.compliance import optout as optout_mod
from apertus.compliance.manifest import record_data_build, verify
from apertus.compliance.optout import apply_optout, check, normalize_url
from apertus.data.loader import PackedLoader
from apertus.data.shards import read_index


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("optout")
    d = build_dataset(root)
    record_data_build(d)
    return root, d


@pytest.fixture
def dataset(built, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(built[1], d)
    return d


def _requests(tmp_path, docs):
    """Removal requests: one URL (and one the dataset never had), a domain, the hash of one book's text."""
    url = next(r["url"] for r in docs if r["url"] and "news.example/public" in r["url"])
    (tmp_path / "urls.txt").write_text(f"# requests\n{url.replace('news.example', 'NEWS.Example')}\n"
                                       "https://nowhere.example/x\n")
    (tmp_path / "domains.txt").write_text("shop.example\n")
    book = next(r for r in docs if r["source"] == "books" and r["split"] == "train")
    (tmp_path / "hashes.txt").write_text(hashlib.sha256(text_of(1000 + _book_number(book), 200).encode())
                                         .hexdigest() + "\n")
    return url, book


def _book_number(row) -> int:
    return int(row["id"].rsplit("/b", 1)[1])


def _expected(docs, url, book):
    """Removed ids by the fixture's construction (robots rules written out by hand, not by protego)."""
    out = set()
    for r in docs:
        u = r["url"] or ""
        if "//gpt.example/" in u or "//star.example/private/" in u or normalize_url(u) == normalize_url(url) \
                or "//shop.example/" in u or r["id"] == book["id"]:
            out.add(r["id"])
    return out


def _contains(haystack, needle) -> bool:
    return needle.tobytes() in haystack.tobytes()


def test_apply_removes_exactly_and_keeps_everything_else(dataset, tmp_path):
    before = read_index(dataset).to_pylist()
    old_tokens = shard_tokens(dataset)
    old_mtime = {p: (dataset / p).stat().st_mtime_ns for p in old_tokens}
    url, book = _requests(tmp_path, before)
    want = _expected(before, url, book)
    assert len(want) >= 10

    rc = subprocess.run([sys.executable, "-m", "apertus.cli", "optout", "apply", str(dataset), "--robots",
                         str(_robots_dir(tmp_path)),
                         "--urls", str(tmp_path / "urls.txt"), "--domains", str(tmp_path / "domains.txt"),
                         "--text-hashes", str(tmp_path / "hashes.txt")], capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    after = read_index(dataset).to_pylist()
    assert {r["id"] for r in before} - {r["id"] for r in after} == want

    # no removed document's tokens are left in any shard (scan of every shard file)
    new_tokens = shard_tokens(dataset)
    for r in before:
        if r["id"] in want:
            doc = old_tokens[r["shard"]][r["offset"]: r["offset"] + r["n_tokens"]]
            assert not any(_contains(arr, doc) for arr in new_tokens.values()), r["id"]
    # every other document: same text hash, same tokens (at its new place)
    old_by_id = {r["id"]: r for r in before}
    for r in after:
        o = old_by_id[r["id"]]
        assert r["sha256"] == o["sha256"] and r["n_tokens"] == o["n_tokens"]
        assert (new_tokens[r["shard"]][r["offset"]: r["offset"] + r["n_tokens"]]
                == old_tokens[o["shard"]][o["offset"]: o["offset"] + o["n_tokens"]]).all()
    # only the affected shards were rewritten
    affected = {old_by_id[i]["shard"] for i in want}
    for p in old_tokens:
        if p not in affected:
            assert (dataset / p).stat().st_mtime_ns == old_mtime[p]
    assert affected < set(old_tokens)

    man = json.loads((dataset / "manifest.json").read_text())
    assert {s["path"] for s in man["shards"]} == set(new_tokens)
    for src in ("web", "books"):
        for split in ("train", "val"):
            rows = [r for r in after if r["source"] == src and r["split"] == split]
            assert man["sources"][src][split] == {"docs": len(rows), "tokens": sum(r["n_tokens"] for r in rows)}
    retro = {e: v for e, v in man["funnel"]["by_source"]["web"].items() if e.startswith("optout_retro:")}
    n_web = sum(1 for i in want if old_by_id[i]["source"] == "web")
    assert sum(v["docs"] for v in retro.values()) == n_web
    assert man["funnel"]["by_source"]["web"]["out:train"]["docs"] == man["sources"]["web"]["train"]["docs"]
    report = json.loads((dataset / man["optout"][0]["report"]).read_text())
    assert report["removed"]["docs"] == len(want)
    assert report["unmatched_requests"]["urls"] == ["https://nowhere.example/x"]
    assert report["by_reason"]["robots"] >= 1 and report["by_reason"]["text_hash"] == 1
    assert verify(dataset)["problems"] == []  # run.json re-hashed, shard hashes in the manifest are the new ones


def _robots_dir(tmp_path):
    d = tmp_path / "robots"
    d.mkdir(exist_ok=True)
    for host, text in ROBOTS.items():
        (d / f"{host}.txt").write_text(text)
    return d


def test_training_from_rebuilt_dataset(dataset, tmp_path):
    from apertus.config import preset
    from apertus.model import build_model, document_mask

    apply_optout(dataset, robots=_robots_dir(tmp_path), domains=["news.example"])
    cfg = preset("tiny")
    cfg.num_hidden_layers, cfg.vocab_size = 2, 640
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    loader = PackedLoader(dataset, seq_len=64, batch_size=4, seed=0)
    batches = [next(loader) for _ in range(3)]
    for step in range(12):
        b = batches[step % len(batches)]
        pos = b["position_ids"]
        logits = model(b["input_ids"], position_ids=pos, attn_mask=document_mask(pos))
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), reduction="none")
        loss = (ce * b["loss_mask"].flatten()).sum() / b["loss_mask"].sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0
    for stage in ("web-first", "mix"):  # every curriculum stage still has data
        assert next(PackedLoader(dataset, 64, 2, stage=stage))["input_ids"].shape == (2, 64)


def test_check_url_text_and_history(dataset, tmp_path):
    docs = read_index(dataset).to_pylist()
    train = next(r for r in docs if r["source"] == "web" and r["split"] == "train" and "allow.example" in r["url"])
    res = check(dataset, train["url"])
    assert res["found"] and res["documents"][0]["id"] == train["id"]
    assert res["documents"][0]["stages"] == ["web-first", "mix"]
    val = next(r for r in docs if r["split"] == "val")
    assert check(dataset, val["sha256"])["documents"][0]["stages"] == []  # held out: never trained on
    # a passage from inside a book (not the whole document) is found by its tokens
    book = next(r for r in docs if r["source"] == "books")
    passage = text_of(1000 + _book_number(book), 200).split(". ")[2]
    hits = check(dataset, passage)["documents"]
    assert book["id"] in {h["id"] for h in hits} and all(h["match"].startswith("inside") for h in hits)
    assert not check(dataset, "a sentence that was never in the data at all, zebra quantum")["found"]

    apply_optout(dataset, urls=[train["url"]])
    res = check(dataset, train["url"])
    assert not res["found"] and res["removed_before"][0]["id"] == train["id"]
    out = subprocess.run([sys.executable, "-m", "apertus.cli", "optout", "check", str(dataset), train["url"]],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "REMOVED earlier" in out.stdout


def test_interrupted_apply_is_completed(dataset, monkeypatch):
    real = optout_mod.os.replace
    def flaky(src, dst):
        if str(dst).endswith("documents.parquet"):
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(optout_mod.os, "replace", flaky)
    with pytest.raises(OSError):
        apply_optout(dataset, domains=["gpt.example"])
    monkeypatch.setattr(optout_mod.os, "replace", real)
    assert (dataset / optout_mod.JOURNAL).exists()
    assert not check(dataset, "https://gpt.example/public/0")["found"]  # the journal was finished first
    assert not (dataset / optout_mod.JOURNAL).exists()
    man = json.loads((dataset / "manifest.json").read_text())
    assert verify(dataset)["problems"] == []
    for s in man["shards"]:  # shards and index agree
        assert hashlib.sha256((dataset / s["path"]).read_bytes()).hexdigest() == s["sha256"]
    rows = read_index(dataset).to_pylist()
    assert all(r["offset"] + r["n_tokens"] <= next(s["n_tokens"] for s in man["shards"] if s["path"] == r["shard"])
               for r in rows)


def test_bad_input(dataset, tmp_path):
    with pytest.raises(ValueError, match="nothing to remove"):
        apply_optout(dataset)
    with pytest.raises(ValueError, match="sha256"):
        apply_optout(dataset, text_hashes=["abc"])
    with pytest.raises(FileNotFoundError, match="not a built dataset"):
        check(tmp_path / "nope", "x")
    r = subprocess.run([sys.executable, "-m", "apertus.cli", "optout", "apply", str(dataset), "--urls",
                        str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert r.returncode == 2 and "missing.txt" in r.stderr
    dry = apply_optout(dataset, domains=["gpt.example"], dry_run=True)
    assert dry["removed"]["docs"] > 0 and check(dataset, "https://gpt.example/public/0")["found"]
