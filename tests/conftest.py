"""Shared fixtures. Torch runs single-threaded in tests: the CI machine has two cores and the
suite is many small models, where threads cost more than they give."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def stdlib():
    """The built-in corpus and its train/validation split, loaded once per test session."""
    from stamen.core.data import stdlib_corpus

    corpus = stdlib_corpus()
    train, val = corpus.split()
    return corpus, train, val


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory):
    """One export cache for the test session. An exported program depends only on its key
    (model spec, plan, runtime, input shape, exporter versions: ``bundle_key``), so tests that
    need the same program share one export; ExecuTorch exports take a minute on two cores.
    Tests of the cache itself, or of a server exporting on first need, keep their own. It is
    ``<STAMEN_CACHE>/exports`` for STAMEN_CACHE = its parent, as a server process reads it."""
    return tmp_path_factory.mktemp("stamen-cache") / "exports"
