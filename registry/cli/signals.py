"""SIGINT and SIGTERM end the long-running commands (``serve``, ``watch``) cleanly."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def until_signalled(work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work`` until it ends or SIGINT/SIGTERM cancels it; True when a signal did.

    Raises:
        Whatever ``work`` raises, except the cancellation a signal caused.
    """
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await task
    except asyncio.CancelledError:
        if not received:
            raise
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
    return bool(received)
