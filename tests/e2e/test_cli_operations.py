"""The operator's command line of SPEC §9 (issue 12): each item as an operator meets it.

A real ``serve`` process (helpers.RegistryProcess) and every client command a process
of its own. The one exception is a scripted Watch server on 127.0.0.1:0, which breaks a
stream in the middle of a split revision: a real registry cannot be made to do that
on cue.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import (
    CLI,
    DEADLINE,
    Lines,
    RegistryProcess,
    cli,
    environment,
    ok,
    one_line_error,
)

import registry
from registry import render
from registry.wire import pb, pb_grpc

ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")
DEAD = "127.0.0.1:9"  # where the plugins registered here claim to be: nothing answers
RECONNECT = re.compile(
    r"polku-registry: watch: .+; reconnecting in \S+ to resume "
    r"(after revision (?P<since>\d+)|with a new snapshot)"
)


def wait_for(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll ``condition`` until it returns something true; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.05)  # a poll interval, not a synchronisation
    pytest.fail(f"no {what} within {timeout}s")


class Watch:
    """``polku-registry watch`` as a child process, stdout and stderr read line by line."""

    def __init__(self, *args: str, **env: str) -> None:
        self.popen = subprocess.Popen(
            [*CLI, "watch", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**environment(), **env},
        )
        assert self.popen.stdout is not None
        assert self.popen.stderr is not None
        self.stdout = Lines(self.popen.stdout)
        self.stderr = Lines(self.popen.stderr)

    def wait(self) -> int:
        """Its exit status, once it exits by itself (within the deadline)."""
        try:
            return self.popen.wait(DEADLINE)
        finally:
            self.close()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        return self.wait()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(DEADLINE)
        self.stdout.join()
        self.stderr.join()
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A registry process shared by the module; compound durations on its command line."""
    folder = tmp_path_factory.mktemp("registry")
    # Plugins registered here point nowhere: checked often, listed for the module.
    with RegistryProcess(
        f"sqlite:///{folder}/r.db", "--deregister-after", "1h2m", "--health-interval", "0.5"
    ) as process:
        yield process.start()
        assert "Traceback" not in process.output


@pytest.fixture
def uid() -> str:
    """A suffix that keeps each test's names, sources and labels apart."""
    return uuid.uuid4().hex[:8]


def register(address: str, name: str, *args: str) -> str:
    result = cli("register", "--registry", address, "--name", name, "--address", DEAD, *args)
    plugin_id = ok(result).strip()
    assert ULID.fullmatch(plugin_id), plugin_id
    return plugin_id


def listing(address: str, *args: str, **env: str) -> list[dict[str, Any]]:
    plugins = json.loads(ok(cli("list", "--registry", address, "-o", "json", *args, **env)))
    assert isinstance(plugins, list)
    return plugins


def ids(plugins: list[dict[str, Any]]) -> set[str]:
    return {p["plugin_id"] for p in plugins}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- --version and help -------------------------------------------------------------------


def test_version_prints_the_package_version() -> None:
    assert ok(cli("--version")) == f"polku-registry {registry.__version__}\n"


def test_help_lists_the_commands_and_help_command_shows_its_options() -> None:
    overview = ok(cli("help"))
    assert overview.startswith("usage: polku-registry")
    for command in ("serve", "list", "watch", "drain", "undrain", "proto", "help"):
        assert re.search(rf"^\s+{command}\b", overview, re.MULTILINE), command
    page = ok(cli("help", "list"))
    assert page.startswith("usage: polku-registry list")
    assert "-l SELECTOR, --selector SELECTOR" in page
    assert page == ok(cli("list", "--help"))


