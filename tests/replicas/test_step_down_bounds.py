"""A leader stepping down (or stopping) answers every write it took (SPEC §8).

The journal stops after the write in flight; a write staged meanwhile used to be left
there, its caller waiting for a commit nobody would make. Here it is written or
refused, never left waiting. A real SQLite store, its writes held at a gate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from registry.errors import RegistryUnavailable
from registry.migrate import upgrade
from registry.model import Change, Plugin
from registry.state import RegistryState
from registry.storage.store import Batch, Snapshot, SqlStore
from registry.validation import registration_from_request

from .common import DEADLINE, until
from .load import register_request


class GatedStore:
    """A real store whose writes wait at a gate while it is closed."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.open = asyncio.Event()
        self.open.set()
        self.writing = asyncio.Event()

    async def load(self) -> Snapshot:
        return await self.store.load()

    async def load_history(self, known: object = None) -> list[Change]:
        return await self.store.load_history()

    async def write(self, batch: Batch) -> None:
        self.writing.set()
        await self.open.wait()
        await self.store.write(batch)

    async def ping(self) -> None:
        await self.store.ping()

    async def close(self) -> None:
        await self.store.close()


@pytest.fixture
async def gated(tmp_path: Path) -> AsyncIterator[GatedStore]:
    store = SqlStore.open(f"sqlite:///{tmp_path / 'registry.db'}")
    await upgrade(store.engine)
    gated = GatedStore(store)
    try:
        yield gated
    finally:
        await store.close()


async def _register(state: RegistryState, name: str, port: int) -> Plugin:
    return await state.register(registration_from_request(register_request(name, port), 30))


@pytest.mark.parametrize("step", ["follow", "stop"])
async def test_a_write_staged_during_the_last_write_is_answered(
    gated: GatedStore, step: str
) -> None:
    state = RegistryState(gated, flush_interval=3600.0)
    await state.start()
    try:
        await _register(state, "before", 21000)
        gated.open.clear()
        gated.writing.clear()
        in_flight = asyncio.create_task(_register(state, "in-flight", 21001))
        await until(gated.writing.is_set, what="the write of in-flight to start")
        staged = asyncio.create_task(_register(state, "staged", 21002))
        await until(
            lambda: any(p.name == "staged" for p in state.catalog),
            what="staged to be staged behind the write in flight",
        )
        stepping = asyncio.create_task(state.follow() if step == "follow" else state.stop())
        await until(lambda: not state.leading, what="the journal to be stopping")
        gated.open.set()

        await asyncio.wait_for(in_flight, DEADLINE)
        try:
            await asyncio.wait_for(staged, DEADLINE)
        except RegistryUnavailable:
            pass  # refused is an answer too; waiting for ever is not
        except TimeoutError:
            raise AssertionError(
                f"a write staged while the last one was in flight got no answer after {step}"
            ) from None
        await asyncio.wait_for(stepping, DEADLINE)
    finally:
        gated.open.set()
        await state.stop()
