"""Export the session's bundles into its export cache ahead of the tests that use them, in a
process of its own (started by conftest.py once the tests are collected). The jobs arrive
pickled on stdin, each the keyword arguments of ``cached_bundle`` but the cache; they run in
the order the tests need them. A job that fails is logged and skipped: the test that needs its
bundle then exports it itself, and fails with the real error if there is one."""

import logging
import pickle
import sys

import torch

from stamen.mobile_bridge.bundle import cached_bundle

torch.set_num_threads(1)  # as the tests run torch (conftest.py); the other core runs the tests
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
cache = sys.argv[1]
for job in pickle.load(sys.stdin.buffer):
    try:
        logging.info("exported %s", cached_bundle(**job, cache_dir=cache).name)
    except Exception:
        logging.exception("export failed: %r", job)
