"""The registry's logs (SPEC §9 "Logs"): the two formats, quiet dependencies, and one
line per plugin registered, removed or changing status, over a real SQLite state."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import warnings
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from registry.logs import DEPENDENCIES, configure_logging
from registry.migrate import upgrade
from registry.model import Change, PluginStatus, PluginType, Registration
from registry.reaper import LeaseReaper
from registry.state import RegistryState
from registry.storage.store import SqlStore
from registry.transitions import TransitionLog

T0 = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) (\S+): (.*)$")


# -- configure_logging ---------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger, the dependencies' levels and warnings back as they were."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in DEPENDENCIES}
    try:
        yield
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)
        logging.captureWarnings(False)


def configured(level: str, fmt: str) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, fmt, stream=stream)  # type: ignore[arg-type]
    return stream


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_parse_and_carry_time_level_logger_message_and_extras():
    stream = configured("info", "json")
    log = logging.getLogger("registry.test_logs")
    log.info("plugin %s registered", "lines", extra={"plugin_id": "01ABC", "revision": 7})
    log.debug("not at info")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it failed")

    first, second = json_lines(stream)
    assert first["level"] == "INFO"
    assert first["logger"] == "registry.test_logs"
    assert first["message"] == "plugin lines registered"
    assert first["plugin_id"] == "01ABC"
    assert first["revision"] == 7
    stamp = first["time"]
    assert isinstance(stamp, str)
    assert stamp.endswith("Z")
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert when.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - when) < timedelta(hours=1)
    # Nothing of the record's own bookkeeping leaks in as a field.
    assert not {"args", "msg", "levelno", "pathname", "lineno"} & set(first)

    assert second["level"] == "ERROR"
    assert isinstance(second["exception"], str)
    assert "ValueError: boom" in second["exception"]


@pytest.mark.usefixtures("restore_logging")
def test_an_extra_json_cannot_hold_is_shown_not_lost():
    stream = configured("info", "json")
    logging.getLogger("registry.test_logs").info("odd", extra={"path": Path("/x/y")})
    (line,) = json_lines(stream)
    assert line["path"] == "/x/y"


@pytest.mark.usefixtures("restore_logging")
def test_text_lines_keep_the_current_format():
    stream = configured("warning", "text")
    logging.getLogger("registry.test_logs").info("below the level")
    logging.getLogger("registry.test_logs").warning("disk %s", "full")
    (line,) = stream.getvalue().splitlines()
    match = TEXT_LINE.match(line)
    assert match is not None, line
    assert match.groups() == ("WARNING", "registry.test_logs", "disk full")


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    "logger",
    [
        "aiosqlite",
        "alembic.runtime.plugins",
        "asyncio",
        "asyncpg",
        "grpc._cython.cygrpc",
        "sqlalchemy.engine.Engine",
    ],
)
def test_dependency_loggers_stay_quiet_at_debug(logger):
    stream = configured("debug", "json")
    logging.getLogger(logger).debug("chatter")
    logging.getLogger(logger).info("setup plugin alembic.autogenerate.schemas")
    logging.getLogger(logger).warning("worth seeing")
    logging.getLogger("registry.server").debug("ours")
    lines = [(line["logger"], line["message"]) for line in json_lines(stream)]
    assert lines == [(logger, "worth seeing"), ("registry.server", "ours")]


@pytest.mark.usefixtures("restore_logging")
def test_a_stricter_level_holds_for_dependencies_too():
    stream = configured("error", "text")
    logging.getLogger("aiosqlite").warning("below error")
    logging.getLogger("aiosqlite").error("at error")
    assert stream.getvalue().count("\n") == 1
    assert "at error" in stream.getvalue()


@pytest.mark.usefixtures("restore_logging")
def test_configuring_twice_installs_one_handler():
    configured("info", "text")
    stream = configured("info", "json")
    root = logging.getLogger()
    ours = [h for h in root.handlers if type(h).__module__ == "registry.logs"]
    assert len(ours) == 1
    logging.getLogger("registry.test_logs").info("once")
    assert [line["message"] for line in json_lines(stream)] == ["once"]


@pytest.mark.usefixtures("restore_logging")
def test_python_warnings_become_json_lines():
    stream = configured("info", "json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("an old option", DeprecationWarning, stacklevel=1)
    (line,) = json_lines(stream)
    assert line["logger"] == "py.warnings"
    assert "an old option" in str(line["message"])


@pytest.mark.parametrize(("level", "fmt"), [("loud", "text"), ("info", "xml")])
def test_an_unknown_level_or_format_is_refused(level, fmt):
    handlers = list(logging.getLogger().handlers)
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(level, fmt)
    assert logging.getLogger().handlers == handlers  # nothing half-configured


# -- one line per transition ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    store = SqlStore.open(f"sqlite:///{tmp_path / 'registry.db'}")
    await upgrade(store.engine)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def state(store: SqlStore, clock: Clock) -> AsyncIterator[RegistryState]:
    registry = RegistryState(store, clock=clock)
    await registry.start()
    TransitionLog(registry, deregister_after=300).subscribe()
    try:
        yield registry
    finally:
        await registry.stop()


def ingestor(name: str, address: str = "127.0.0.1:9", ttl: int = 0) -> Registration:
    return Registration(
        name=name,
        type=PluginType.INGESTOR,
        address=address,
        sources=(name,),
        lease_ttl_seconds=ttl,
    )


def transitions(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "registry.transitions"]


def fields(record: logging.LogRecord) -> tuple[object, ...]:
    return tuple(
        getattr(record, key)
        for key in ("event", "plugin_id", "plugin_name", "from_status", "to_status", "reason")
    )


async def set_status(state: RegistryState, plugin_id: str, status: PluginStatus, error: str = ""):
    plugin = state.catalog.get(plugin_id)
    assert plugin is not None
    await state.update([dataclasses.replace(plugin, status=status, last_error=error)])


async def test_a_registration_a_status_change_and_an_unregister_log_one_info_line_each(
    state, caplog
):
    caplog.set_level(logging.INFO, "registry.transitions")
    plugin = await state.register(ingestor("lines", ttl=10))
    await set_status(state, plugin.plugin_id, PluginStatus.HEALTHY)
    await set_status(state, plugin.plugin_id, PluginStatus.UNHEALTHY, "UNAVAILABLE: unreachable")
    await state.remove([plugin.plugin_id])

    records = transitions(caplog)
    assert [r.levelno for r in records] == [logging.INFO] * 4
    pid = plugin.plugin_id
    assert [fields(r) for r in records] == [
        ("registered", pid, "lines", None, "UNKNOWN", "lease 10s"),
        ("status_changed", pid, "lines", "UNKNOWN", "HEALTHY", "health check passed"),
        ("status_changed", pid, "lines", "HEALTHY", "UNHEALTHY", "UNAVAILABLE: unreachable"),
        ("removed", pid, "lines", "UNHEALTHY", None, "unregistered"),
    ]
    assert [r.revision for r in records] == [1, 2, 3, 4]  # type: ignore[attr-defined]
    assert records[0].getMessage() == (
        f"plugin registered id={pid} name=lines address=127.0.0.1:9 new → UNKNOWN: "
        "lease 10s (revision 1)"
    )
    assert records[3].getMessage() == (
        f"plugin removed id={pid} name=lines address=127.0.0.1:9 UNHEALTHY → removed: "
        "unregistered (revision 4)"
    )


async def test_a_change_that_keeps_the_status_logs_nothing(state, caplog):
    caplog.set_level(logging.INFO, "registry.transitions")
    plugin = await state.register(ingestor("lines"))
    await set_status(state, plugin.plugin_id, PluginStatus.UNKNOWN, "still unknown")
    assert [r.event for r in transitions(caplog)] == ["registered"]  # type: ignore[attr-defined]


async def test_re_registering_at_the_same_address_names_both_ids(state, caplog):
    caplog.set_level(logging.INFO, "registry.transitions")
    old = await state.register(ingestor("lines"))
    new = await state.register(ingestor("lines"))
    records = transitions(caplog)[1:]
    assert [fields(r) for r in records] == [
        (
            "registered",
            new.plugin_id,
            "lines",
            None,
            "UNKNOWN",
            f"no lease; replaces {old.plugin_id}",
        ),
        ("removed", old.plugin_id, "lines", "UNKNOWN", None, f"replaced by {new.plugin_id}"),
    ]


async def test_the_reaper_expiring_and_removing_a_plugin_says_why(state, clock, caplog):
    caplog.set_level(logging.INFO, "registry.transitions")
    reaper = LeaseReaper(state, deregister_after=300, tick=0.5)
    plugin = await state.register(ingestor("lines", ttl=2))
    reaper._track(plugin)  # what its subscription does for a new plugin
    clock.now += timedelta(seconds=3)
    await reaper.sweep()
    expired = state.catalog.get(plugin.plugin_id)
    assert expired is not None
    assert expired.status is PluginStatus.EXPIRED
    clock.now += timedelta(seconds=301)
    await reaper.sweep()
    assert state.catalog.get(plugin.plugin_id) is None

    records = transitions(caplog)
    assert [fields(r)[3:] for r in records] == [
        (None, "UNKNOWN", "lease 2s"),
        ("UNKNOWN", "EXPIRED", "lease expired: no heartbeat for 2s"),
        ("EXPIRED", None, "deregister_after: EXPIRED for over 300s"),
    ]


async def test_drain_and_undrain_are_named(state, caplog):
    caplog.set_level(logging.INFO, "registry.transitions")
    plugin = await state.register(ingestor("lines"))
    await set_status(state, plugin.plugin_id, PluginStatus.HEALTHY)
    await set_status(state, plugin.plugin_id, PluginStatus.DRAINING)
    await set_status(state, plugin.plugin_id, PluginStatus.HEALTHY)
    assert [fields(r)[3:] for r in transitions(caplog)[2:]] == [
        ("HEALTHY", "DRAINING", "drained"),
        ("DRAINING", "HEALTHY", "undrained"),
    ]


async def test_a_catalogue_reloaded_after_a_failed_write_keeps_from_right(state, caplog):
    caplog.set_level(logging.INFO, "registry.transitions")
    plugin = await state.register(ingestor("lines"))
    await set_status(state, plugin.plugin_id, PluginStatus.HEALTHY)
    state._reset()  # what a reload after a failed write tells listeners
    await set_status(state, plugin.plugin_id, PluginStatus.UNHEALTHY, "UNAVAILABLE: down")
    assert fields(transitions(caplog)[-1])[3:] == ("HEALTHY", "UNHEALTHY", "UNAVAILABLE: down")


async def test_a_follower_logs_the_same_changes_at_debug_only(state, store, clock, caplog):
    caplog.set_level(logging.DEBUG, "registry.transitions")
    before = await state.register(ingestor("before"))
    await set_status(state, before.plugin_id, PluginStatus.HEALTHY)
    heard: list[Change] = []
    state.subscribe(heard.extend)

    # Subscribed before its catalogue is loaded, as a replica's server does.
    follower = RegistryState(store, clock=clock)
    TransitionLog(follower, deregister_after=300).subscribe()
    await follower.start(leading=False)
    try:
        caplog.clear()
        later = await state.register(ingestor("later"))
        await set_status(state, before.plugin_id, PluginStatus.UNHEALTHY, "UNAVAILABLE: down")
        leader_lines = [(r.levelno, fields(r)) for r in transitions(caplog)]
        caplog.clear()
        # One change at a time, as the pump may deliver them: the first one finds the
        # catalogue loaded under the log (a gap), which takes the statuses from it.
        for change in heard:
            follower.apply([change])
        follower_lines = [(r.levelno, fields(r)) for r in transitions(caplog)]
    finally:
        await follower.stop()

    assert [level for level, _ in leader_lines] == [logging.INFO, logging.INFO]
    assert [level for level, _ in follower_lines] == [logging.DEBUG, logging.DEBUG]
    assert [f for _, f in follower_lines] == [f for _, f in leader_lines]
    assert follower_lines[0][1][:2] == ("registered", later.plugin_id)
    assert follower_lines[1][1][3:5] == ("HEALTHY", "UNHEALTHY")


async def test_a_flood_of_registrations_logs_one_line_each(state, caplog):
    caplog.set_level(logging.INFO, "registry.transitions")
    plugins = await asyncio.gather(
        *(state.register(ingestor(f"p{i}", f"127.0.0.1:{7000 + i}")) for i in range(200))
    )
    records = transitions(caplog)
    assert sorted(r.plugin_id for r in records) == sorted(  # type: ignore[attr-defined]
        p.plugin_id for p in plugins
    )
    assert {r.event for r in records} == {"registered"}  # type: ignore[attr-defined]
