"""Fixtures for the gateway-side tests: real plugins, a real registry, real processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from registry.server import RegistryServer
from registry.testing import FakePlugin, running_registry


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PluginProcess:
    """``python -m registry.testing`` as a child process, for SIGKILL tests."""

    def __init__(self, *, name: str = "fake", sources: tuple[str, ...] = ("fake",)) -> None:
        self.name = name
        self.sources = sources
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        args = [sys.executable, "-m", "registry.testing", "--name", self.name]
        for source in self.sources:
            args += ["--source", source]
        args += ["--port", str(self.port)]
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        self._proc = proc
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        text = line.decode().strip()
        assert text.startswith("listening on "), text
        self.port = int(text.rpartition(":")[2])

    async def kill(self) -> None:
        """SIGKILL it and reap it."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        if proc is not None:
            await proc.wait()

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.fixture
async def plugin() -> AsyncIterator[FakePlugin]:
    async with FakePlugin(name="k8s-plugin", sources=["k8s"]) as fake:
        yield fake


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[..., PluginProcess]]:
    """Make PluginProcess objects that are stopped after the test."""
    made: list[PluginProcess] = []

    def make(**kwargs: object) -> PluginProcess:
        proc = PluginProcess(**kwargs)  # type: ignore[arg-type]
        made.append(proc)
        return proc

    yield make
    for proc in made:
        await proc.stop()


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RegistryServer]:
    """Overrides the shared one: idle Watch streams get a progress message every 0.2 s."""
    async with running_registry(tmp_path, watch_progress_interval=0.2) as server:
        yield server


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    return free_port


class RegistryProcess:
    """``python -m registry serve`` as a child process (logs to a file), for SIGKILL tests."""

    def __init__(self, folder: Path) -> None:
        self.database = f"sqlite:///{folder / 'registry.db'}"
        self.log = folder / "registry.log"
        self.port = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Start it (on the port it had, if any) and wait until it serves."""
        self.log.write_text("")
        args = [sys.executable, "-m", "registry", "serve", "--db", self.database]
        args += ["--listen", f"127.0.0.1:{self.port}", "--log-level", "info"]
        with self.log.open("w") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.DEVNULL, stderr=log
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while (match := re.search(r"serving on \S+:(\d+)", self.log.read_text())) is None:
            assert self._proc.returncode is None, self.log.read_text()
            assert loop.time() < deadline, "the registry did not start"
            await asyncio.sleep(0.02)
        self.port = int(match.group(1))

    async def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
            await proc.wait()


@pytest.fixture
async def registry_process(tmp_path: Path) -> AsyncIterator[RegistryProcess]:
    process = RegistryProcess(tmp_path)
    await process.start()
    yield process
    await process.kill()
