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
