"""The synchronous API: any thread, while loops run elsewhere; refused inside a loop."""

from __future__ import annotations

import asyncio
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from ingestor import ExternalIngestor, IngestContext, PluginError
from ingestor._loop import bridge_loop
from registry.testing import FakePlugin

CTX = IngestContext("k8s")


async def test_eight_threads_while_a_loop_runs_elsewhere(plugin: FakePlugin) -> None:
    # The plugin is served by this test's loop; eight threads call the sync API at once.
    ingestor = ExternalIngestor("k8s", plugin.address)
    start = threading.Barrier(8)

    def worker(n: int) -> list[int]:
        start.wait(timeout=30)
        return [len(ingestor.ingest(CTX, b"x\n" * (n + 1))) for _ in range(10)]

    with ThreadPoolExecutor(8) as pool:
        futures = [asyncio.wrap_future(pool.submit(worker, n)) for n in range(8)]
        results = await asyncio.gather(*futures)
    assert results == [[n + 1] * 10 for n in range(8)]
    assert plugin.ingest_calls == 80
    await asyncio.to_thread(ingestor.close)


async def test_sync_ingest_inside_a_running_loop_is_refused(plugin: FakePlugin) -> None:
    ingestor = ExternalIngestor("k8s", plugin.address)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        with pytest.raises(PluginError, match=r"await ingest_async"):
            ingestor.ingest(CTX, b"a")
        with pytest.raises(PluginError, match=r"await health_async"):
            ingestor.health()
    assert plugin.ingest_calls == 0
    # The async path on the same loop works.
    assert len(await ingestor.ingest_async(CTX, b"a")) == 1
    await ingestor.aclose()


async def test_sync_ingest_on_the_bridge_thread_is_refused(plugin: FakePlugin) -> None:
    # Code running on the private loop itself (e.g. a resolver hook) must not block it.
    ingestor = ExternalIngestor("k8s", plugin.address)

    async def on_bridge() -> str:
        try:
            ingestor.ingest(CTX, b"a")
        except PluginError as exc:
            return str(exc)
        return "no error"

    future = asyncio.run_coroutine_threadsafe(on_bridge(), bridge_loop())
    assert "ingest_async" in await asyncio.wrap_future(future)
    await asyncio.to_thread(ingestor.close)


async def test_sync_and_async_users_share_an_ingestor(plugin: FakePlugin) -> None:
    ingestor = ExternalIngestor("k8s", plugin.address)
    assert len(await ingestor.ingest_async(CTX, b"a")) == 1
    assert len(await asyncio.to_thread(ingestor.ingest, CTX, b"a\nb")) == 2
    health = await asyncio.to_thread(ingestor.health)
    assert health.healthy
    # Closing from this loop closes this loop's channels and the bridge's.
    await ingestor.aclose()
    with pytest.raises(PluginError, match="closed"):
        await asyncio.to_thread(ingestor.ingest, CTX, b"a")


async def test_sync_context_manager_from_a_thread(plugin: FakePlugin) -> None:
    def use() -> int:
        with ExternalIngestor("k8s", plugin.address) as ingestor:
            return len(ingestor.ingest(CTX, b"a\nb\nc"))

    assert await asyncio.to_thread(use) == 3
