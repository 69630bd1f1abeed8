"""An etcd server process on loopback ports of its own, in a data directory it is given.

Single member, etcd's defaults otherwise (WAL fsync on, snapshot count 100,000), as a
discovery system would run it. Restarting reuses the same ports and data directory.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from bench.common import Process

# The benchmark's documented setup (bench/README.md) installs it; tests never do.
MISSING = "etcd not found: apt-get install etcd-server"
_READY = r'serving client traffic insecurely.*?"address":"([^"]+)"'


def etcd_binary() -> str | None:
    """The etcd executable: ``$ETCD`` if set (and only it), else ``etcd`` on PATH, else
    /usr/bin/etcd; None when there is none."""
    explicit = os.environ.get("ETCD")
    if explicit is not None:
        return explicit if os.access(explicit, os.X_OK) else None
    for candidate in (shutil.which("etcd"), "/usr/bin/etcd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with ``prefix``"."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Etcd:
    """``start()`` / ``stop()`` an etcd member; ``address`` is its client HOST:PORT."""

    def __init__(self, data_dir: Path, binary: str | None = None) -> None:
        found = binary or etcd_binary()
        if found is None:
            raise RuntimeError(MISSING)
        self.binary = found
        self.data_dir = data_dir
        self.client = f"http://127.0.0.1:{_free_port()}"
        self.peer = f"http://127.0.0.1:{_free_port()}"
        self.process: Process | None = None

    @property
    def address(self) -> str:
        return self.client.removeprefix("http://")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.proc.pid

    def start(self, timeout: float = 60.0) -> Process:
        args = [
            self.binary,
            "--name=bench",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client}",
            f"--advertise-client-urls={self.client}",
            f"--listen-peer-urls={self.peer}",
            f"--initial-advertise-peer-urls={self.peer}",
            f"--initial-cluster=bench={self.peer}",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        self.process = Process(args, _READY)
        self.process.wait_ready(timeout)
        return self.process

    def rss_mb(self) -> float:
        assert self.process is not None
        return self.process.rss_mb()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
