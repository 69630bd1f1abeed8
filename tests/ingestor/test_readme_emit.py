"""The README's "Send events out through emitters" section runs as written.

Its shell block's emitter command (examples/stdout_emitter.py) runs as a real process
against a real registry, then its ``emit.py`` runs as its own process: the script's
stdout must be the first output block, the emitter's stdout the second.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from pathlib import Path

from registry.client import RegistryClient
from registry.server import RegistryServer
from registry.testing import eventually
from registry.wire import pb

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0
TITLE = "## Send events out through emitters"


def section() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"^{TITLE}\n(.*?)^## ", readme, flags=re.DOTALL | re.MULTILINE)
    assert match is not None, f"README.md has no {TITLE!r} section"
    return match.group(1)


def blocks(text: str, language: str) -> list[str]:
    return [str(found) for found in re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)]


def plugin_command(shell: str) -> list[str]:
    (line,) = [line for line in shell.splitlines() if line.startswith("python ")]
    words = shlex.split(line, comments=True)
    assert words[-1] == "&"
    return [sys.executable, *words[1:-1]]


def test_the_section_shows_the_emitter_the_hub_and_an_sdk_emitter() -> None:
    text = section()
    script, sdk = blocks(text, "python")
    for name in ("ExternalEmitter(", "Hub(", ".emit(", "PluginEmitError", "route_to"):
        assert name in script
    assert "run_plugin(" in sdk
    assert "emit=emit" in sdk
    assert "retryable=True" in sdk
    assert "examples/stdout_emitter.py" in blocks(text, "sh")[0]


async def test_the_emit_example_runs_and_prints_what_the_readme_shows(
    registry: RegistryServer, tmp_path: Path
) -> None:
    text = section()
    script = tmp_path / "emit.py"
    script.write_text(blocks(text, "python")[0])
    script_output, emitter_output = blocks(text, "text")
    env = {**os.environ, "POLKU_REGISTRY": registry.address, "PYTHONUNBUFFERED": "1"}
    printed = tmp_path / "emitter.out"
    with printed.open("wb") as out:
        plugin = await asyncio.create_subprocess_exec(
            *plugin_command(blocks(text, "sh")[0]),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=asyncio.subprocess.DEVNULL,
        )
    try:
        async with RegistryClient(registry.address) as client:

            async def healthy() -> bool:
                plugins = await client.list_plugins(name="stdout-emitter")
                return any(p.status == pb.PLUGIN_STATUS_HEALTHY for p in plugins)

            await eventually(healthy, within=DEADLINE, what="the stdout emitter to be HEALTHY")
        run = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(DEADLINE):
            stdout, stderr = await run.communicate()
        assert run.returncode == 0, stderr.decode()
        assert stdout.decode() == script_output
    finally:
        if plugin.returncode is None:
            plugin.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            await plugin.wait()
    assert printed.read_text() == emitter_output
