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

The hand-offs are callbacks, not a task awaiting the worker: the worker hands its durable batch
straight to the loop (``_written``), which first starts the next batch's commit, so its fsync
runs while this batch is applied, and then applies; and a row's future is awaited directly
(``_Kept``), not through ``asyncio.shield``. Under load a step of the event loop runs every
request that arrived in one poll (at 1,000 clients, hundreds of uploads read and decoded, 0.1-0.3
s), and each hand-off through a future, a task or a shield waited for the end of such a step:
an upload's answer had waited five of them after its row was queued, three now.
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


class _Kept(asyncio.Future):
    """A row's future, which only the committer settles: ``cancel`` refuses. A request
    cancelled while it waits on it (its timeout, shutdown) is cancelled once the row is applied
    or its commit failed, so nothing else that waits on the row (a re-sent upload of the same
    task) sees it cancelled halfway; awaited directly it spares the extra step of the event
    loop that ``asyncio.shield`` takes to pass a result on."""

    def cancel(self, msg: Any = None) -> bool:
        return False


class Committer:
    def __init__(self, store: Store, agg: Aggregator) -> None:
        self.store, self.agg = store, agg
        self._queue: list[tuple[Row, Callable[[], Any], asyncio.Future]] = []
        self._journal = ThreadPoolExecutor(1, thread_name_prefix="stamen-journal")
        self._checkpoints = ThreadPoolExecutor(1, thread_name_prefix="stamen-checkpoint")
        self._writing = False  # a batch is being made durable on the journal thread
        self._starting = False  # a start is scheduled for the rows queued in this step
        self._drained: asyncio.Future | None = None  # settled once nothing is queued or being written
        self._checkpoint: asyncio.Future | None = None

    def commit(self, row: Row, then: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``row`` to be made durable with the next batch, then ``then()`` run on the loop,
        in journal order with the rest of the batch: the future resolves to what it returns
        (raises what it raises). Queued now, in the caller's step, so rows queue in the order
        they were taken (take ``store.row`` and call this without awaiting in between); rows
        queued in one step of the loop while no batch is being written go together. ``then``
        runs even if the awaiting caller was cancelled: the row is in the journal."""
        loop = asyncio.get_running_loop()
        done = _Kept(loop=loop)
        self._queue.append((row, then, done))
        if not self._writing and not self._starting:
            self._starting = True
            loop.call_soon(self._start)
        return done

    def _start(self) -> None:
        """Hand the queued rows to the journal thread as one batch."""
        self._starting = False
        if self._writing or not self._queue:
            return
        batch, self._queue = self._queue, []
        self._writing = True
        self._journal.submit(self._write, asyncio.get_running_loop(), batch)

    def _write(self, loop: asyncio.AbstractEventLoop, batch: list) -> None:
        """On the journal thread: commit the batch, then hand it back to the loop."""
        error = None
        try:
            self.store.write([row for row, _, _ in batch])
        except Exception as e:  # nothing of the batch is durable: nothing of it is applied
            error = e
        loop.call_soon_threadsafe(self._written, batch, error)

    def _written(self, batch: list, error: Exception | None) -> None:
        """On the loop, once ``batch`` is durable (or its commit failed): start the next batch,
        then apply this one's rows in order and settle their futures."""
        self._writing = False
        self._start()  # the rows queued meanwhile: their fsync runs while this batch is applied
        if error is not None:
            log.error("journal commit of %d rows failed: %s", len(batch), error)
            for _, _, done in batch:
                done.set_exception(error)
        else:
            for _, then, done in batch:
                try:
                    result = then()
                except Exception as e:
                    done.set_exception(e)
                else:
                    done.set_result(result)
            self._maybe_checkpoint()
        if not self._writing and self._drained is not None:
            self._drained.set_result(None)
            self._drained = None

    def _maybe_checkpoint(self) -> None:
        if (self._checkpoint is not None and not self._checkpoint.done()) or not self.store.checkpoint_due(self.agg):
            return
        snap = self.store.snapshot(self.agg)
        self._checkpoint = asyncio.get_running_loop().run_in_executor(self._checkpoints, self.store.write_checkpoint, snap)
        self._checkpoint.add_done_callback(_log_failure)

    async def drain(self) -> None:
        """Wait until every queued row is applied and no checkpoint is being written."""
        while self._writing or self._queue or (self._checkpoint is not None and not self._checkpoint.done()):
            if self._writing or self._queue:
                if self._drained is None:
                    self._drained = asyncio.get_running_loop().create_future()
                await asyncio.shield(self._drained)
            else:
                await asyncio.gather(self._checkpoint, return_exceptions=True)

    def close(self) -> None:
        self._journal.shutdown()
        self._checkpoints.shutdown()


def _log_failure(job: asyncio.Future) -> None:
    if not job.cancelled() and job.exception() is not None:
        log.warning("checkpoint failed (%s); the journal keeps every update since the last one", job.exception())
