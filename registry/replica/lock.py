"""One registry per SQLite file: an exclusive lock taken before migrating (SPEC §8).

    with DatabaseLock.acquire(Path("registry.db")):
        ...  # migrate and serve; a second registry on the file gets DatabaseInUse

The lock is a ``flock`` on a sidecar file, ``<database>.lock`` next to the database,
rather than on the database itself:

- the sidecar holds the holder's pid, for the message a second registry prints; the
  database file is SQLite's and nothing else may be written into it;
- ``flock`` locks are independent of the POSIX ``fcntl`` record locks SQLite takes on
  the database, and closing any descriptor of a file drops every ``fcntl`` lock the
  process holds on it: a lock of ours on the database file itself would fight SQLite's.

The kernel drops a ``flock`` when its holder exits, even by SIGKILL, so a stale
sidecar (it is never deleted) never blocks a later registry. The pid in it is only
informative: a new holder overwrites it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType

from registry.errors import StoreError
from registry.storage.store import sqlite_path

log = logging.getLogger(__name__)

_PID_BYTES = 32  # more than any pid's digits; a longer sidecar is not ours


class DatabaseInUse(StoreError):
    """Another process (a registry, or a migration) holds the lock on this database."""


class DatabaseLock:
    """An exclusive, non-blocking lock on an SQLite database, held until :meth:`release`.

    Taken with :meth:`acquire` (or :func:`lock_for`); a context manager that releases
    on exit. Each call is a few syscalls, fine to make on an event loop.
    """

    def __init__(self, database: Path, fd: int) -> None:
        """Use :meth:`acquire`; this wraps a descriptor that already holds the lock."""
        self.database = database
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, database: Path) -> DatabaseLock:
        """Lock ``database`` for this process and write its pid into the sidecar.

        The sidecar is ``<database>.lock`` beside the file the path resolves to, so a
        symbolic link and its target share one lock (as SQLite's own journal files do).

        Raises:
            DatabaseInUse: another holder has it: ``database <path> is in use by
                another registry (pid N)`` (``pid unknown`` when the sidecar does not
                say).
            StoreError: the sidecar cannot be opened or locked.
        """
        shown = database.absolute()
        try:
            real = database.resolve()
            sidecar = real.with_name(real.name + ".lock")
            fd = os.open(sidecar, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
            why = exc.strerror if isinstance(exc, OSError) else None
            raise StoreError(f"cannot lock database {shown}: {why or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DatabaseInUse(
                f"database {shown} is in use by another registry ({holder})"
            ) from None
        except OSError as exc:
            os.close(fd)
            unsupported = exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP)
            why = "the file system does not support locks" if unsupported else exc.strerror
            raise StoreError(f"cannot lock database {shown}: {why or exc}") from exc
        _write_pid(fd, sidecar)
        return cls(shown, fd)

    @property
    def held(self) -> bool:
        """True until :meth:`release`."""
        return self._fd is not None

    def release(self) -> None:
        """Unlock and close; idempotent. The sidecar stays: deleting it would be racy
        (a newcomer may have opened it already and would then lock a file nobody sees)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> DatabaseLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DatabaseLock({str(self.database)!r}, held={self.held})"


def lock_for(url: str) -> DatabaseLock | None:
    """Take the lock of an SQLite URL's file; None for PostgreSQL or in-memory SQLite.

    ``url`` is one :meth:`registry.storage.store.SqlStore.open` accepted.

    Raises:
        DatabaseInUse: another process holds it.
        StoreError: it cannot be taken.
    """
    path = sqlite_path(url)
    return DatabaseLock.acquire(path) if path is not None else None


def _write_pid(fd: int, sidecar: Path) -> None:
    """Write this process's pid into the locked sidecar; best effort.

    The lock is what keeps a second registry out, the pid only names the holder: on a
    full disk the lock is kept and a second registry says ``pid unknown``.
    """
    try:
        # Truncate first: a shorter pid must not leave digits of the previous one.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:
        log.warning("cannot write the pid into %s: %s", sidecar, exc.strerror or exc)


def _holder(fd: int) -> str:
    """``pid N`` as the holder wrote it in the sidecar, or ``pid unknown``."""
    try:
        raw = os.pread(fd, _PID_BYTES + 1, 0)
    except OSError:
        return "pid unknown"
    text = raw.decode("ascii", errors="replace").strip()
    if len(raw) > _PID_BYTES or not text.isdecimal() or int(text) <= 0:
        return "pid unknown"
    return f"pid {int(text)}"
