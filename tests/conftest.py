"""Shared fixtures: the embedded data and the real Apertus tokenizer (local files only, no hub)."""

import pytest

from apertus.config import data_root


@pytest.fixture(scope="session")
def data_dir():
    root = data_root()
    if not root.is_dir():
        pytest.fail(f"embedded data not found at {root}; set APERTUS_DATA")
    return root


@pytest.fixture(scope="session")
def apertus_tokenizer_json(data_dir):
    return data_dir / "apertus_tokenizer" / "tokenizer.json"
