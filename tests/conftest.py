"""Shared fixtures. Torch runs single-threaded in tests: the CI machine has two cores and the
suite is many small models, where threads cost more than they give.

Every process of a test session shares one export cache, a temporary folder (STAMEN_CACHE, set
here before anything reads it: the test process, the servers and clients it starts), never the
user's ``~/.cache/stamen``: a test gets what it exported itself or another test did, never a
bundle left by an earlier run. Tests of the cache itself, or of a server exporting on first need,
keep their own.

Exports are the suite's largest cost (ExecuTorch 15-50 CPU-s each, on one core), so they are
made ahead: once the tests are collected, one background process exports every bundle that a
collected test module lists in its ``EXPORTS`` (``cached_bundle``'s keyword arguments, less the
cache) into the session's cache, in the order the tests come, while the tests before them run
on the other core. Before a module's first test, ``_exports_ahead`` waits for its own bundles;
the test (or the server it starts) then finds them in the cache, verified as any cached bundle.
The modules with ``EXPORTS`` run after the others (each group in its usual order), so the
process has the whole stretch of tests without exports to make them in: first in the usual
order, the first of them waited ~30 s for its ExecuTorch program."""

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

STAMEN_CACHE = Path(tempfile.mkdtemp(prefix="stamen-cache-"))
os.environ["STAMEN_CACHE"] = str(STAMEN_CACHE)  # before stamen reads it (mobile_bridge.bundle.DEFAULT_CACHE)

from stamen.mobile_bridge.bundle import DEFAULT_CACHE, cache_folder  # noqa: E402

torch.set_num_threads(1)
EXPORT_AHEAD = Path(__file__).with_name("export_ahead.py")


@dataclass
class ExportsAhead:
    """The process exporting the session's ``EXPORTS`` (None: nothing to export)."""
    proc: subprocess.Popen | None

    def wait(self, job: dict) -> None:
        """Until ``job``'s bundle is in the cache or the process has ended (then the test
        exports what is missing itself). The folder appears only whole (``cached_bundle``
        renames a finished export into place), and its name is the cache key (model spec and
        plan hashes, runtime, shape, exporter versions, backend), so a plan changed in a test
        module can never be handed another plan's bundle: it is exported ahead under its own key."""
        folder = cache_folder(**job, cache_dir=DEFAULT_CACHE)
        while self.proc is not None and self.proc.poll() is None and not folder.is_dir():
            time.sleep(0.2)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


AHEAD = pytest.StashKey[ExportsAhead]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of modules with ``EXPORTS`` last, each group's order kept (a stable sort)."""
    items.sort(key=lambda item: bool(getattr(getattr(item, "module", None), "EXPORTS", ())))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start exporting the collected modules' ``EXPORTS``, each bundle once, first needed first."""
    jobs: dict[Path, dict] = {}
    for item in session.items:
        for job in getattr(getattr(item, "module", None), "EXPORTS", ()):
            jobs.setdefault(cache_folder(**job, cache_dir=DEFAULT_CACHE), job)
    proc = None
    if jobs and not session.config.option.collectonly:
        with (STAMEN_CACHE / "export-ahead.log").open("w") as log:
            proc = subprocess.Popen([sys.executable, str(EXPORT_AHEAD), str(DEFAULT_CACHE)], stdin=subprocess.PIPE,
                                    stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        proc.stdin.write(pickle.dumps(list(jobs.values())))
        proc.stdin.close()
    session.config.stash[AHEAD] = ExportsAhead(proc)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if AHEAD in session.config.stash:
        session.config.stash[AHEAD].close()
    shutil.rmtree(STAMEN_CACHE, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _exports_ahead(request):
    """Before a module's first test: the bundles its ``EXPORTS`` lists are in the cache."""
    for job in getattr(request.module, "EXPORTS", ()):
        request.config.stash[AHEAD].wait(job)


@pytest.fixture(scope="session")
def stdlib():
    """The built-in corpus and its train/validation split, loaded once per test session."""
    from stamen.core.data import stdlib_corpus

    corpus = stdlib_corpus()
    train, val = corpus.split()
    return corpus, train, val


@pytest.fixture(scope="session")
def export_cache():
    """The session's export cache (``<STAMEN_CACHE>/exports``, as every process reads it). An
    exported program depends only on its key (``bundle_key``), so tests that need the same
    program share one export."""
    return DEFAULT_CACHE
