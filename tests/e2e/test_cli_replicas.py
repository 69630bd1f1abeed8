"""The command line given several registry addresses, and ``polku-registry status``.

A real registry process on SQLite; each command a process of its own. A "dead"
address is a port bound and released again: connections to it are refused.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import CLI, DEADLINE, RegistryProcess, cli, environment, ok, one_line_error


def dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a registry process shared by this module."""
    folder = tmp_path_factory.mktemp("registry")
    with RegistryProcess(f"sqlite:///{folder / 'registry.db'}") as process:
        yield process.start()
        assert "Traceback" not in process.output


@pytest.fixture(scope="module")
def plugin_id(live: str) -> str:
    """A plugin an operator registered on the live registry."""
    args = ["--name", "replicas", "--address", "127.0.0.1:9", "--source", "replicas"]
    return ok(cli("register", "--registry", live, *args)).strip()


def test_list_goes_past_a_dead_address(live: str, plugin_id: str) -> None:
    plugins = json.loads(ok(cli("list", "--registry", f"{dead_address()},{live}", "-o", "json")))
    assert [p["plugin_id"] for p in plugins] == [plugin_id]


def test_POLKU_REGISTRY_takes_several_addresses(live: str, plugin_id: str) -> None:
    table = ok(cli("list", POLKU_REGISTRY=f"{dead_address()}, {live}"))
    assert plugin_id in table


def test_every_client_command_takes_several_addresses(live: str, plugin_id: str) -> None:
    both = f"{dead_address()},{live}"
    assert json.loads(ok(cli("get", plugin_id, "--registry", both, "-o", "json")))["plugin_id"]
    args = ["--name", "gone", "--address", "127.0.0.1:9", "--source", "gone"]
    other = ok(cli("register", "--registry", both, *args)).strip()
    assert ok(cli("deregister", other, "--registry", both)).strip() == f"deregistered {other}"


def test_watch_goes_past_a_dead_address(live: str, plugin_id: str) -> None:
    watch = subprocess.Popen(
        [*CLI, "watch", "--registry", f"{dead_address()},{live}", "-o", "json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    lines: queue.Queue[str] = queue.Queue()
    stdout = watch.stdout
    assert stdout is not None

    def read() -> None:
        for line in stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        snapshot = json.loads(lines.get(timeout=DEADLINE))
        assert snapshot["snapshot"] is True
        assert plugin_id in [p["plugin_id"] for p in snapshot["upserted"]]
    finally:
        watch.send_signal(signal.SIGTERM)
        status = watch.wait(DEADLINE)
        reader.join(DEADLINE)
        assert watch.stderr is not None
        stderr = watch.stderr.read()
        stdout.close()
        watch.stderr.close()
    assert status == 0, stderr


def test_every_address_dead_is_one_line() -> None:
    dead = [dead_address(), dead_address()]
    error = one_line_error(cli("list", "--registry", ",".join(dead), "--timeout", "1s"))
    assert "no replica answered" in error
    assert all(address in error for address in dead)
    error = one_line_error(cli("watch", "--registry", ",".join(dead), "--timeout", "1s"))
    assert "unavailable" in error.lower()


def test_no_address_is_one_line() -> None:
    assert "--registry" in one_line_error(cli("list", "--registry", " , "))


# -- status ------------------------------------------------------------------------------


def test_status_table_shows_the_one_sqlite_replica(live: str) -> None:
    header, columns, row, *rest = ok(cli("status", "--registry", live)).splitlines()
    assert rest == []
    words = header.split()
    assert words[:3] == ["leader", live, "epoch"]
    assert words[4] == "revision"
    assert int(words[5]) >= 0
    assert words[6] == "(sqlite)"
    assert columns.split() == ["ADDRESS", "ROLE", "EPOCH", "APPLIED", "LAG", "UP"]
    address, role, epoch, applied, lag, up = row.split()
    assert (address, role, up) == (live, "leader", "yes")
    assert epoch == words[3]
    assert int(applied) == int(words[5])
    assert lag == "0"


def test_status_json_is_the_registry_status_with_proto_field_names(
    live: str, plugin_id: str
) -> None:
    status = json.loads(ok(cli("status", "--registry", f"{dead_address()},{live}", "-o", "json")))
    assert status["backend"] == "sqlite"
    assert status["role"] == "REPLICA_ROLE_LEADER"
    assert status["leader"] == live
    assert int(status["revision"]) > 0  # the plugin registered
    [replica] = status["replicas"]
    assert replica["address"] == live
    assert replica["role"] == "REPLICA_ROLE_LEADER"
    assert int(replica["applied_revision"]) == int(status["revision"])
    assert replica["up"] is True


def test_status_of_an_unreachable_registry_is_one_line(tmp_path: Path) -> None:
    error = one_line_error(cli("status", "--registry", dead_address(), "--timeout", "1s"))
    assert "unavailable" in error.lower()
