"""Shared test setup: `tests/` on the import path for the helpers (`hf_reference`), and the shared
test data.

Tests that read the real tokenizer files or text samples of `hf_reference.SHARED_DATA` ask for the
`shared_data` fixture (the folder's path; `tokenizer_dir` and `bart_tokenizer` build on it) or carry
`@pytest.mark.shared_data`; either gives them the marker, so that `-m "not shared_data"` runs the
rest. Where the folder is absent they are skipped, saying what is missing; with
BART_JAX_REQUIRE_TEST_DATA=1 (as in CI) they fail instead, so that missing data never passes silently.
"""

from __future__ import annotations

import os
import pathlib

import pytest
from hf_reference import SHARED_DATA, SHARED_DATA_FILES, TOKENIZER_DIR

REQUIRE_TEST_DATA = "BART_JAX_REQUIRE_TEST_DATA"


def missing_shared_data() -> str | None:
    """Why the shared test data cannot be read, or None where every file is there."""
    missing = [path for path in SHARED_DATA_FILES if not path.is_file()]
    if not missing:
        return None
    what = "it is absent" if not SHARED_DATA.is_dir() else f"it lacks {', '.join(str(path) for path in missing)}"
    return (
        f"needs the shared test data folder {SHARED_DATA} and {what}: put the `shared/data` folder next to "
        "the repository checkout, with the BART tokenizer files (bart-tokenizer/: tokenizer.json, vocab.json, "
        "merges.txt) and the small text samples (summarization/, classification/, qa/)"
    )


def require_shared_data() -> None:
    """Skips the running test where the shared data is missing, or fails it under BART_JAX_REQUIRE_TEST_DATA=1."""
    reason = missing_shared_data()
    if reason is None:
        return
    if os.environ.get(REQUIRE_TEST_DATA) == "1":
        pytest.fail(f"{reason} ({REQUIRE_TEST_DATA}=1: missing test data is an error)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The shared test data folder (`hf_reference.SHARED_DATA`), checked to hold every file."""
    require_shared_data()
    return SHARED_DATA


@pytest.fixture(scope="session")
def tokenizer_dir(shared_data) -> pathlib.Path:
    """The real BART tokenizer files (`hf_reference.TOKENIZER_DIR`): tokenizer.json, vocab.json, merges.txt."""
    return TOKENIZER_DIR


@pytest.fixture(scope="session")
def bart_tokenizer(tokenizer_dir):
    """The real BART tokenizer, loaded from the shared tokenizer files."""
    from bart_jax.tokenizer import BartTokenizer

    return BartTokenizer.from_pretrained(tokenizer_dir)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    # First, so that `-m` selects on the markers added here.
    for item in items:
        if "shared_data" in item.fixturenames and item.get_closest_marker("shared_data") is None:
            item.add_marker(pytest.mark.shared_data)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before any fixture is set up: module fixtures that read the data would otherwise fail first.
    if item.get_closest_marker("shared_data") is not None:
        require_shared_data()
