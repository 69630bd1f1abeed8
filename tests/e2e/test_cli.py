"""The ``polku-registry`` command line as an operator runs it: a real registry process,
and each command a process of its own (usage errors, which never connect, run in-process)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import CLI, DEADLINE, Lines, cli, environment, ok, one_line_error

from registry.cli import commands as cli_commands
from registry.cli import main

ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1
DEAD = "127.0.0.1:9"  # where the plugins registered here claim to be: nothing answers


class Process:
    """A long-running CLI command (serve, watch) with its output read line by line."""

    def __init__(self, *args: str, **env: str) -> None:
        self.popen = subprocess.Popen(
            [*CLI, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment(**env),
        )
        stdout, stderr = self.popen.stdout, self.popen.stderr
        assert stdout is not None
        assert stderr is not None
        self.stdout = Lines(stdout)
        self.stderr = Lines(stderr)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` and return the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(DEADLINE)
        finally:
            self.close()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(DEADLINE)
        self.stdout.join()
        self.stderr.join()
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


def start_registry(folder: Path, *args: str) -> tuple[Process, str]:
    """``serve`` on a free port over an SQLite file in ``folder``, and its address."""
    process = Process("serve", "--listen", "127.0.0.1:0", "--db", f"sqlite:///{folder}/r.db", *args)
    try:
        line = process.stderr.expect(lambda s: "serving on" in s, "'serving on' log line")
    except BaseException:
        process.close()
        raise
    match = re.search(r"serving on (\S+)", line)
    assert match is not None
    return process, match.group(1)


@pytest.fixture(scope="module")
def registry_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a registry process shared by this module; it must stop cleanly."""
    # Plugins registered here point nowhere: keep the failing ones listed for the module.
    process, address = start_registry(
        tmp_path_factory.mktemp("registry"), "--deregister-after", "1h"
    )
    try:
        yield address
    finally:
        assert process.stop(signal.SIGTERM) == 0, process.stderr.lines
        assert not any("Traceback" in line for line in process.stderr.lines)


@pytest.fixture
def uid() -> str:
    """A suffix that keeps each test's names and sources apart on the shared registry."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def no_polku_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that run main() in this process: no POLKU_REGISTRY* from outside."""
    for name in list(os.environ):
        if name.startswith("POLKU_REGISTRY"):
            monkeypatch.delenv(name)


def register(address: str, *args: str) -> str:
    plugin_id = ok(cli("register", "--registry", address, *args)).strip()
    assert ULID.fullmatch(plugin_id), plugin_id
    return plugin_id


def register_ingestor(address: str, name: str) -> str:
    """An operator registers ingestor ``name`` for source ``name`` at a dead address."""
    return register(address, "--name", name, "--address", DEAD, "--source", name)


def listing(address: str, *args: str) -> list[dict[str, Any]]:
    plugins = json.loads(ok(cli("list", "--registry", address, "-o", "json", *args)))
    assert isinstance(plugins, list)
    return plugins


def ids(plugins: list[dict[str, Any]]) -> set[Any]:
    return {p["plugin_id"] for p in plugins}


# -- register, list, get, deregister -------------------------------------------------------


def test_register_an_ingestor_and_see_it_in_the_table(registry_address: str, uid: str) -> None:
    plugin_id = register(
        registry_address, "--name", f"k8s-{uid}", "--address", DEAD,
        "--source", f"k8s-{uid}", "--source", f"docker-{uid}",
    )  # fmt: skip
    table = ok(cli("list", "--registry", registry_address)).splitlines()
    assert table[0].split() == [
        "PLUGIN", "ID", "NAME", "TYPE", "ADDRESS", "ROUTES", "STATUS", "LAST", "CHECK",
        "LAST", "ERROR",
    ]  # fmt: skip
    [row] = [line for line in table if line.startswith(plugin_id)]
    cells = row.split()
    assert cells[1:5] == [f"k8s-{uid}", "ingestor", DEAD, f"k8s-{uid},docker-{uid}"]
    assert cells[5] in ("unknown", "unhealthy")


