"""Ownership through RegistryState over a real store (SQLite and PostgreSQL).

It is durable with the Register that recorded it, survives restarts of the state,
and a release is durable when it returns; a failed commit takes it back in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text

from registry.catalog import Claim, Owner, Released
from registry.errors import PermissionDenied, RegistryUnavailable, StoreError
from registry.migrate import upgrade
from registry.model import PluginType, Principal, Registration
from registry.state import RegistryState
from registry.storage.store import Snapshot, SqlStore
from registry.testing import eventually

T0 = datetime(2026, 6, 7, 8, 9, 10, 123456, tzinfo=UTC)

A = Principal("team-a", frozenset({"register"}), names=("alpha", "es-writer"), sources=None)
B = Principal("team-b", frozenset({"register"}), names=("*",), sources=None)


def ingestor(name: str, *sources: str, address: str = "127.0.0.1:1") -> Registration:
    return Registration(
        name=name, type=PluginType.INGESTOR, address=address, sources=sources, lease_ttl_seconds=30
    )


def emitter(name: str, emitter_name: str) -> Registration:
    return Registration(
        name=name, type=PluginType.EMITTER, address="127.0.0.1:2", emitter_name=emitter_name
    )


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SqlStore]:
    opened = SqlStore.open(database_url)
    try:
        await upgrade(opened.engine)
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def started(store: SqlStore) -> Callable[[], AbstractAsyncContextManager[RegistryState]]:
    """``async with started() as state``: a RegistryState over ``store``, stopped after."""

    @contextlib.asynccontextmanager
    async def run() -> AsyncIterator[RegistryState]:
        state = RegistryState(store, clock=lambda: T0)
        await state.start()
        try:
            yield state
        finally:
            await state.stop()

    return run


async def stored(database_url: str) -> Snapshot:
    """What the database holds, read through an engine of its own."""
    other = SqlStore.open(database_url)
    try:
        return await other.load()
    finally:
        await other.close()


async def test_a_register_is_durable_with_its_ownership(started, database_url):
    async with started() as state:
        plugin = await state.register(ingestor("alpha", "k8s", "syslog"), A)
        # Answered: already in the database, before any flush or stop.
        snapshot = await stored(database_url)
        assert [p.plugin_id for p in snapshot.plugins] == [plugin.plugin_id]
        assert snapshot.owners == [Owner("alpha", "team-a", T0)]
        assert sorted(snapshot.claims, key=lambda c: c.key) == [
            Claim("source", "k8s", "team-a", "alpha", T0),
            Claim("source", "syslog", "team-a", "alpha", T0),
        ]
        # Open mode stores no ownership.
        await state.register(ingestor("open", "open-source"))
        assert len((await stored(database_url)).owners) == 1


async def test_ownership_survives_a_restart_and_so_does_a_release(started, database_url):
    async with started() as state:
        alpha = await state.register(ingestor("alpha", "k8s"), A)
        writer = await state.register(emitter("es-writer", "elastic"), A)
        await state.remove([writer.plugin_id])

    async with started() as state:
        assert state.catalog.owner_of("alpha") == "team-a"
        assert state.catalog.claim_of("emitter", "elastic") == Claim(
            "emitter", "elastic", "team-a", "es-writer", T0
        )
        with pytest.raises(PermissionDenied) as caught:
            await state.register(ingestor("alpha", "b-logs", address="127.0.0.1:3"), B)
        assert str(caught.value) == "info.name: plugin name 'alpha' belongs to another principal"
        # No instance of 'es-writer' is left; its emitter name is still team-a's.
        with pytest.raises(PermissionDenied) as caught:
            await state.register(emitter("b-out", "elastic"), B)
        assert str(caught.value) == (
            "info.emitter_name: emitter name 'elastic' belongs to plugin 'es-writer'"
        )
        with pytest.raises(PermissionDenied):
            state.check_instance_access(B, alpha.plugin_id)
        assert state.check_instance_access(A, alpha.plugin_id) == alpha
        assert state.check_instance_access(B, "01ARZ3NDEKTSV4RRFFQ69G5FAV") is None

        released = await state.release("es-writer")
        assert released == Released("es-writer", "team-a", emitter_names=("elastic",))
        # Durable when it returns.
        assert [o.name for o in (await stored(database_url)).owners] == ["alpha"]
        assert await state.release("es-writer") is None
        revision = state.catalog.revision

    async with started() as state:
        assert state.catalog.revision == revision  # a release makes no revision
        assert state.catalog.owner_of("es-writer") is None
        await state.register(emitter("b-out", "elastic"), B)
        assert state.catalog.owner_of("alpha") == "team-a"
        assert state.catalog.live_instances_of("team-a") == 1


async def test_a_failed_commit_takes_the_ownership_back(started, store, database_url):
    """A claim the database refuses: neither the plugin nor its ownership is stored,
    and memory forgets them too once the catalog is reloaded."""
    async with started() as state:
        kept = await state.register(emitter("es-writer", "elastic"), A)
        await poison_claims(store, "poison")
        with pytest.raises(StoreError):
            await state.register(ingestor("alpha", "k8s", "poison"), A)
        await eventually(lambda: state.writable, within=10, what="the catalog reloaded")

        snapshot = await stored(database_url)
        assert [p.plugin_id for p in snapshot.plugins] == [kept.plugin_id]
        assert snapshot.owners == [Owner("es-writer", "team-a", T0)]
        assert [p.plugin_id for p in state.catalog] == [kept.plugin_id]
        # What was stored before is reloaded with the catalog; what was not is gone.
        assert state.catalog.owner_of("es-writer") == "team-a"
        assert state.catalog.claim_of("emitter", "elastic") == snapshot.claims[0]
        assert state.catalog.owner_of("alpha") is None
        assert state.catalog.claim_of("source", "k8s") is None
        # So the name and the source are free for another principal.
        await state.register(ingestor("alpha", "k8s"), B)
        assert state.catalog.owner_of("alpha") == "team-b"
        assert sorted((await stored(database_url)).owners, key=lambda o: o.name) == [
            Owner("alpha", "team-b", T0),
            Owner("es-writer", "team-a", T0),
        ]


async def test_the_ownership_rows_commit_in_the_registrations_transaction(started, store):
    transactions: list[list[str]] = []

    def statement(sql: str, rows: Any) -> None:
        # The store's raw writer tells of each statement it sends, BEGIN included.
        if sql.startswith("BEGIN"):
            transactions.append([])
        elif transactions:
            transactions[-1].append(sql.split("(")[0].strip().upper())

    store.trace = statement
    try:
        async with started() as state:
            transactions.clear()
            await state.register(ingestor("alpha", "k8s"), A)
            written = [t for t in transactions if any("PLUGINS" in s for s in t)]
    finally:
        store.trace = None
    assert len(written) == 1, transactions
    assert {"INSERT INTO PLUGINS", "INSERT INTO CHANGES", "INSERT INTO OWNERS"} <= set(written[0])
    assert "INSERT INTO CLAIMS" in written[0]


async def test_a_release_needs_a_running_registry(store):
    state = RegistryState(store)
    with pytest.raises(RegistryUnavailable):
        await state.release("alpha")


async def poison_claims(store: SqlStore, key: str) -> None:
    """Make the database refuse a claim on ``key`` (a trigger), to fail one commit."""
    if store.engine.dialect.name == "sqlite":
        statements = [
            f"CREATE TRIGGER poison BEFORE INSERT ON claims WHEN NEW.key = '{key}' "
            "BEGIN SELECT RAISE(ABORT, 'poisoned claim'); END"
        ]
    else:
        statements = [
            "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.key = '{key}' THEN RAISE EXCEPTION 'poisoned claim'; END IF; "
            "RETURN NEW; END $$",
            "CREATE TRIGGER poison BEFORE INSERT ON claims FOR EACH ROW EXECUTE FUNCTION poison()",
        ]
    async with store.engine.begin() as conn:
        for sql in statements:
            await conn.execute(text(sql))
