"""Every virtual device's error-feedback residuals, kept on disk between its tasks.

A device's residual (what its lossy codec has not sent yet) must survive until its next task,
as it does on a real device (``edge_client`` saves it next to its state). Held in memory, that
is the size of a plan's trainable tensors for every device that ever trained: 100,000 devices
of gpt-tiny came to tens of GiB. Here a residual is in memory only while its device encodes an
update; in between it is an exact float32 blob (``ErrorFeedback.to_bytes``) in a scratch SQLite
file, so memory follows the tasks in flight and the disk the population. Results are the same
as with every residual in memory: the bytes round-trip exactly.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from stamen.compression.feedback import ErrorFeedback


class ResidualStore:
    """Residuals by device id, in a scratch file removed by ``close``."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="stamen-residuals-")
        # A scratch file: nothing to recover after a crash, so no journal and no fsync.
        self.path = Path(self._dir.name) / "residuals.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("CREATE TABLE residual (device INTEGER PRIMARY KEY, data BLOB NOT NULL)")

    def get(self, device: int) -> ErrorFeedback:
        """The device's residuals (none yet: a fresh ErrorFeedback)."""
        row = self._db.execute("SELECT data FROM residual WHERE device = ?", (device,)).fetchone()
        return ErrorFeedback.from_bytes(row[0]) if row else ErrorFeedback()

    def put(self, device: int, ef: ErrorFeedback) -> None:
        self._db.execute("INSERT OR REPLACE INTO residual VALUES (?, ?)", (device, ef.to_bytes()))

    def close(self) -> None:
        self._db.close()
        self._dir.cleanup()