def test_register_an_emitter_by_emitter_name(registry_address: str, uid: str) -> None:
    plugin_id = register(
        registry_address, "--name", f"sink-{uid}", "--address", DEAD,
        "--emitter-name", f"kafka-{uid}", "--version", "1.2.3", "--label", "team=infra",
    )  # fmt: skip
    plugin = json.loads(ok(cli("get", plugin_id, "--registry", registry_address, "-o", "json")))
    assert plugin["plugin_id"] == plugin_id
    assert plugin["info"]["type"] == "PLUGIN_TYPE_EMITTER"
    assert plugin["info"]["emitter_name"] == f"kafka-{uid}"
    assert plugin["info"]["version"] == "1.2.3"
    assert plugin["labels"] == {"team": "infra"}
    assert plugin["lease_ttl_seconds"] == 0  # an operator's registration holds no lease


def test_list_json_is_an_array_of_plugins_with_proto_field_names(
    registry_address: str, uid: str
) -> None:
    plugin_id = register_ingestor(registry_address, f"js-{uid}")
    [plugin] = [p for p in listing(registry_address) if p["plugin_id"] == plugin_id]
    assert {"plugin_id", "info", "address", "status", "registered_at", "revision"} <= set(plugin)
    assert str(plugin["status"]).startswith("PLUGIN_STATUS_")
    assert plugin["info"] == {
        "name": f"js-{uid}",
        "version": "",
        "type": "PLUGIN_TYPE_INGESTOR",
        "description": "",
        "sources": [f"js-{uid}"],
        "emitter_name": "",
        "capabilities": [],
    }


def test_list_filters(registry_address: str, uid: str) -> None:
    ingestor = register_ingestor(registry_address, f"in-{uid}")
    emitter = register(
        registry_address, "--name", f"out-{uid}", "--address", DEAD, "--emitter-name", uid
    )
    assert ids(listing(registry_address, "--source", f"in-{uid}")) == {ingestor}
    assert ids(listing(registry_address, "--name", f"out-{uid}")) == {emitter}

    emitters = listing(registry_address, "--type", "emitter")
    assert emitter in ids(emitters)
    assert ingestor not in ids(emitters)
    assert {p["info"]["type"] for p in emitters} == {"PLUGIN_TYPE_EMITTER"}
    ingestors = listing(registry_address, "--type", "ingestor")
    assert ingestor in ids(ingestors)
    assert emitter not in ids(ingestors)

    # Health checks may move them from unknown to unhealthy, never to expired: they hold
    # no lease.
    statuses = ["--status", "unknown", "--status", "healthy", "--status", "unhealthy"]
    alive = listing(registry_address, *statuses)
    assert {ingestor, emitter} <= ids(alive)
    assert {p["status"] for p in alive} <= {
        "PLUGIN_STATUS_UNKNOWN",
        "PLUGIN_STATUS_HEALTHY",
        "PLUGIN_STATUS_UNHEALTHY",
    }
    expired = listing(registry_address, "--status", "expired")
    assert not {ingestor, emitter} & ids(expired)
    assert {p["status"] for p in expired} <= {"PLUGIN_STATUS_EXPIRED"}


def test_get_shows_one_plugin(registry_address: str, uid: str) -> None:
    plugin_id = register_ingestor(registry_address, f"get-{uid}")
    detail = ok(cli("get", plugin_id, "--registry", registry_address)).splitlines()
    assert f"plugin id:      {plugin_id}" in detail
    assert f"sources:        get-{uid}" in detail
    assert "lease:          none (registered by an operator)" in detail


def test_deregister_then_get_is_not_found(registry_address: str, uid: str) -> None:
    plugin_id = register_ingestor(registry_address, f"gone-{uid}")
    out = ok(cli("deregister", plugin_id, "--registry", registry_address))
    assert out == f"deregistered {plugin_id}\n"
    error = one_line_error(cli("get", plugin_id, "--registry", registry_address))
    assert f"no plugin '{plugin_id}'" in error
    # A second deregister names the id it does not know rather than pretending.
    assert plugin_id in one_line_error(cli("deregister", plugin_id, "--registry", registry_address))


