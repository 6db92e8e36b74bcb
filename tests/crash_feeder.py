"""The crash test's victim: feeds a fixed, seeded stream of updates through a Store, printing
``ack <task id>`` once each is acknowledged. Run in a process of its own (``forked``) it
resumes whatever state the store holds; ``crash="<point>:<n>"`` makes it SIGKILL itself at the
n-th pass through a point (``submit``: journaled but not applied; ``flush``: a max-wait flush journaled but not
applied; ``fsync``: checkpoint temp file written, not renamed; ``replace``: renamed, journal
payloads not yet dropped; ``version``: a kept version's file renamed into place, the checkpoint
file that names it not yet written; ``write``: a journal batch about to be committed;
``written``: a batch committed, none of it applied; ``fsync`` and ``replace`` count the
checkpoint file's steps, not the version files'). The test also kills it from outside at random
instants.

Two ways to feed: one update at a time through ``Store.accept`` (``feed``), or as the server
does, through the group-committing ``Committer`` (``feed_batched``, ``batched=True``): waves
of ``WAVE`` concurrent uploads, each wave one journal batch, a max-wait poll after each wave,
checkpoints on the committer's thread while the next batches commit. Its bases are a fixed
function of the position in the stream, so the stream does not depend on timing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from stamen.core.model import GPT, GPTConfig, weights
from stamen.core.plan import Plan, full_plan
from stamen.core.records import Update
from stamen.server import aggregator, store
from stamen.server.aggregator import Aggregator, AggregatorConfig
from stamen.server.committer import Committer
from stamen.server.store import Store

CFG = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
PLANS = [full_plan(CFG), Plan("half", (0, 1), 0.5, ("blocks.*",)), Plan("top", (1,), 1.0, ("blocks.1.*", "ln_f.*"))]
CONFIG = AggregatorConfig(buffer_k=3, tau_max=2, max_wait_s=2.5)  # delayed Nesterov 0.7 / 0.9
N = 24
BATCHED = AggregatorConfig(buffer_k=3, tau_max=N, max_wait_s=2.5)  # τ_max ≥ N: nothing is refused
WAVE = 4


def clock(i: int) -> float:
    """Arrival times with a gap every fifth update, so some flushes are max-wait flushes."""
    return float(i + 2 * (i // 5))


def update_for(i: int, version: int) -> Update:
    plan = PLANS[i % 3]
    gen = torch.Generator().manual_seed(1000 + i)
    shapes = plan.shapes(CFG)
    delta = {n: torch.randn(shapes[n], generator=gen) * 0.01 for n in plan.trainable(CFG)}
    return Update(f"t{i}", max(0, version - i % 3), plan, delta, 50 + (37 * i) % 200)


def initial_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {n: t.clone() for n, t in weights(GPT(CFG)).items()}


def feed(root: str) -> tuple[Aggregator, Store]:
    """Run (or resume) the stream to its end. The journal is a prefix of the stream, so the
    next update to send is the first one it lacks; the poll that followed the last journaled
    one is repeated (a no-op if it already flushed)."""
    st = Store(root, checkpoint_every=2)
    agg = st.start(CFG, initial_weights(), CONFIG)
    done = len(st.journaled_task_ids())
    if done:
        st.poll(agg, clock(done - 1))
    for i in range(done, N):
        st.accept(agg, update_for(i, agg.version), clock(i))
        print(f"ack t{i}", flush=True)
        st.poll(agg, clock(i))
    return agg, st


async def _feed_batched(root: str, serial: bool) -> tuple[Aggregator, Store]:
    st = Store(root, checkpoint_every=2)
    agg = st.start(CFG, initial_weights(), BATCHED)
    committer = Committer(st, agg)

    async def commit(i: int | None, now: float) -> None:
        row = st.row(None if i is None else update_for(i, i // 3), now)
        await committer.commit(row, lambda: st.apply(agg, row))
        if i is not None:
            print(f"ack t{i}", flush=True)

    def poll_after(i: int) -> float:  # the maintenance poll once the wave ending at i has waited
        return clock(i) + BATCHED.max_wait_s

    done = len(st.journaled_task_ids())
    if done and done % WAVE == 0 and agg.due(poll_after(done - 1)):
        await commit(None, poll_after(done - 1))  # the poll after the last whole wave
    for start in [done, *range((done // WAVE + 1) * WAVE, N, WAVE)] if done < N else []:
        wave = range(start, min(N, (start // WAVE + 1) * WAVE))  # the rest of start's wave
        if serial:
            for i in wave:
                await commit(i, clock(i))
        else:
            await asyncio.gather(*(commit(i, clock(i)) for i in wave))  # queued in order: one batch
        if agg.due(poll_after(wave[-1])):
            await commit(None, poll_after(wave[-1]))
    await committer.drain()
    committer.close()
    return agg, st


def feed_batched(root: str, serial: bool = False) -> tuple[Aggregator, Store]:
    """Run (or resume) the stream to its end through the committer; ``serial``: one row per
    batch (the reference the batches must equal)."""
    return asyncio.run(_feed_batched(root, serial))


def _kill_at(owner: object, attr: str, n: int, before: bool, counts=lambda *args: True) -> None:
    original, calls = getattr(owner, attr), [0]

    def wrapper(*args, **kwargs):
        if not counts(*args):
            return original(*args, **kwargs)
        calls[0] += 1
        if before and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        out = original(*args, **kwargs)
        if not before and calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    setattr(owner, attr, wrapper)


def forked(out: Connection, root: str, crash: str, batched: bool) -> None:
    """The victim's life in a process of its own (forked from test_store's forkserver): arm
    the crash point, then feed (or resume) to the end, printing to the pipe ``out``."""
    sys.stdout = os.fdopen(os.dup(out.fileno()), "w")
    out.close()
    torch.set_num_threads(1)
    if crash:
        point, n = crash.split(":")
        def versions(*args) -> bool:
            """A call on a version file or their folder: ``_fsync(path)``, ``os.replace(tmp, path)``."""
            return store.VERSIONS in Path(args[-1]).parts

        target = {"submit": (aggregator.Aggregator, "submit", True), "flush": (aggregator.Aggregator, "flush", True),
                  "fsync": (store, "_fsync", False, lambda *a: not versions(*a)),
                  "replace": (store.os, "replace", False, lambda *a: not versions(*a)),
                  "version": (store.os, "replace", False, versions),
                  "write": (store.Store, "write", True), "written": (store.Store, "write", False)}[point]
        _kill_at(*target[:2], int(n), *target[2:])
    if batched:
        write = store.Store.write

        def counted(self, rows):
            write(self, rows)
            print(f"batch {len(rows)}", flush=True)

        store.Store.write = counted
        feed_batched(root)
    else:
        feed(root)
    sys.stdout.flush()
