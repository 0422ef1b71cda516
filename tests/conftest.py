"""Shared fixtures: the embedded data and the real Apertus tokenizer (local files only, no hub)."""

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. Tests run an engine thread beside the
# main thread and launch subprocesses on 2 cores; spinning workers then starve each other (20x slowdowns seen).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from apertus.config import data_root  # noqa: E402


@pytest.fixture(scope="session")
def data_dir():
    root = data_root()
    if not root.is_dir():
        pytest.fail(f"embedded data not found at {root}; set APERTUS_DATA")
    return root


@pytest.fixture(scope="session")
def apertus_tokenizer_json(data_dir):
    return data_dir / "apertus_tokenizer" / "tokenizer.json"
