"""The embedded corpora (data/): the sha256 manifests, unpacking into the cache, and no path beside the checkout."""

import hashlib
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from apertus import embedded as E
from apertus.util import sha256_file

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def test_every_corpus_has_its_readme_and_a_manifest_of_its_archive():
    corpora = E.embedded_corpora()
    assert E.embedded_dir() == DATA and set(corpora) >= {"udhr", "sib200", "gsm8k", "xcopa", "apertus_tokenizer"}
    for name, folder in corpora.items():
        readme = (folder / "README.md").read_text(encoding="utf-8")
        assert re.search(r"\*\*Source|origin", readme) and re.search(r"(?i)licen[cs]e", readme), name
        sums = E.read_sums(folder / E.SUMS)
        with tarfile.open(folder / f"{name}.tar.xz") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        assert set(members) == set(sums), name
        for rel, digest in sums.items():
            assert hashlib.sha256(members[rel]).hexdigest() == digest, f"{name}/{rel}"


def test_data_folder_is_small():
    size = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert size < 25e6, f"data/ is {size / 1e6:.1f} MB"


def test_package_templates_are_the_embedded_released_ones():
    sums = E.read_sums(DATA / "apertus_tokenizer" / E.SUMS)
    templates = sorted((ROOT / "src" / "apertus" / "templates").glob("*.jinja"))
    assert [t.name for t in templates] == sorted(n for n in sums if n.endswith(".jinja"))
    for t in templates:
        assert sha256_file(t) == sums[t.name], t.name


def test_unpack_checks_files_and_keeps_what_fetch_added(tmp_path):
    src = DATA / "xcopa"
    dest = E.unpack(src, tmp_path / "xcopa")
    assert sha256_file(dest / "it" / "val.it.jsonl") == E.read_sums(src / E.SUMS)["it/val.it.jsonl"]
    assert (dest / "README.md").is_file() and not list(tmp_path.glob(".xcopa-*"))  # no temporary folder left
    (dest / "extra.txt").write_text("fetched")
    (dest / "it" / "val.it.jsonl").unlink()
    E._checked.clear()
    E.unpack(src, dest)  # incomplete: unpacked again, the extra file stays
    assert (dest / "it" / "val.it.jsonl").is_file() and (dest / "extra.txt").read_text() == "fetched"


def test_damaged_archive_is_refused_and_writes_nothing(tmp_path):
    bad = tmp_path / "src" / "mgsm"
    shutil.copytree(DATA / "mgsm", bad)
    sums = (bad / E.SUMS).read_text().replace("50021d0f", "00000000")  # mgsm_en.tsv
    (bad / E.SUMS).write_text(sums)
    with pytest.raises(ValueError, match="mgsm_en.tsv does not match its sha256"):
        E.unpack(bad, tmp_path / "out" / "mgsm")
    assert list((tmp_path / "out").iterdir()) == []


def test_data_root_is_the_cache_unless_apertus_data_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("APERTUS_DATA", str(tmp_path / "mine"))
    assert E.data_root() == tmp_path / "mine"
    monkeypatch.delenv("APERTUS_DATA")
    root = E.data_root()
    assert root == tmp_path / "cache" / "apertus" / "data"
    assert sorted(p.name for p in root.iterdir()) == sorted(E.embedded_corpora())
    with pytest.raises(FileNotFoundError, match=r"'hh_rlhf_harmless' .* `apertus data fetch hh_rlhf_harmless`"):
        E.corpus_path("hh_rlhf_harmless", "test.jsonl.gz")


def test_no_code_path_looks_beside_the_checkout():
    hits = subprocess.run(["grep", "-rnE", r"shared[\"'/ ]*[\"'/]+ *data|\.\./shared|\"shared\"", "src/"], cwd=ROOT,
                          capture_output=True, text=True).stdout
    assert hits == ""
