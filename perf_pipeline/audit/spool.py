"""The audit writer's spool: an append-only local folder of ``COPY`` text segments, and its leftovers.

Each segment ``<seq:016d>.copy`` holds the ``COPY`` lines of at most one batch, named by its sequence number
(delivery order). A segment is written with one ``write()`` to ``<name>.tmp`` and renamed into place
(fsynced with the folder only when asked); the delivery thread deletes it once its ``COMMIT`` returned.
Segments still there when a writer starts are a previous process's leftovers, replayed first, in order:
:meth:`Spool.recover` lists them (and keeps the complete lines of a segment whose write was cut short).
An exclusive ``flock`` on ``<folder>/.lock`` keeps two live writers from sharing one folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from pathlib import Path

from perf_pipeline.audit.errors import AuditError

log = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^(\d{16})\.copy$")


class Spool:
    """Append-only folder of segment files ``<seq:016d>.copy``; the flusher deletes one once delivered.

    The constructor creates the folder and takes an exclusive ``flock`` on ``<folder>/.lock`` for the
    writer's lifetime (released by :meth:`close`); raises :class:`AuditError` when another live writer
    holds it. Not thread-safe by itself: the writer hands each sequence number to one thread.
    """

    def __init__(self, folder: Path, fsync: bool) -> None:
        self.folder = folder
        self.fsync = fsync
        folder.mkdir(parents=True, exist_ok=True)
        self._lock_fh = open(folder / ".lock", "a")  # noqa: SIM115 — held for the writer's lifetime
        try:
            fcntl.flock(self._lock_fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fh.close()
            raise AuditError(f"spool folder {folder} is in use by another live AuditWriter") from None

    def path(self, seq: int) -> Path:
        """The segment file of sequence number ``seq``."""
        return self.folder / f"{seq:016d}.copy"

    def recover(self) -> list[tuple[int, int]]:
        """(seq, events) of the segments left by a previous process, oldest first.

        A ``.tmp`` file is a segment whose writer died mid-write: its complete lines are kept. Cost: reads
        every segment once to count its lines (~1 s per GB).
        """
        for tmp in sorted(self.folder.glob("*.copy.tmp")):
            data = tmp.read_bytes()
            data = data[: data.rfind(b"\n") + 1]
            if data:
                final = tmp.with_suffix("")
                final.write_bytes(data)
                log.warning(
                    "recovered %d complete events from the partial spool segment %s",
                    data.count(b"\n"),
                    tmp.name,
                )
            tmp.unlink()
        found = []
        for p in self.folder.iterdir():
            m = _SEGMENT.match(p.name)
            if m:
                found.append((int(m.group(1)), p.read_bytes().count(b"\n")))
        return sorted(found)

    def write(self, seq: int, payload: bytes) -> None:
        """One write() + rename(); fsync of the file and the folder when ``fsync``."""
        final = self.path(seq)
        tmp = final.with_name(final.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        if self.fsync:
            dfd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def read(self, seq: int) -> bytes:
        """The payload of segment ``seq`` (one file read)."""
        return self.path(seq).read_bytes()

    def remove(self, seq: int) -> None:
        """Delete segment ``seq`` (its batch is acknowledged); a missing file is fine."""
        self.path(seq).unlink(missing_ok=True)

    def reject(self, lines: list[bytes]) -> None:
        """Append lines the database refused to ``<folder>/rejected.copy``."""
        with open(self.folder / "rejected.copy", "ab") as fh:
            fh.write(b"".join(lines))

    def close(self) -> None:
        """Release the folder's ``flock`` (another writer may then use the folder)."""
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
        self._lock_fh.close()


__all__: list[str] = ["Spool"]
