"""``async with`` for the registry's long-lived components (server, plugin host, fakes)."""

from __future__ import annotations

from types import TracebackType
from typing import Self


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
