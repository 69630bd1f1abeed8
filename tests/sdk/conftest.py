"""Helpers of the SDK tests: real subprocesses read line by line, registries, Watch recorders.

Nothing here sleeps to synchronise: :class:`Proc` wakes its waiters on every line a
process prints, :class:`WatchRecorder` on every message the registry pushes, and
:func:`eventually` polls a condition every 10 ms up to a deadline that bounds a
failure, never measures anything.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from watch_helpers import WatchRecorder as WatchRecorder

from registry import RegistryClient, testing
from registry.wire import pb

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
# Bounds on failures, generous because the suite runs on two busy cores.
DEADLINE = 30.0


async def eventually(
    probe: Callable[[], Any], *, within: float = DEADLINE, what: str = "condition"
) -> Any:
    """:func:`registry.testing.eventually` with this suite's generous deadline."""
    return await testing.eventually(probe, within=within, what=what)


def free_port() -> int:
    """A port nothing listens on now (bound to port 0, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class Proc:
    """A subprocess whose stdout and stderr are read line by line as they come."""

    def __init__(
        self, name: str, argv: Sequence[str], *, cwd: Path = ROOT, stdin: bool = False
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.cwd = cwd
        self.lines: list[str] = []  # both streams, "out: ..." / "err: ..."
        self._stdin = stdin
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._changed = asyncio.Condition()
        self._open_streams = 0

    @property
    def process(self) -> asyncio.subprocess.Process:
        assert self._process is not None, f"{self.name} is not started"
        return self._process

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def start(self) -> Proc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._process = await asyncio.create_subprocess_exec(
            *self.argv,
            cwd=self.cwd,
            env=env,
            stdin=asyncio.subprocess.PIPE if self._stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self._process.stdout is not None
        assert self._process.stderr is not None
        self._open_streams = 2
        self._readers = [
            asyncio.create_task(self._read("out", self._process.stdout)),
            asyncio.create_task(self._read("err", self._process.stderr)),
        ]
        return self

    async def _read(self, stream: str, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                async with self._changed:
                    self.lines.append(f"{stream}: {line.decode(errors='replace').rstrip()}")
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self._open_streams -= 1
                self._changed.notify_all()

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    async def wait_line(self, pattern: str, *, within: float = DEADLINE) -> re.Match[str]:
        """The first line (on either stream) matching ``pattern``; waits for it.

        Raises:
            AssertionError: the process closed its output or ``within`` seconds passed first.
        """
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next(filter(None, map(regex.search, self.lines)), None)

        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(lambda: found() or self._open_streams == 0)
        except TimeoutError:
            pass
        match = found()
        if match is None:
            raise AssertionError(
                f"{self.name} printed no line matching {pattern!r}:\n{self.output()}"
            )
        return match

    async def write(self, text: str) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(text.encode())
        await stdin.drain()

    def send_signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def wait(self, *, within: float = DEADLINE) -> int:
        """Its exit status, once it has exited and its output is read."""
        try:
            async with asyncio.timeout(within):
                code = await self.process.wait()
                await asyncio.gather(*self._readers)
        except TimeoutError:
            raise AssertionError(f"{self.name} did not exit:\n{self.output()}") from None
        return code

    async def close(self) -> None:
        """Kill it if it still runs. Idempotent."""
        if self._process is None:
            return
        if self._process.returncode is None:
            self._process.kill()
        await self._process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


@pytest.fixture
async def procs() -> AsyncIterator[Callable[..., Proc]]:
    """Make processes (``procs(name, argv)``; start them yourself); all killed after the test."""
    made: list[Proc] = []

    def make(name: str, argv: Sequence[str], **kwargs: object) -> Proc:
        proc = Proc(name, argv, **kwargs)  # type: ignore[arg-type]
        made.append(proc)
        return proc

    yield make
    for proc in reversed(made):
        await proc.close()


async def start_registry(
    procs: Callable[..., Proc], port: int, database: Path, *extra: str
) -> tuple[Proc, str]:
    """A ``polku-registry serve`` subprocess on ``port``; returns it and its address."""
    argv = [sys.executable, "-m", "registry", "serve", "--listen", f"127.0.0.1:{port}"]
    proc = await procs("registry", [*argv, "--db", f"sqlite:///{database}", *extra]).start()
    match = await proc.wait_line(r"serving on (\S+)")
    return proc, match.group(1)


def healthy(plugins: list[pb.RegisteredPlugin]) -> pb.RegisteredPlugin | None:
    return next((p for p in plugins if p.status == pb.PLUGIN_STATUS_HEALTHY), None)


async def wait_healthy(client: RegistryClient, name: str) -> pb.RegisteredPlugin:
    """The first HEALTHY instance of plugin ``name``, once there is one."""

    async def probe() -> pb.RegisteredPlugin | None:
        return healthy(await client.list_plugins(name=name))

    found: pb.RegisteredPlugin = await eventually(probe, what=f"{name} to be HEALTHY")
    return found


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
