"""Subprocess helpers for end-to-end tests: the registry CLI and small client processes.

:func:`cli` runs one client command to completion; :func:`ok` and
:func:`one_line_error` check how it ended; :class:`Lines` reads a long-running
command's stream on a thread and waits for a line with a deadline.

The registry runs as ``python -m registry serve --listen 127.0.0.1:0 --db URL``; its
output (stdout and stderr together) is drained line by line on a thread, so the pipe
never fills, and the address is read from its ``serving on HOST:PORT`` log line.
Methods block: async tests call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

import pytest

from registry.wire import pb

SERVING = re.compile(r"serving on (\S+)")
START_TIMEOUT = 60.0
CLI = [sys.executable, "-m", "registry"]
DEADLINE = 30.0  # seconds for a process to start, answer or stop; a bound, never a wait


def environment(**extra: str) -> dict[str, str]:
    """This process's environment without the registry's own settings, unbuffered, plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLKU_REGISTRY")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """One ``polku-registry`` command as a process of its own, ``env`` added to its
    environment; raises subprocess.TimeoutExpired past DEADLINE."""
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, env=environment(**env), timeout=DEADLINE
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that succeeded and wrote nothing on stderr."""
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def one_line_error(result: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The single error line of a failed command; fails on a traceback or more lines."""
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("polku-registry: error: "), lines[0]
    return lines[0]


class Lines:
    """The lines a process writes to one stream, read by a thread so that the pipe never
    fills, and waited for with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []  # every line so far; complete once the process has exited
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def expect(self, wanted: Callable[[str], Any], what: str, timeout: float = DEADLINE) -> str:
        """The next line that ``wanted`` accepts. Fails at the deadline or at EOF."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)  # stay at EOF for later calls
                pytest.fail(f"the stream ended before {what}; it said: {self.lines}")
            if wanted(line):
                return line
        pytest.fail(f"no {what} within {timeout}s; got: {self.lines}")

    def join(self) -> None:
        """Wait (up to DEADLINE) for the reader, which ends at the stream's EOF."""
        self._thread.join(DEADLINE)


class RegistryProcess:
    """``polku-registry serve`` as a child process. ``start()``, then ``kill()`` or ``stop()``."""

    def __init__(self, database_url: str, *extra_args: str) -> None:
        self.argv = [
            sys.executable,
            "-m",
            "registry",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--db",
            database_url,
            *extra_args,
        ]
        self.address: str | None = None
        self._lines: list[str] = []
        self._ended = False
        self._changed = threading.Condition()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def output(self) -> str:
        """Everything it printed so far."""
        with self._changed:
            return "\n".join(self._lines)

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    def start(self, timeout: float = START_TIMEOUT) -> str:
        """Start it and wait for its ``serving on`` line; returns the address.

        Raises AssertionError (with its output) if it exits or stays silent first.
        """
        self._process = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=environment(),
        )
        self._reader = threading.Thread(target=self._drain, name="registry-output", daemon=True)
        self._reader.start()
        with self._changed:
            ready = self._changed.wait_for(lambda: self.address or self._ended, timeout)
        if not ready or self.address is None:
            self.kill()
            raise AssertionError(
                f"the registry did not start within {timeout}s "
                f"(exit {self.returncode}):\n{self.output}"
            )
        return self.address

    def _drain(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for line in self._process.stdout:
            with self._changed:
                self._lines.append(line.rstrip("\n"))
                if self.address is None and (match := SERVING.search(line)):
                    self.address = match.group(1)
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final flush."""
        self._end(signal.SIGKILL)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout``; returns its status."""
        return self._end(signal.SIGTERM, timeout)

    def _end(self, sig: signal.Signals, timeout: float = 30.0) -> int:
        process = self._process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(sig)
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if self._reader is not None:
            self._reader.join(timeout)
        if process.stdout is not None:
            process.stdout.close()
        return code

    def __enter__(self) -> RegistryProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# A client process that imports nothing but grpc (importing the registry package would
# cost more than the calls): it reads hex-encoded RegisterRequests on stdin, sends them
# all at once, and prints {"responses": [hex RegisterResponse...], "errors": [...]}.
CLIENT_SCRIPT = """
import asyncio, json, sys
import grpc

async def main(address, requests):
    async with grpc.aio.insecure_channel(address) as channel:
        register = channel.unary_unary("/polku.v1.PluginRegistry/Register")

        async def one(raw):
            try:
                return (await register(raw, timeout=60)).hex(), None
            except grpc.aio.AioRpcError as exc:
                return None, f"{exc.code().name}: {exc.details()}"

        results = await asyncio.gather(*(one(raw) for raw in requests))
    responses = [response for response, _ in results if response is not None]
    errors = [error for _, error in results if error is not None]
    print(json.dumps({"responses": responses, "errors": errors}), flush=True)

asyncio.run(main(sys.argv[1], [bytes.fromhex(line) for line in sys.stdin.read().split()]))
"""


@dataclass
class ClientResult:
    ids: list[str]
    errors: list[str]
    returncode: int
    stderr: str


def client_command(address: str) -> Sequence[str]:
    """Run CLIENT_SCRIPT against ``address``; feed it :func:`client_input`."""
    return [sys.executable, "-c", CLIENT_SCRIPT, address]


def client_input(requests: Iterable[pb.RegisterRequest]) -> bytes:
    return "".join(f"{r.SerializeToString().hex()}\n" for r in requests).encode()


def parse_client(stdout: bytes, stderr: bytes, returncode: int) -> ClientResult:
    """The acknowledged plugin ids and the errors a client process reported."""
    text = stdout.decode(errors="replace").strip()
    try:
        data = json.loads(text.splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        data = {"responses": [], "errors": [f"no result printed: {text!r}"]}
    ids, errors = [], list(data["errors"])
    for raw in data["responses"]:
        response = pb.RegisterResponse.FromString(bytes.fromhex(raw))
        if response.accepted and response.plugin_id:
            ids.append(response.plugin_id)
        else:
            errors.append(f"not accepted: {response}")
    return ClientResult(ids, errors, returncode, stderr.decode(errors="replace"))
