"""The sync bridge: one private event loop thread that runs the async core for sync callers.

The synchronous entry points that need the async core (a resolver's ``start``, the
vetting of a new plugin address, closing channels made on it) submit their coroutine
here with ``run_coroutine_threadsafe`` and wait for the result; a sync ``ingest``
itself calls on its own thread (:mod:`ingestor.sync_connection`). The loop thread is
started on first use, is a daemon, and is shared by every client in the process; it
is never ``asyncio.run`` per call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ingestor.errors import PluginConnectionError, PluginError

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def bridge_loop() -> asyncio.AbstractEventLoop:
    """The private loop, started on first use (a daemon thread named ``polku-ingestor``)."""
    global _loop
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            threading.Thread(target=serve, name="polku-ingestor", daemon=True).start()
            started.wait()
            _loop = loop
        return _loop


def started_bridge_loop() -> asyncio.AbstractEventLoop | None:
    """The private loop if it was started, without starting it."""
    return _loop


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The loop running on this thread, if any."""
    # asyncio's own None-returning check: no exception raised and caught on every sync call.
    return asyncio._get_running_loop()


def refuse_inside_loop(what: str, instead: str) -> None:
    """Raise PluginError when called on a thread whose event loop is running.

    Blocking there would stall that loop (and deadlock when the work needs it).
    """
    if running_loop() is not None:
        raise PluginError(
            f"{what} is synchronous and would block the event loop running on this thread; "
            f"use `await {instead}` instead"
        )


def run_sync(
    factory: Callable[[], Coroutine[Any, Any, T]], *, timeout: float | None, what: str, instead: str
) -> T:
    """Run ``factory()`` on the bridge loop and wait for its result.

    Raises:
        PluginError: called on a thread whose event loop is running (nothing is run).
        PluginConnectionError: no result within ``timeout`` (the coroutine is cancelled).
        Whatever the coroutine raises. An interrupt (KeyboardInterrupt) while waiting
        cancels the coroutine and propagates.
    """
    refuse_inside_loop(what, instead)
    future = asyncio.run_coroutine_threadsafe(factory(), bridge_loop())
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError as exc:
        if future.done():
            raise  # the coroutine's own TimeoutError, not our wait's
        future.cancel()
        raise PluginConnectionError(f"{what} did not finish within {timeout:.3g} s") from exc
    except BaseException:
        future.cancel()
        raise
