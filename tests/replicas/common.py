"""Waiting and describing, shared by the replica harness modules.

Every wait has a deadline that bounds a failure (never measures anything) and says on
failure what it saw last.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

# Bounds on failures, generous because the suite runs on two busy cores.
DEADLINE = 30.0


async def until(
    probe: Callable[[], Any],
    *,
    within: float = DEADLINE,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.05,
) -> Any:
    """Poll ``probe`` (sync or async) until it gives something truthy; return that.

    Raises:
        AssertionError: ``within`` seconds passed first; the message is ``what``, called
            at that moment when it is a function (so it can show the last state seen).
    """
    deadline = time.monotonic() + within
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {within}s waiting for {text}")
        await asyncio.sleep(interval)


def rpc_error(exc: grpc.aio.AioRpcError | grpc.RpcError) -> str:
    """``CODE: details`` of a failed call."""
    return f"{exc.code().name}: {exc.details()}"


def short(items: Sequence[Any], limit: int = 12) -> str:
    """At most ``limit`` items of a list, and how many more there are."""
    shown = ", ".join(map(str, items[:limit]))
    more = len(items) - limit
    return f"[{shown}{f', … {more} more' if more > 0 else ''}]"
