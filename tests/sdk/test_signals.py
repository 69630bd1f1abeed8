"""A second SIGTERM during the stop: the unregister still goes out, within the grace.

``timeout -s TERM`` sends its signal twice (to the child, then to the child's process
group), and a second Ctrl-C is common: either used to kill a plugin between its first
signal and its Unregister, leaving a stale entry. The plugins here are real processes:
the README's ``lines.py``, and a small plugin whose grace the test picks.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from registry import RegistryClient, RegistryServer
from registry.wire import pb, pb_grpc

from .conftest import (
    DEADLINE,
    ROOT,
    Proc,
    WatchRecorder,
    eventually,
    free_port,
    start_registry,
    wait_healthy,
)

HERE = Path(__file__).parent
PLUGINS = 8

# A plugin named by argv[1] whose grace is argv[2]; the registry is $POLKU_REGISTRY.
PLUGIN = """\
import logging
import sys

from registry.sdk import run_plugin
from registry.testing import echo_lines

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
name, grace = sys.argv[1], float(sys.argv[2])
run_plugin({"name": name, "sources": [name]}, ingest=echo_lines, grace=grace)
"""


def readme_lines_py() -> str:
    """The ``lines.py`` example of the README's "Write a plugin" section."""
    readme = (ROOT / "README.md").read_text()
    blocks: list[str] = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    (block,) = [b for b in blocks if b.startswith("# lines.py")]
    return block


async def registered(client: RegistryClient, name: str, count: int) -> list[pb.RegisteredPlugin]:
    """The ``count`` instances of ``name``, once all are registered."""

    async def probe() -> list[pb.RegisteredPlugin] | None:
        plugins = await client.list_plugins(name=name)
        return plugins if len(plugins) == count else None

    found: list[pb.RegisteredPlugin] = await eventually(probe, what=f"{count} x {name}")
    return found


async def test_timeout_and_its_two_sigterms_leave_no_stale_entry(
    procs: Callable[..., Proc],
    registry: RegistryServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # `timeout` runs the expiry path on SIGALRM: the test fires it once all have
    # registered, instead of racing a 3 s clock against eight interpreters starting.
    timeout = shutil.which("timeout")
    if timeout is None:
        pytest.skip("needs coreutils `timeout` on PATH")
    script = tmp_path / "lines.py"
    script.write_text(readme_lines_py())
    argv = [timeout, "--preserve-status", "-s", "TERM", f"{DEADLINE:g}", sys.executable]
    monkeypatch.setenv("POLKU_REGISTRY", registry.address)
    async with RegistryClient(registry.address) as client:
        for round_ in range(3):  # the race was 2 in 8: repeat it
            plugins = [
                await procs(f"lines {round_}.{i}", [*argv, str(script)]).start()
                for i in range(PLUGINS)
            ]
            await registered(client, "lines", PLUGINS)
            for plugin in plugins:
                plugin.send_signal(signal.SIGALRM)
            codes = [await plugin.wait() for plugin in plugins]
            assert codes == [0] * PLUGINS, "\n\n".join(p.output() for p in plugins)
            assert await client.list_plugins(name="lines") == []
            # Two signals at once bound the unregister; they do not cut the drain.
            assert not [line for p in plugins for line in p.lines if "calls in flight" in line]


async def test_a_second_sigterm_while_the_registry_is_slow_still_unregisters(
    procs: Callable[..., Proc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The registry is stopped (SIGSTOP) so that each Unregister surely waits on it
    # when the second SIGTERM comes; it resumes and gets every Unregister.
    registry, address = await start_registry(procs, free_port(), tmp_path / "registry.db")
    script = tmp_path / "plugin.py"
    script.write_text(PLUGIN)
    monkeypatch.setenv("POLKU_REGISTRY", address)
    names = [f"slow-{i}" for i in range(PLUGINS)]
    plugins = [
        await procs(name, [sys.executable, str(script), name, "30"]).start() for name in names
    ]
    async with RegistryClient(address) as client:
        for name in names:
            await wait_healthy(client, name)

        registry.send_signal(signal.SIGSTOP)
        try:
            for plugin in plugins:
                plugin.send_signal(signal.SIGTERM)
            for plugin in plugins:
                await plugin.wait_line(r"SIGTERM: unregistering plugin")
                plugin.send_signal(signal.SIGTERM)
            for plugin in plugins:
                await plugin.wait_line(r"unregistering within 30s at most")
            assert [p.returncode for p in plugins] == [None] * PLUGINS  # still unregistering
        finally:
            registry.send_signal(signal.SIGCONT)

        codes = [await plugin.wait() for plugin in plugins]
        assert codes == [0] * PLUGINS, "\n\n".join(p.output() for p in plugins)
        assert await client.list_plugins() == []
    for plugin in plugins:
        await plugin.wait_line(r"unregistered \w+")


async def test_after_a_second_sigterm_the_unregister_waits_no_longer_than_the_grace(
    procs: Callable[..., Proc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The registry stays stopped: the Unregister (5 s deadline) outlasts the 1 s grace.
    registry, address = await start_registry(procs, free_port(), tmp_path / "registry.db")
    script = tmp_path / "plugin.py"
    script.write_text(PLUGIN)
    argv = [sys.executable, str(script), "stuck", "1"]
    monkeypatch.setenv("POLKU_REGISTRY", address)
    plugin = await procs("stuck", argv).start()
    async with RegistryClient(address) as client:
        await wait_healthy(client, "stuck")
        registry.send_signal(signal.SIGSTOP)
        try:
            plugin.send_signal(signal.SIGTERM)
            await plugin.wait_line(r"SIGTERM: unregistering plugin")
            plugin.send_signal(signal.SIGTERM)
            assert await plugin.wait() == 0  # the registry has not answered yet
        finally:
            registry.send_signal(signal.SIGCONT)
    await plugin.wait_line(r"unregistering took longer than the 1s grace")


async def test_a_second_sigterm_cancels_the_call_in_flight_instead_of_waiting_for_it(
    procs: Callable[..., Proc], registry: RegistryServer
) -> None:
    # gated_plugin.py has a 60 s grace and an ingest that holds until released.
    argv = [sys.executable, str(HERE / "gated_plugin.py"), "--registry", registry.address]
    plugin = await procs("gated plugin", [*argv, "--name", "gated"], stdin=True).start()
    async with RegistryClient(registry.address) as client, WatchRecorder(client) as watch:
        found = await wait_healthy(client, "gated")
        async with grpc.aio.insecure_channel(found.address) as channel:
            stub = pb_grpc.IngestorPluginStub(channel)
            request = pb.IngestRequest(source="gated", data=b"slow")
            call = asyncio.ensure_future(stub.Ingest(request, timeout=DEADLINE))
            await plugin.wait_line(r"^out: ingest started$")

            plugin.send_signal(signal.SIGTERM)
            await watch.wait(lambda: found.plugin_id in watch.removed())
            # Unregistered, and now in the drain: a second signal here ends the calls.
            await plugin.wait_line(r"plugin gated: stopping its server")
            assert not call.done()  # the first signal lets it finish
            plugin.send_signal(signal.SIGTERM)
            await plugin.wait_line(r"plugin gated: cancelling the calls in flight")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        # The handler's thread still blocks on stdin; the interpreter joins it at exit.
        await plugin.write("release\n")
        assert await plugin.wait() == 0
        assert await client.list_plugins(name="gated") == []
