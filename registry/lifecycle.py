"""``async with`` for the registry's long-lived components (server, plugin host, fakes)."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Any, Self


class AsyncService:
    """Components with ``start()`` and an idempotent ``stop()``: ``async with`` runs both."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait until it has ended (None: nothing to do)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