def test_help_of_an_unknown_command_is_a_usage_error() -> None:
    result = cli("help", "frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr.splitlines()[-1]


# -- -o wide ------------------------------------------------------------------------------


def test_wide_shows_version_labels_and_the_whole_last_error(address: str, uid: str) -> None:
    name = f"wide-{uid}"
    plugin_id = register(
        address, name, "--source", name, "--version", "2.3.4",
        "--label", "team=infra", "--label", "zone=a",
    )  # fmt: skip
    # The health checker fails to reach it and says why.
    error = wait_for(
        lambda: json.loads(ok(cli("get", plugin_id, "--registry", address, "-o", "json")))[
            "last_error"
        ],
        "last_error from a failed health check",
    )
    assert len(" ".join(error.split())) > render.ERROR_WIDTH  # the narrow table cuts it

    table = ok(cli("list", "--registry", address, "--name", name)).splitlines()
    assert table[0].split()[-2:] == ["LAST", "ERROR"]
    assert "VERSION" not in table[0]
    [row] = [line for line in table if line.startswith(plugin_id)]
    cut = row[table[0].index("LAST ERROR") :]
    assert len(cut) == render.ERROR_WIDTH
    assert cut.endswith("…")

    wide = ok(cli("list", "--registry", address, "--name", name, "-o", "wide")).splitlines()
    assert wide[0].split() == [
        "PLUGIN", "ID", "NAME", "VERSION", "TYPE", "ADDRESS", "ROUTES", "STATUS",
        "LAST", "CHECK", "LABELS", "LAST", "ERROR",
    ]  # fmt: skip
    [row] = [line for line in wide if line.startswith(plugin_id)]
    assert row.split()[1:3] == [name, "2.3.4"]
    assert row[wide[0].index("LABELS") :].startswith("team=infra,zone=a ")
    whole = row[wide[0].index("LAST ERROR") :]
    assert len(whole) > render.ERROR_WIDTH
    assert not whole.endswith("…")

    got = ok(cli("get", plugin_id, "--registry", address, "-o", "wide")).splitlines()
    # The same columns (widths follow the values: the status may have moved meanwhile).
    assert got[0].split() == wide[0].split()
    assert got[1].startswith(plugin_id)
    assert " team=infra,zone=a " in got[1]


# -- durations and --timeout --------------------------------------------------------------


@pytest.mark.parametrize("timeout", ["1m30s", "2s500ms", "250ms", "0.25", "10", "5m"])
def test_a_compound_or_plain_timeout_is_accepted(address: str, timeout: str) -> None:
    assert isinstance(listing(address, "--timeout", timeout), list)


@pytest.mark.parametrize("command", [["list"], ["get", "01HZZZZZZZZZZZZZZZZZZZZZZZ"], ["watch"]])
def test_a_zero_timeout_is_refused_in_one_line(address: str, command: list[str]) -> None:
    error = one_line_error(cli(*command, "--registry", address, "--timeout", "0"), status=2)
    assert "--timeout must be more than 0" in error
    from_env = cli(*command, "--registry", address, POLKU_REGISTRY_TIMEOUT="0ms")
    assert "--timeout must be more than 0" in one_line_error(from_env, status=2)


def test_a_reversed_compound_duration_is_a_usage_error(address: str) -> None:
    result = cli("list", "--registry", address, "--timeout", "30s1m")
    assert result.returncode == 2
    assert "'30s1m' is not a duration" in result.stderr.splitlines()[-1]


# -- the environment: filters read none, connection settings and serve still do -----------


def test_filter_flags_read_no_environment_variable(address: str, uid: str) -> None:
    plugin_id = register(address, f"env-{uid}", "--source", f"env-{uid}", "--label", "k=v")
    everything = {
        "POLKU_REGISTRY_NAME": "foo",
        "POLKU_REGISTRY_SOURCE": "foo",
        "POLKU_REGISTRY_TYPE": "emitter",
        "POLKU_REGISTRY_STATUS": "expired",
        "POLKU_REGISTRY_SELECTOR": "nosuchlabel",
    }
    for variable, value in everything.items():
        assert plugin_id in ids(listing(address, **{variable: value})), variable
    assert plugin_id in ids(listing(address, **everything))
    # Not even a malformed one is read.
    assert plugin_id in ids(listing(address, POLKU_REGISTRY_STATUS="sick"))
    # The help says so: the filters show no variable, the connection settings do.
    page = ok(cli("help", "list"))
    assert "POLKU_REGISTRY_NAME" not in page
    assert "POLKU_REGISTRY_SOURCE" not in page
    assert "POLKU_REGISTRY_TIMEOUT" in page


def test_watch_filters_read_no_environment_variable(address: str, uid: str) -> None:
    plugin_id = register(address, f"wenv-{uid}", "--source", f"wenv-{uid}")
    env = {"POLKU_REGISTRY_SOURCE": "foo", "POLKU_REGISTRY_SELECTOR": "nosuchlabel"}
    with Watch("--registry", address, "-o", "json", **env) as watch:
        snapshot = json.loads(watch.stdout.expect(lambda line: True, "the snapshot"))
        assert watch.stop() == 0
    assert snapshot["snapshot"] is True
    assert plugin_id in {p["plugin_id"] for p in snapshot["upserted"]}


def test_connection_settings_still_read_their_variables(address: str) -> None:
    assert isinstance(json.loads(ok(cli("list", "-o", "json", POLKU_REGISTRY=address))), list)
    result = cli("list", "--registry", address, POLKU_REGISTRY_TIMEOUT="banana")
    assert "POLKU_REGISTRY_TIMEOUT='banana'" in one_line_error(result)
    result = cli("list", "--registry", address, POLKU_REGISTRY_TLS_KEY="/nonexistent/key.pem")
    assert "a certificate and its key go together" in one_line_error(result)
    # Refused before any channel is made; a name under .invalid never resolves anyway.
    result = cli("list", "--registry", "registry.invalid:1", POLKU_REGISTRY_TOKEN="secret")
    assert "refusing to send a token in clear" in one_line_error(result)


def test_serve_flags_still_read_their_variables(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/r.db"
    result = cli("serve", "--listen", "127.0.0.1:0", "--db", db, POLKU_REGISTRY_LOG_FORMAT="yaml")
    assert "POLKU_REGISTRY_LOG_FORMAT='yaml'" in one_line_error(result)
    result = cli("serve", "--listen", "127.0.0.1:0", "--db", db, POLKU_REGISTRY_LEASE_TTL="2h")
    assert "lease_ttl" in one_line_error(result)


# -- -l / --selector ----------------------------------------------------------------------


def test_list_by_label_selector(address: str, uid: str) -> None:
    team = f"t{uid}"
    stable = register(address, f"sa-{uid}", "--source", f"sa-{uid}", "--label", f"team={team}")
    canary = register(
        address, f"sb-{uid}", "--source", f"sb-{uid}",
        "--label", f"team={team}", "--label", "canary=yes",
    )  # fmt: skip
    other = register(address, f"sc-{uid}", "--source", f"sc-{uid}", "--label", "team=other")
    assert ids(listing(address, "-l", f"team={team}")) == {stable, canary}
    # Repeated -l: each must hold; the same as one comma-separated selector.
    assert ids(listing(address, "-l", f"team={team}", "-l", "!canary")) == {stable}
    assert ids(listing(address, "--selector", f"team={team},!canary")) == {stable}
    assert ids(listing(address, "-l", f"team={team}", "-l", "canary")) == {canary}
    assert other not in ids(listing(address, "-l", "team!=other"))
    table = ok(cli("list", "--registry", address, "-l", f"team={team},canary=yes"))
    assert canary in table
    assert stable not in table


def test_a_bad_selector_is_one_line_naming_the_field(address: str) -> None:
    error = one_line_error(cli("list", "--registry", address, "-l", "a,,b"))
    assert "label_selector" in error
    error = one_line_error(cli("watch", "--registry", address, "-l", "=x"))
    assert "label_selector" in error


def test_watch_by_label_selector(address: str, uid: str) -> None:
    wanted = register(address, f"wl-{uid}", "--source", f"wl-{uid}", "--label", f"w={uid}")
    register(address, f"wm-{uid}", "--source", f"wm-{uid}", "--label", "w=other")
    with Watch("--registry", address, "-o", "json", "-l", f"w={uid}") as watch:
        snapshot = json.loads(watch.stdout.expect(lambda line: True, "the snapshot"))
        assert snapshot["snapshot"] is True
        assert [p["plugin_id"] for p in snapshot["upserted"]] == [wanted]
        register(address, f"wn-{uid}", "--source", f"wn-{uid}", "--label", "w=other")
        later = register(address, f"wo-{uid}", "--source", f"wo-{uid}", "--label", f"w={uid}")
        watch.stdout.expect(lambda s: later in s, "the matching registration")
        assert watch.stop() == 0
    assert watch.stderr.lines == []
    # Only the matching plugins were shown (their health checks change them too).
    shown = {p["plugin_id"] for line in watch.stdout.lines for p in json.loads(line)["upserted"]}
    assert shown == {wanted, later}


# -- watch: reconnect, resume, --no-reconnect ---------------------------------------------


def upserts(lines: list[str], plugin_id: str) -> list[str]:
    return [line for line in lines if re.fullmatch(rf"revision \d+ upserted {plugin_id} .*", line)]


def test_watch_reconnects_and_resumes_by_revision(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/r.db"
    where = f"unix:{tmp_path}/r.sock"  # the same address after a restart
    first = RegistryProcess(db, "--listen", where)
    first.start()  # (its "serving on" line names no socket path: not read here)
    with Watch("--registry", where) as watch:
        try:
            watch.stdout.expect(lambda s: "snapshot" in s, "the snapshot")
            before = register(where, "before", "--source", "before")
            watch.stdout.expect(lambda s: before in s, "the registration before the restart")
        finally:
            assert first.stop() == 0
        line = watch.stderr.expect(RECONNECT.fullmatch, "a reconnect line")
        match = RECONNECT.fullmatch(line)
        assert match is not None
        assert match["since"] is not None  # it resumes, it does not start over
        with RegistryProcess(db, "--listen", where) as second:
            second.start()
            after = register(where, "after", "--source", "after")
            watch.stdout.expect(lambda s: after in s, "the registration after the restart")
            assert watch.stop() == 0
    out = watch.stdout.lines
    # Resumed after the revision it had: no second snapshot, nothing shown twice.
    assert [line for line in out if "snapshot" in line] == [out[0]]
    assert len(upserts(out, before)) == 1
    assert len(upserts(out, after)) == 1
    # One line per reconnect attempt, each of the same form, at least one.
    assert watch.stderr.lines
    assert all(RECONNECT.fullmatch(line) for line in watch.stderr.lines), watch.stderr.lines


@pytest.mark.parametrize("end", ["stop", "kill"])
def test_watch_no_reconnect_exits_1_when_the_stream_ends(tmp_path: Path, end: str) -> None:
    with RegistryProcess(f"sqlite:///{tmp_path}/r.db") as process:
        where = process.start()
        watch = Watch("--registry", where, "--no-reconnect")
        try:
            watch.stdout.expect(lambda s: "snapshot" in s, "the snapshot")
        except BaseException:
            watch.close()
            raise
        if end == "stop":  # a graceful stop closes the stream
            assert process.stop() == 0
        else:  # the registry vanishes: the stream breaks
            process.kill()
    status = watch.wait()
    assert status == 1
    [line] = watch.stderr.lines
    assert line.startswith("polku-registry: error: the watch stream ended (--no-reconnect): ")


# A scripted registry: Watch only. The first stream sends a snapshot and the first,
# full, message of a split revision, then breaks; the second must resume after the
# snapshot and gets the whole revision.
SNAPSHOT_REVISION = 5
SPLIT_REVISION = 6


def big_plugin(number: int) -> pb.RegisteredPlugin:
    return pb.RegisteredPlugin(
        plugin_id=f"01HBIG{number:020d}",
        info=pb.PluginInfo(
            name=f"big{number}", type=pb.PLUGIN_TYPE_INGESTOR, sources=["big"],
            description="x" * 60_000,
        ),
        address=DEAD,
        status=pb.PLUGIN_STATUS_HEALTHY,
        revision=SPLIT_REVISION,
    )  # fmt: skip


def split_revision() -> list[pb.WatchResponse]:
    """Revision 6 in two messages, the first as full as the registry would make one."""
    part = pb.WatchResponse(revision=SPLIT_REVISION)
    number = 0
    while True:
        candidate = pb.WatchResponse()
        candidate.CopyFrom(part)
        candidate.upserted.append(big_plugin(number))
        if candidate.ByteSize() > render.SPLIT_BUDGET:
            break
        part, number = candidate, number + 1
    # Full: one more plugin of the registry's largest size would not have fitted.
    assert part.ByteSize() + 64 * 1024 > render.SPLIT_BUDGET
    rest = pb.WatchResponse(revision=SPLIT_REVISION, upserted=[big_plugin(number)])
    return [part, rest]


class ScriptedRegistry(pb_grpc.PluginRegistryServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.requests: list[pb.WatchRequest] = []
        self.done = threading.Event()
        self.parts = split_revision()

    def Watch(self, request: pb.WatchRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self.requests.append(request)
        if len(self.requests) == 1:
            small = pb.RegisteredPlugin(plugin_id="01HSMALL", info=pb.PluginInfo(name="small"))
            yield pb.WatchResponse(revision=SNAPSHOT_REVISION, snapshot=True, upserted=[small])
            yield self.parts[0]
            context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        yield from self.parts
        self.done.wait(DEADLINE)


@pytest.fixture
def scripted() -> Iterator[tuple[ScriptedRegistry, str]]:
    servicer = ScriptedRegistry()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_send_message_length", 4 * 1024 * 1024)],
    )
    pb_grpc.add_PluginRegistryServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        servicer.done.set()
        server.stop(grace=None)


def test_watch_never_prints_half_a_revision_across_a_resume(
    scripted: tuple[ScriptedRegistry, str],
) -> None:
    servicer, where = scripted
    expected = {p.plugin_id for part in servicer.parts for p in part.upserted}
    with Watch("--registry", where) as watch:
        watch.stdout.expect(lambda s: "snapshot (1 plugin)" in s, "the snapshot")
        line = watch.stderr.expect(RECONNECT.fullmatch, "the reconnect line")
        match = RECONNECT.fullmatch(line)
        assert match is not None
        assert match["since"] == str(SNAPSHOT_REVISION)  # not the revision it saw half of
        last = max(expected)
        watch.stdout.expect(lambda s: last in s, "the end of the split revision")
        assert watch.stop() == 0
    assert [r.since_revision for r in servicer.requests] == [0, SNAPSHOT_REVISION]
    shown = [line.split()[3] for line in watch.stdout.lines if " upserted " in line]
    assert sorted(shown) == sorted(expected)  # each plugin of revision 6 once, none twice
    assert len(watch.stderr.lines) == 1


# -- drain / undrain ----------------------------------------------------------------------


def test_drain_and_undrain_by_id_and_by_name(address: str, uid: str) -> None:
    name = f"dr-{uid}"
    first = register(address, name, "--source", f"{name}-a")
    # Another instance of the same plugin: another address (the last --address wins).
    second = register(address, name, "--source", f"{name}-a", "--address", "127.0.0.1:10")
    assert ids(listing(address, "--name", name)) == {first, second}
    table = ok(cli("drain", first, "--registry", address)).splitlines()
    assert table[0].split()[:2] == ["PLUGIN", "ID"]
    [row] = table[1:]
    assert row.startswith(first)
    assert " draining " in f" {row} "
    by_status = {p["plugin_id"]: p["status"] for p in listing(address, "--name", name)}
    assert by_status[first] == "PLUGIN_STATUS_DRAINING"
    assert by_status[second] != "PLUGIN_STATUS_DRAINING"
    assert ids(listing(address, "--name", name, "--status", "draining")) == {first}

    drained = json.loads(ok(cli("drain", "--name", name, "--registry", address, "-o", "json")))
    assert {p["plugin_id"] for p in drained} == {first, second}
    assert {p["status"] for p in drained} == {"PLUGIN_STATUS_DRAINING"}

    back = json.loads(ok(cli("undrain", "--name", name, "--registry", address, "-o", "json")))
    assert {p["plugin_id"] for p in back} == {first, second}
    assert "PLUGIN_STATUS_DRAINING" not in {p["status"] for p in back}
    assert not ids(listing(address, "--name", name, "--status", "draining"))


def test_drain_needs_exactly_one_target(address: str) -> None:
    neither = cli("drain", "--registry", address)
    assert neither.returncode == 2
    assert "one of the arguments PLUGIN_ID --name is required" in neither.stderr
    both = cli("undrain", "01HZZZZZZZZZZZZZZZZZZZZZZZ", "--name", "x", "--registry", address)
    assert both.returncode == 2
    assert "not allowed with" in both.stderr


def test_drain_of_an_unknown_id_is_one_line(address: str) -> None:
    unknown = "01HZZZZZZZZZZZZZZZZZZZZZZZ"
    assert unknown in one_line_error(cli("drain", unknown, "--registry", address))


# -- serve: --metrics-listen, --log-format ------------------------------------------------


def test_serve_metrics_listen_serves_prometheus_text(tmp_path: Path) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    with RegistryProcess(f"sqlite:///{tmp_path}/r.db", "--metrics-listen", metrics) as process:
        process.start()

        def scrape() -> str:
            try:
                with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
                    body: str = response.read().decode()
                    return body
            except OSError:
                return ""

        body = wait_for(scrape, "an answer on /metrics")
        assert "# TYPE " in body
        assert "polku" in body


def test_serve_log_format_json(tmp_path: Path) -> None:
    with RegistryProcess(f"sqlite:///{tmp_path}/r.db", "--log-format", "json") as process:
        where = process.start()
        register(where, "logged", "--source", "logged")
        wait_for(lambda: "logged" in process.output, "the registration's log line")
        output = process.output
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert records
    assert any("serving on" in r["message"] for r in records)
    assert {"time", "level", "logger", "message"} <= set(records[0])


# -- proto --out --------------------------------------------------------------------------


def test_proto_writes_the_shipped_files(tmp_path: Path) -> None:
    out = tmp_path / "protos"
    printed = [Path(line) for line in ok(cli("proto", "--out", str(out))).splitlines()]
    assert out / "polku" / "v1" / "plugin.proto" in printed
    for path in printed:
        assert path.is_file()
        assert path.suffix == ".proto"
        assert out in path.parents
    assert "service PluginRegistry" in (out / "polku" / "v1" / "plugin.proto").read_text()


def test_proto_needs_out_and_a_writable_folder(tmp_path: Path) -> None:
    result = cli("proto")
    assert result.returncode == 2
    assert "--out is required" in result.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line_error(cli("proto", "--out", str(blocker)))
