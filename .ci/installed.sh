#!/usr/bin/env bash
# Issue 16: the package installed the way a user installs it (`pip install .`, not editable) into a fresh virtual
# environment works away from the checkout: the smoke speedrun from another working directory (recipes, templates and
# the embedded corpora are package data; no APERTUS_DATA, an empty cache), then `apertus serve` with its web page.
# Usage: bash .ci/installed.sh [WORKDIR]   (a few minutes: most of it is pip installing the dependencies)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
server=
cleanup() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi; }
trap cleanup EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0   # the CPU build on this machine's disk, as in the Makefile
# the repository's files as a clone of this state has them (tracked and not ignored), so the checkout stays untouched
mkdir -p "$work/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard | (cd "$repo" && xargs -0 cp --parents -t "$work/src")
"$work/venv/bin/pip" install -q "$work/src"
mkdir -p "$work/elsewhere" && cd "$work/elsewhere"
unset APERTUS_DATA PYTHONPATH
export XDG_CACHE_HOME="$work/cache"
bin="$work/venv/bin"
site=$("$bin/python" -c "import apertus, pathlib; print(pathlib.Path(apertus.__file__).parent)")
case "$site" in "$repo"*) echo "apertus imported from the checkout ($site), not the installed package"; exit 1;; esac
"$bin/apertus" data fetch --list
"$bin/apertus" speedrun --smoke --out "$work/run"
test -s "$work/run/report.md"
port=$("$bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$bin/apertus" serve "$work/run/align/hf" --port "$port" --cache-gb 0.1 > "$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 120); do
    if "$bin/python" - "$port" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
page = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=5).read().decode()
sys.exit(0 if "<html" in page.lower() else 1)
PY
    kill -0 "$server" || { cat "$work/serve.log"; exit 1; }
    sleep 2
done
"$bin/python" - "$port" <<'PY'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
assert "<html" in urllib.request.urlopen(base + "/", timeout=10).read().decode().lower(), "no web page"
models = json.load(urllib.request.urlopen(base + "/v1/models", timeout=10))
print("installed package: speedrun ok, web page served, models:", [m["id"] for m in models["data"]])
PY