def test_unknown_id(registry_address: str) -> None:
    unknown = "01HZZZZZZZZZZZZZZZZZZZZZZZ"
    error = one_line_error(cli("get", unknown, "--registry", registry_address))
    assert f"no plugin '{unknown}' is registered" in error


def test_a_source_owned_by_another_name_is_refused(registry_address: str, uid: str) -> None:
    register(registry_address, "--name", f"owner-{uid}", "--address", DEAD, "--source", uid)
    result = cli(
        "register", "--registry", registry_address,
        "--name", f"thief-{uid}", "--address", DEAD, "--source", uid,
    )  # fmt: skip
    error = one_line_error(result)
    assert f"owner-{uid}" in error
    assert uid in error
    assert ids(listing(registry_address, "--name", f"thief-{uid}")) == set()


def test_an_invalid_address_is_refused_naming_the_field(registry_address: str, uid: str) -> None:
    result = cli(
        "register", "--registry", registry_address,
        "--name", f"bad-{uid}", "--address", "no such address", "--source", uid,
    )  # fmt: skip
    assert one_line_error(result).startswith("polku-registry: error: address: ")


def test_an_unreachable_registry_is_one_line() -> None:
    error = one_line_error(cli("list", "--registry", UNREACHABLE, "--timeout", "2s"))
    assert "unavailable" in error.lower()
    assert UNREACHABLE in error


# -- usage errors and the environment -------------------------------------------------------


def test_a_bad_flag_value_is_a_usage_error() -> None:
    result = cli("list", "--registry", UNREACHABLE, "--timeout", "banana")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: polku-registry list")
    assert "argument --timeout: 'banana' is not a duration: use seconds" in result.stderr
    assert "Traceback" not in result.stderr


