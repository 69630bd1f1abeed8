"""Context-manager plumbing shared by the gateway's long-lived components."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """``with`` and ``async with`` for a component with ``close()`` and ``aclose()``.

    Entering calls the ``_enter``/``_aenter`` hooks (nothing by default: components
    connect lazily); leaving closes.
    """

    def close(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    def _enter(self) -> None:
        """Called by ``with``."""

    async def _aenter(self) -> None:
        """Called by ``async with``."""

    def __enter__(self) -> Self:
        self._enter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await self._aenter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
