"""`apertus data fetch`, for real over HTTP: a server on 127.0.0.1 (started and stopped here) serves the same bytes as
the upstream sources, reached through $APERTUS_DATA_MIRROR and $HF_ENDPOINT as a user without internet would."""

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from apertus.cli import main
from apertus.data.fetch import REGISTRY, FetchError, fetch, url_of


class Server:
    """Serves `files` (URL path -> bytes); paths in `truncate` announce the full length and send only half."""

    def __init__(self):
        self.files, self.truncate, self.hits = {}, set(), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits.append(self.path)
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2] if self.path in server.truncate else body)
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def mirror(monkeypatch, data_dir):
    """The mirror layout NAME/PATH, with the upstream bytes of gsm8k and tinyshakespeare (the embedded copies are
    those bytes: their sha256 equal the pins in the registry, checked below)."""
    with Server() as s:
        for name in ("gsm8k", "tinyshakespeare"):
            for f in REGISTRY[name].files:
                s.files[f"/{name}/{f.path}"] = (data_dir / name / f.path).read_bytes()
        monkeypatch.setenv("APERTUS_DATA_MIRROR", s.url)
        yield s


def leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def test_fetch_downloads_checks_and_stores(mirror, tmp_path, capsys):
    assert main(["data", "fetch", "gsm8k", "--to", str(tmp_path)]) == 0
    assert leftovers(tmp_path) == ["gsm8k", "gsm8k/test.jsonl", "gsm8k/train.jsonl"]  # no temporary folder left
    for f in REGISTRY["gsm8k"].files:
        assert hashlib.sha256((tmp_path / "gsm8k" / f.path).read_bytes()).hexdigest() == f.sha256
    assert sorted(mirror.hits) == ["/gsm8k/test.jsonl", "/gsm8k/train.jsonl"]
    assert str(tmp_path / "gsm8k") in capsys.readouterr().out


def test_default_destination_is_the_cache_that_readers_use(mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("APERTUS_DATA", raising=False)
    from apertus.config import data_root

    dest = fetch("tinyshakespeare", progress=False)
    assert dest == tmp_path / "apertus" / "data" / "tinyshakespeare" == data_root() / "tinyshakespeare"
    assert (dest / "input.txt").stat().st_size == 1_115_394


def test_truncated_download_leaves_nothing(mirror, tmp_path):
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text("an older copy\n")
    mirror.truncate.add("/gsm8k/test.jsonl")  # train.jsonl arrives whole, test.jsonl is cut: neither may land
    with pytest.raises(FetchError, match=r"test\.jsonl.*(bytes|nothing was written)"):
        fetch("gsm8k", tmp_path, progress=False)
    assert leftovers(tmp_path) == ["gsm8k", "gsm8k/train.jsonl"]
    assert (tmp_path / "gsm8k" / "train.jsonl").read_text() == "an older copy\n"


def test_wrong_checksum_is_refused(mirror, tmp_path, capsys):
    good = mirror.files["/tinyshakespeare/input.txt"]
    mirror.files["/tinyshakespeare/input.txt"] = good.replace(b"First Citizen", b"Fifth Citizen", 1)  # same size
    assert main(["data", "fetch", "tinyshakespeare", "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # above it: the progress bar
    assert err.startswith("apertus data: error: tinyshakespeare/input.txt: sha256 ")
    assert REGISTRY["tinyshakespeare"].files[0].sha256 in err and "nothing was written" in err
    assert leftovers(tmp_path) == []


def test_missing_file_and_unknown_name_are_clear_errors(mirror, tmp_path):
    del mirror.files["/gsm8k/test.jsonl"]
    with pytest.raises(FetchError, match="404"):
        fetch("gsm8k", tmp_path, progress=False)
    assert leftovers(tmp_path) == []
    with pytest.raises(FetchError, match="no fetchable data set 'nope'; known: apertus_tokenizer"):
        fetch("nope", tmp_path)


def test_tokenizer_from_the_hub_endpoint(tmp_path, monkeypatch, apertus_tokenizer_json):
    """The released tokenizer.json at its pinned revision, over the hub's resolve URL ($HF_ENDPOINT)."""
    monkeypatch.delenv("APERTUS_DATA_MIRROR", raising=False)
    (f,) = REGISTRY["apertus_tokenizer"].files
    with Server() as s:
        rev = "b946d40447b2b597999b9c86d44bee0b452c919f"  # Apertus-8B-Instruct-2509 (data/apertus_tokenizer/README)
        path = f"/swiss-ai/Apertus-8B-Instruct-2509/resolve/{rev}/tokenizer.json"
        s.files[path] = apertus_tokenizer_json.read_bytes()
        monkeypatch.setenv("HF_ENDPOINT", s.url)
        assert url_of("apertus_tokenizer", f) == s.url + next(iter(s.files))
        dest = fetch("apertus_tokenizer", tmp_path, progress=False)
    assert hashlib.sha256((dest / "tokenizer.json").read_bytes()).hexdigest() == f.sha256


def test_embedded_copies_are_the_pinned_upstream_bytes(data_dir):
    """The registry's pins (independently published for these URLs) and the embedded files agree."""
    for name in ("gsm8k", "tinyshakespeare"):
        for f in REGISTRY[name].files:
            data = (data_dir / name / f.path).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (f.size, f.sha256)


def test_listing_names_what_can_be_fetched(capsys):
    assert main(["data", "fetch", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY) and "embedded" in out and "udhr" in out