# The parser fails before any connection is made, so these run main() in this process.
@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["list", "--type", "plugin"], "invalid choice: 'plugin'"),
        (["list", "--status", "sick"], "invalid choice: 'sick'"),
        (["list", "-o", "yaml"], "invalid choice: 'yaml'"),
        (["get"], "PLUGIN_ID"),
        (["register", "--name", "n", "--address", "h:1"], "one of --source, --emitter-name"),
        (["register", "--name", "n", "--source", "s"], "--address is required"),
        (["register", "--name", "n", "--address", "h:1", "--source", "s", "--emitter-name", "e"],
         "not allowed with"),
        (["register", "--name", "n", "--address", "h:1", "--source", "s", "--label", "k"],
         "'k' is not key=value"),
        (["serve", "--lease-ttl", "100ms"], "at least 1s"),
        (["serve", "--health-interval=-1s"], "'-1s' is not a duration"),
        (["serve", "--unhealthy-threshold", "0"], "must be at least 1"),
        (["serve", "--log-level", "loud"], "invalid choice: 'loud'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)  # fmt: skip
@pytest.mark.usefixtures("no_polku_environment")
def test_usage_errors_exit_2(
    args: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("usage: polku-registry")
    assert complaint in stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("POLKU_REGISTRY_TIMEOUT", "banana"),
        ("POLKU_REGISTRY_OUTPUT", "yaml"),
    ],
)
@pytest.mark.usefixtures("no_polku_environment")
def test_a_malformed_environment_variable_is_one_line(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(variable, value)
    assert main(["list", "--registry", UNREACHABLE]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"polku-registry: error: {variable}={value!r}: ")


@pytest.mark.usefixtures("no_polku_environment")
def test_both_rivals_from_the_environment_is_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POLKU_REGISTRY_SOURCE", "s")
    monkeypatch.setenv("POLKU_REGISTRY_EMITTER_NAME", "e")
    assert main(["register", "--registry", UNREACHABLE, "--name", "n", "--address", "h:1"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert "POLKU_REGISTRY_SOURCE and POLKU_REGISTRY_EMITTER_NAME" in line


@pytest.mark.usefixtures("no_polku_environment")
def test_an_interrupt_exits_130_quietly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def interrupted(args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_commands, "list_plugins", interrupted)
    assert main(["list", "--registry", UNREACHABLE]) == 130
    assert capsys.readouterr() == ("", "")


def test_the_registry_address_comes_from_POLKU_REGISTRY(registry_address: str, uid: str) -> None:
    plugin_id = register_ingestor(registry_address, f"env-{uid}")
    assert plugin_id in ok(cli("list", POLKU_REGISTRY=registry_address))
    assert "unavailable" in one_line_error(cli("list", POLKU_REGISTRY=UNREACHABLE)).lower()
    # The flag beats the environment.
    assert plugin_id in ok(cli("list", "--registry", registry_address, POLKU_REGISTRY=UNREACHABLE))


def test_every_option_reads_its_environment_variable(registry_address: str, uid: str) -> None:
    plugin_id = register_ingestor(registry_address, f"opt-{uid}")
    # Connection settings and the output format read theirs; filters read none (SPEC §9).
    out = ok(
        cli(
            "list",
            "--source",
            f"opt-{uid}",
            POLKU_REGISTRY=registry_address,
            POLKU_REGISTRY_OUTPUT="json",
        )
    )
    assert ids(json.loads(out)) == {plugin_id}
    # The command line beats the environment, which beats the default (table).
    table = cli(
        "list", "-o", "table", POLKU_REGISTRY=registry_address, POLKU_REGISTRY_OUTPUT="json"
    )
    assert ok(table).startswith("PLUGIN ID")


def test_a_registration_can_come_from_the_environment(registry_address: str, uid: str) -> None:
    result = cli(
        "register",
        "--emitter-name", f"e-{uid}",  # beats POLKU_REGISTRY_SOURCE, its rival
        POLKU_REGISTRY=registry_address,
        POLKU_REGISTRY_NAME=f"fromenv-{uid}",
        POLKU_REGISTRY_ADDRESS=DEAD,
        POLKU_REGISTRY_SOURCE="ignored",
        POLKU_REGISTRY_LABEL="a=1,b=2",
    )  # fmt: skip
    [plugin] = listing(registry_address, "--name", f"fromenv-{uid}")
    assert plugin["plugin_id"] == ok(result).strip()
    assert plugin["info"]["type"] == "PLUGIN_TYPE_EMITTER"
    assert plugin["info"]["sources"] == []
    assert plugin["labels"] == {"a": "1", "b": "2"}


def test_a_flag_overrides_a_malformed_variable(registry_address: str) -> None:
    result = cli("list", "--registry", registry_address, "--timeout", "5s",
                 POLKU_REGISTRY_TIMEOUT="banana")  # fmt: skip
    # A table, or its empty form when this test runs alone; not the variable's error.
    out = ok(result)
    assert out.startswith("PLUGIN ID") or out == "No plugins registered.\n"


# -- migrate and serve ------------------------------------------------------------------------


def test_migrate_creates_the_schema(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "x.db"
    db.parent.mkdir()  # --db never creates folders (SPEC §7)
    for _ in range(2):  # and again: already at head
        out = ok(cli("migrate", "--db", f"sqlite:///{db}"))
        assert out.count("\n") == 1
        assert "revision head" in out
    conn = sqlite3.connect(db)
    try:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert {"plugins", "alembic_version"} <= tables


def test_migrate_reads_POLKU_REGISTRY_DB(tmp_path: Path) -> None:
    ok(cli("migrate", POLKU_REGISTRY_DB=f"sqlite:///{tmp_path}/env.db"))
    assert (tmp_path / "env.db").exists()


@pytest.mark.parametrize("url", ["banana", "nosuch://host/db"])
def test_serve_with_a_bad_database_url_is_one_line(url: str) -> None:
    error = one_line_error(cli("serve", "--listen", "127.0.0.1:0", "--db", url))
    assert error.startswith("polku-registry: error: --db: ")


def test_serve_with_an_out_of_range_setting_is_one_line(tmp_path: Path) -> None:
    result = cli("serve", "--lease-ttl", "2h", "--db", f"sqlite:///{tmp_path}/r.db")
    assert "lease_ttl" in one_line_error(result)


def test_serve_on_a_port_in_use_fails_cleanly(registry_address: str, tmp_path: Path) -> None:
    result = cli("serve", "--listen", registry_address, "--db", f"sqlite:///{tmp_path}/r.db")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    # Above it: the migration's log lines, and gRPC's own complaint about the bind.
    errors = [line for line in result.stderr.splitlines() if line.startswith("polku-registry:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"polku-registry: error: cannot listen on {registry_address}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_gracefully_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    process, address = start_registry(tmp_path)
    plugin_id = register_ingestor(address, "p")
    assert process.stop(sig) == 0
    assert not any("Traceback" in line for line in process.stderr.lines)
    # What it acknowledged is there after a restart.
    process, address = start_registry(tmp_path)
    try:
        assert plugin_id in ids(listing(address))
    finally:
        assert process.stop() == 0


# -- watch ------------------------------------------------------------------------------------


def start_watch(address: str, *args: str) -> tuple[Process, str]:
    """``watch`` and the first line it printed; skipped while the server lacks Watch."""
    watch = Process("watch", "--registry", address, *args)
    try:
        return watch, watch.stdout.expect(lambda line: True, "the snapshot")
    except pytest.fail.Exception:
        status = watch.stop()
        if any("UNIMPLEMENTED" in line for line in watch.stderr.lines):
            pytest.skip("the registry does not implement Watch yet")
        pytest.fail(f"watch exited with {status}: {watch.stderr.lines}")


def test_watch_json_prints_the_snapshot_then_each_change(registry_address: str, uid: str) -> None:
    watch, first = start_watch(registry_address, "-o", "json", "--source", f"w-{uid}")
    try:
        snapshot = json.loads(first)
        assert snapshot["snapshot"] is True
        assert snapshot["upserted"] == []  # nothing declares this source yet
        plugin_id = register_ingestor(registry_address, f"w-{uid}")
        added = watch.stdout.expect(lambda line: plugin_id in line, "the registration")
        [plugin] = json.loads(added)["upserted"]
        assert plugin["plugin_id"] == plugin_id
        assert plugin["info"]["sources"] == [f"w-{uid}"]
        ok(cli("deregister", plugin_id, "--registry", registry_address))
        removed = watch.stdout.expect(
            lambda line: plugin_id in json.loads(line)["removed_plugin_ids"], "the removal"
        )
        assert int(json.loads(removed)["revision"]) > int(snapshot["revision"])
    finally:
        status = watch.stop(signal.SIGTERM)
    assert status == 0, watch.stderr.lines
    assert watch.stderr.lines == []


def test_watch_prints_a_line_per_change_until_interrupted(registry_address: str, uid: str) -> None:
    watch, first = start_watch(registry_address, "--source", f"h-{uid}")
    try:
        assert re.fullmatch(r"revision \d+ snapshot \(0 plugins\)", first)
        plugin_id = register_ingestor(registry_address, f"h-{uid}")
        line = watch.stdout.expect(lambda s: plugin_id in s, "the registration")
        assert re.fullmatch(
            rf"revision \d+ upserted {plugin_id} h-{uid} ingestor {re.escape(DEAD)} "
            rf"routes=h-{uid} status=\w+",
            line,
        )
    finally:
        status = watch.stop(signal.SIGINT)
    assert status == 0, watch.stderr.lines
    assert watch.stderr.lines == []


def test_watch_an_unreachable_registry_is_one_line() -> None:
    error = one_line_error(cli("watch", "--registry", UNREACHABLE, "--timeout", "2s"))
    assert "unavailable" in error.lower()
