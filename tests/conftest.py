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
order, the first of them waited ~30 s for its ExecuTorch program.

``pytest -n 2 --dist loadfile`` runs the modules on both cores (pytest-xdist: a module's tests
stay together in one worker, with its module fixtures; not yet ``make test``'s, docs/FINDINGS.md
says why). The workers share the controller's
session folder (inherited through STAMEN_CACHE) and one export process, which worker gw0 starts
(or the test process of a plain run); it holds an exclusive lock on ``export-ahead.lock`` for as
long as it lives, so every worker can tell that it still runs, and gw0 waits for it at the end
(the other worker may still need its bundles) unless the session was cut short."""

import fcntl
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

WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ... in pytest-xdist's workers; None otherwise
if WORKER is None:  # a plain run, or xdist's controller (which starts the workers after importing this)
    STAMEN_CACHE = Path(tempfile.mkdtemp(prefix="stamen-cache-"))
    os.environ["STAMEN_CACHE"] = str(STAMEN_CACHE)  # before stamen reads it (mobile_bridge.bundle.DEFAULT_CACHE)
else:
    STAMEN_CACHE = Path(os.environ["STAMEN_CACHE"])  # the controller's: one session folder and export cache

from stamen.mobile_bridge.bundle import DEFAULT_CACHE, cache_folder  # noqa: E402

torch.set_num_threads(1)
EXPORT_AHEAD = Path(__file__).with_name("export_ahead.py")
EXPORT_LOCK = STAMEN_CACHE / "export-ahead.lock"  # the export process's for its whole life (flock)
LOCK_WAIT_S = 60  # how long a worker waits for the lock to appear (gw0 creates it right after its collection)


def exporting() -> bool | None:
    """Whether the export process still runs; None before it was started."""
    try:
        fd = os.open(EXPORT_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def wait_for_bundle(job: dict) -> None:
    """Until ``job``'s bundle is in the cache or the export process has ended (then the test
    exports what is missing itself). The folder appears only whole (``cached_bundle`` renames a
    finished export into place), and its name is the cache key (model spec and plan hashes,
    runtime, shape, exporter versions, backend), so a plan changed in a test module can never be
    handed another plan's bundle: it is exported ahead under its own key."""
    folder = cache_folder(**job, cache_dir=DEFAULT_CACHE)
    deadline = time.monotonic() + LOCK_WAIT_S
    while not folder.is_dir():
        running = exporting()
        if running is False or (running is None and time.monotonic() > deadline):
            return
        time.sleep(0.2)


@dataclass
class ExportsAhead:
    """The process exporting the session's ``EXPORTS``, in the process that started it (None:
    nothing to export, or another worker started it)."""
    proc: subprocess.Popen | None

    def close(self, cut_short: bool) -> None:
        """At the end of the starter's session. In worker gw0 the other worker may still need
        the process's bundles, so it is waited for, unless the session was cut short
        (interrupted, ``-x``); in a plain run every test has run, so it is ended at once."""
        if self.proc is None:
            return
        wait = WORKER is not None and not cut_short
        if not wait and self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=None if wait else 60)


AHEAD = pytest.StashKey[ExportsAhead]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of modules with ``EXPORTS`` last, each group's order kept (a stable sort)."""
    items.sort(key=lambda item: bool(getattr(getattr(item, "module", None), "EXPORTS", ())))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start exporting the collected modules' ``EXPORTS``, each bundle once, first needed first:
    in a plain run, or in worker gw0 (every worker collects the same tests; the others wait on
    the lock that the process holds)."""
    jobs: dict[Path, dict] = {}
    for item in session.items:
        for job in getattr(getattr(item, "module", None), "EXPORTS", ()):
            jobs.setdefault(cache_folder(**job, cache_dir=DEFAULT_CACHE), job)
    proc = None
    if jobs and not session.config.option.collectonly and WORKER in (None, "gw0"):
        new = EXPORT_LOCK.with_suffix(".new")
        fd = os.open(new, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            new.rename(EXPORT_LOCK)  # appears locked: a worker never sees it free before the process ends
            with (STAMEN_CACHE / "export-ahead.log").open("w") as log:
                proc = subprocess.Popen([sys.executable, str(EXPORT_AHEAD), str(DEFAULT_CACHE)], stdin=subprocess.PIPE,
                                        stdout=log, stderr=subprocess.STDOUT, pass_fds=(fd,),
                                        env={**os.environ, "OMP_NUM_THREADS": "1"})
        finally:
            os.close(fd)  # the process's copy keeps the lock until it ends
        proc.stdin.write(pickle.dumps(list(jobs.values())))
        proc.stdin.close()
    session.config.stash[AHEAD] = ExportsAhead(proc)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if AHEAD in session.config.stash:
        cut_short = exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) or bool(
            session.shouldstop or session.shouldfail)
        session.config.stash[AHEAD].close(cut_short)
    if WORKER is None:  # xdist's controller ends after its workers
        shutil.rmtree(STAMEN_CACHE, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _exports_ahead(request):
    """Before a module's first test: the bundles its ``EXPORTS`` lists are in the cache."""
    for job in getattr(request.module, "EXPORTS", ()):
        wait_for_bundle(job)


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
