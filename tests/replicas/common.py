"""Waiting and describing, shared by the replica harness modules.

Every wait has a deadline that bounds a failure (never measures anything) and says on
failure what it saw last.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from registry.testing import eventually

# Bounds on failures, generous because the suite runs on two busy cores.
DEADLINE = 30.0


async def until(
    probe: Callable[[], Any],
    *,
    within: float = DEADLINE,
    what: str | Callable[[], str] = "condition",
    interval: float = 0.05,
) -> Any:
    """:func:`registry.testing.eventually` with this harness's deadline and interval."""
    return await eventually(probe, within=within, what=what, interval=interval)


def rpc_error(exc: grpc.aio.AioRpcError | grpc.RpcError) -> str:
    """``CODE: details`` of a failed call."""
    return f"{exc.code().name}: {exc.details()}"


def short(items: Sequence[Any], limit: int = 12) -> str:
    """At most ``limit`` items of a list, and how many more there are."""
    shown = ", ".join(map(str, items[:limit]))
    more = len(items) - limit
    return f"[{shown}{f', … {more} more' if more > 0 else ''}]"
