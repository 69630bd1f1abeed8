"""SPEC §9 "Logs", as an operator sees them: ``polku-registry serve --log-level debug``
as its own process, a real plugin it checks, and what it prints.

No driver or migration chatter even at debug; the start line names the address and the
database; one INFO line per registration, status change and removal, with the id and
the name; ``--log-format json`` prints nothing but JSON objects, one a line.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from helpers import RegistryProcess

from registry import RegistryClient
from registry.testing import FakePlugin, eventually
from registry.wire import pb

DEADLINE = 30.0
DEAD = "127.0.0.1:9"  # nothing answers there
TEXT_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<logger>\S+): (?P<message>.*)$")
DEPENDENCIES = ("aiosqlite", "alembic", "asyncpg", "sqlalchemy", "grpc", "asyncio")


def info(name: str) -> pb.PluginInfo:
    return pb.PluginInfo(name=name, type=pb.PLUGIN_TYPE_INGESTOR, sources=[name])


def text_lines(output: str) -> list[re.Match[str]]:
    """Every log line; fails on a line that is not one (a stray print, a traceback)."""
    lines = []
    for line in output.splitlines():
        match = TEXT_LINE.match(line)
        assert match is not None, f"not a log line: {line!r}\n{output}"
        lines.append(match)
    return lines


def transitions(lines: list[re.Match[str]], plugin_id: str) -> list[re.Match[str]]:
    return [
        m
        for m in lines
        if m["logger"] == "registry.transitions" and f"id={plugin_id}" in m["message"]
    ]


async def wait_output(process: RegistryProcess, text: str) -> None:
    await eventually(lambda: text in process.output, within=DEADLINE, what=repr(text))


async def test_a_debug_run_logs_each_transition_once_and_no_dependency_chatter(tmp_path: Path):
    database = tmp_path / "registry.db"
    process = RegistryProcess(
        f"sqlite:///{database}", "--log-level", "debug", "--unhealthy-threshold", "1"
    )
    async with FakePlugin(name="lines", sources=["lines"]) as plugin:
        try:
            address = await asyncio.to_thread(process.start)
            async with RegistryClient(address, timeout=DEADLINE) as client:
                good = (
                    await client.register(plugin.info(), plugin.address, no_lease=True)
                ).plugin_id
                # Registered with its first check folded in: one line, new → HEALTHY.
                await wait_output(
                    process, f"id={good} name=lines address={plugin.address} new → HEALTHY"
                )
                dead = (await client.register(info("dead"), DEAD, no_lease=True)).plugin_id
                await wait_output(process, f"id={dead} name=dead address={DEAD} new → UNHEALTHY")
                await client.unregister(good)
                await wait_output(
                    process, f"id={good} name=lines address={plugin.address} HEALTHY → removed"
                )
        finally:
            await asyncio.to_thread(process.stop)
    lines = text_lines(process.output)

    start = next(m for m in lines if "serving on" in m["message"])
    assert start["level"] == "INFO"
    assert f"serving on {address}" in start["message"]
    assert f"database {database}" in start["message"]
    chatter = [m.group(0) for m in lines if m["logger"].split(".")[0] in DEPENDENCIES]
    assert chatter == []

    good_lines = transitions(lines, good)
    assert [(m["level"], m["message"].split(" id=")[0]) for m in good_lines] == [
        ("INFO", "plugin registered"),
        ("INFO", "plugin removed"),
    ]
    assert all("name=lines" in m["message"] for m in good_lines)
    assert ": no lease; first check: passed (revision" in good_lines[0]["message"]
    assert ": unregistered (revision" in good_lines[1]["message"]
    ((level, registered),) = [(m["level"], m["message"]) for m in transitions(lines, dead)]
    assert level == "INFO"
    assert "new → UNHEALTHY: no lease; first check: UNAVAILABLE" in registered


async def test_json_format_prints_one_object_a_line_with_the_fields(tmp_path: Path):
    database = tmp_path / "registry.db"
    process = RegistryProcess(f"sqlite:///{database}", "--log-format", "json")
    try:
        address = await asyncio.to_thread(process.start)
        async with RegistryClient(address, timeout=DEADLINE) as client:
            plugin_id = (await client.register(info("lines"), DEAD, no_lease=True)).plugin_id
            await client.unregister(plugin_id)
            await wait_output(process, '"event": "removed"')
    finally:
        await asyncio.to_thread(process.stop)
    records = [json.loads(line) for line in process.output.splitlines()]

    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    start = next(r for r in records if "serving on" in r["message"])
    assert start["listen"] == address
    assert start["database"] == str(database)
    # Its first health check may fail before the unregister: that line may come between.
    ours = [
        r for r in records if r.get("plugin_id") == plugin_id and r["event"] != "status_changed"
    ]
    assert [(r["event"], r["from_status"], r["to_status"]) for r in ours] == [
        ("registered", None, "UNKNOWN"),
        ("removed", ours[1]["from_status"], None),
    ]
    assert ours[1]["from_status"] in ("UNKNOWN", "UNHEALTHY")
    assert {(r["level"], r["logger"], r["plugin_name"], r["address"]) for r in ours} == {
        ("INFO", "registry.transitions", "lines", DEAD)
    }
    assert ours[1]["reason"] == "unregistered"
