"""Shared pytest fixtures."""

import pytest


@pytest.fixture(scope="session")
def lm_bin(tmp_path_factory):
    """tests/data/wikitext-2 binarized for language modeling (fairseq-preprocess --only-source)."""
    from cli_utils import preprocess_lm

    return preprocess_lm(tmp_path_factory.mktemp("lm") / "data-bin")
