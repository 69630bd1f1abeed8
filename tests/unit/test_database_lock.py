"""The SQLite database lock: one holder at a time, freed when its holder dies (SPEC §8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.errors import StoreError
from registry.replica.lock import DatabaseInUse, DatabaseLock, lock_for

DEADLINE = 30.0  # bound on a child process's start and exit, never a wait

# Holds the lock of argv[1], says so, and keeps it until killed (or stdin closes).
HOLDER = """
import sys
from pathlib import Path
from registry.replica.lock import DatabaseLock

lock = DatabaseLock.acquire(Path(sys.argv[1]))
print("locked", flush=True)
sys.stdin.read()
"""


def in_use(path: Path, pid: int | str) -> str:
    return f"database {path.absolute()} is in use by another registry (pid {pid})"


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture
def holder(database: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process holding the lock of ``database``."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(database)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "locked\n"  # EOF (it failed) reads ""
        yield child
    finally:
        child.kill()
        child.wait(DEADLINE)
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()


def test_a_second_acquire_is_refused_naming_the_holder(database: Path) -> None:
    with DatabaseLock.acquire(database) as first:
        with pytest.raises(DatabaseInUse) as refused:
            DatabaseLock.acquire(database)
        assert str(refused.value) == in_use(database, os.getpid())
        assert isinstance(refused.value, StoreError)  # the CLI prints it as one line
        assert first.held
    assert not first.held


def test_release_frees_it_and_is_idempotent(database: Path) -> None:
    first = DatabaseLock.acquire(database)
    first.release()
    first.release()
    with DatabaseLock.acquire(database) as second:
        assert second.held
    # The sidecar stays (deleting it would be racy) and names the last holder.
    sidecar = database.with_name("registry.db.lock")
    assert sidecar.read_text() == f"{os.getpid()}\n"
    assert sidecar.stat().st_mode & 0o777 == 0o600


def test_the_holder_pid_replaces_a_longer_one(database: Path) -> None:
    sidecar = database.with_name("registry.db.lock")
    sidecar.write_text("99999999999999\n")
    with DatabaseLock.acquire(database):
        assert sidecar.read_text() == f"{os.getpid()}\n"


def test_another_process_holds_it_until_killed(
    database: Path, holder: subprocess.Popen[str]
) -> None:
    with pytest.raises(DatabaseInUse) as refused:
        DatabaseLock.acquire(database)
    assert str(refused.value) == in_use(database, holder.pid)

    holder.send_signal(signal.SIGKILL)
    assert holder.wait(DEADLINE) == -signal.SIGKILL
    # No cleanup ran, the sidecar still names the dead pid: the kernel freed the lock.
    assert database.with_name("registry.db.lock").read_text() == f"{holder.pid}\n"
    with DatabaseLock.acquire(database) as lock:
        assert lock.held


@pytest.mark.parametrize("content", ["", "garbage\n", "0\n", "-12\n", "1 2\n", "9" * 40])
def test_a_pid_file_that_names_no_pid_says_pid_unknown(database: Path, content: str) -> None:
    with DatabaseLock.acquire(database):
        database.with_name("registry.db.lock").write_text(content)
        with pytest.raises(DatabaseInUse) as refused:
            DatabaseLock.acquire(database)
    assert str(refused.value) == in_use(database, "unknown")


def test_a_relative_path_is_named_absolute(database: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(database.parent)
    with DatabaseLock.acquire(Path("registry.db")), pytest.raises(DatabaseInUse) as refused:
        DatabaseLock.acquire(Path("registry.db"))
    assert str(refused.value).startswith(f"database {database} is in use")


def test_a_symbolic_link_shares_the_lock_of_its_target(database: Path) -> None:
    link = database.with_name("link.db")
    link.symlink_to(database)
    with DatabaseLock.acquire(database), pytest.raises(DatabaseInUse) as refused:
        DatabaseLock.acquire(link)
    assert str(refused.value) == in_use(link, os.getpid())


def test_a_missing_folder_is_a_store_error_not_in_use(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "registry.db"
    with pytest.raises(StoreError) as failed:
        DatabaseLock.acquire(missing)
    assert not isinstance(failed.value, DatabaseInUse)
    assert str(failed.value).startswith(f"cannot lock database {missing}: ")
    assert not missing.parent.exists()


def test_a_symbolic_link_loop_is_a_store_error(tmp_path: Path) -> None:
    loop = tmp_path / "loop.db"
    loop.symlink_to(loop)
    with pytest.raises(StoreError, match=f"^cannot lock database {loop}: "):
        DatabaseLock.acquire(loop)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:5432/test",
        "postgresql+asyncpg://postgres@127.0.0.1:5432/test",
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite+aiosqlite:///:memory:",
    ],
)
def test_no_lock_for_postgres_or_in_memory(url: str) -> None:
    assert lock_for(url) is None


@pytest.mark.parametrize("scheme", ["sqlite", "sqlite+aiosqlite"])
def test_lock_for_an_sqlite_file(database: Path, scheme: str) -> None:
    lock = lock_for(f"{scheme}:///{database}")
    assert lock is not None
    with lock, pytest.raises(DatabaseInUse, match=r"\(pid \d+\)$"):
        DatabaseLock.acquire(database)
    assert not lock.held
