"""Group commit of the store's journal, for a server on an asyncio event loop.

A journal commit with ``synchronous=FULL`` costs one fsync: milliseconds on a quiet disk, tens
of them on a busy one. Written one update at a time on the event loop, that fsync was the
server's whole throughput, and no other request was served while it ran. Here the loop only
queues rows; one worker thread commits them: every row queued while a commit runs goes into the
next one, so one fsync makes a whole batch durable, and the loop keeps serving meanwhile.

Once a batch is durable the loop applies its rows in journal order, each through the callback
its request gave (the request's coroutine then answers): an update is acknowledged only after
its own row is durable and applied. If a commit fails (a full disk), nothing of its batch was
written or applied, and each of its requests gets the error. Checkpoints are written on a second
worker thread from a snapshot taken on the loop, so the model write never stalls the journal;
a checkpoint that fails is logged and retried at the next interval (the journal keeps the rows).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from stamen.server.aggregator import Aggregator
from stamen.server.store import Row, Store

log = logging.getLogger(__name__)
T = TypeVar("T")


class Committer:
    def __init__(self, store: Store, agg: Aggregator) -> None:
        self.store, self.agg = store, agg
        self._queue: list[tuple[Row, Callable[[], Any], asyncio.Future]] = []
        self._journal = ThreadPoolExecutor(1, thread_name_prefix="stamen-journal")
        self._checkpoints = ThreadPoolExecutor(1, thread_name_prefix="stamen-checkpoint")
        self._running: asyncio.Task | None = None
        self._checkpoint: asyncio.Future | None = None

    def commit(self, row: Row, then: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``row`` to be made durable with the next batch, then ``then()`` run on the loop,
        in journal order with the rest of the batch: the future resolves to what it returns
        (raises what it raises). Queued now, in the caller's step, so rows queue in the order
        they were taken (take ``store.row`` and call this without awaiting in between); a plain
        future rather than a coroutine spares a task per update. ``then`` runs even if the
        awaiting caller was cancelled: the row is in the journal."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append((row, then, done))
        if self._running is None:
            self._running = asyncio.create_task(self._run())
        return done

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    await loop.run_in_executor(self._journal, self.store.write, [row for row, _, _ in batch])
                except Exception as e:  # nothing of the batch is durable: nothing of it is applied
                    log.error("journal commit of %d rows failed: %s", len(batch), e)
                    for _, _, done in batch:
                        if not done.done():
                            done.set_exception(e)
                    continue
                for _, then, done in batch:
                    try:
                        result = then()
                    except Exception as e:
                        if not done.done():
                            done.set_exception(e)
                    else:
                        if not done.done():
                            done.set_result(result)
                self._maybe_checkpoint()
        finally:
            self._running = None

    def _maybe_checkpoint(self) -> None:
        if (self._checkpoint is not None and not self._checkpoint.done()) or not self.store.checkpoint_due(self.agg):
            return
        snap = self.store.snapshot(self.agg)
        self._checkpoint = asyncio.get_running_loop().run_in_executor(self._checkpoints, self.store.write_checkpoint, snap)
        self._checkpoint.add_done_callback(_log_failure)

    async def drain(self) -> None:
        """Wait until every queued row is applied and no checkpoint is being written."""
        while self._running is not None or (self._checkpoint is not None and not self._checkpoint.done()):
            await asyncio.gather(*(f for f in (self._running, self._checkpoint) if f is not None),
                                 return_exceptions=True)

    def close(self) -> None:
        self._journal.shutdown()
        self._checkpoints.shutdown()


def _log_failure(job: asyncio.Future) -> None:
    if not job.cancelled() and job.exception() is not None:
        log.warning("checkpoint failed (%s); the journal keeps every update since the last one", job.exception())
