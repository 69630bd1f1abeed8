"""The README's "Route payloads" section runs as written and prints what it shows.

Its shell block's plugin command runs as a real process against a real registry, then
its ``route.py`` runs as its own process; its stdout must be the README's output block.
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


def section() -> str:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^## Route payloads\n(.*?)^## ", readme, flags=re.DOTALL | re.MULTILINE)
    assert match is not None, "README.md has no 'Route payloads' section"
    return match.group(1)


def block(text: str, language: str) -> str:
    (found,) = re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)
    return str(found)


def plugin_command(shell: str) -> list[str]:
    """The block's ``python examples/...`` line as argv (its ``&`` and comment dropped)."""
    (line,) = [line for line in shell.splitlines() if line.startswith("python ")]
    words = shlex.split(line, comments=True)
    assert words[-1] == "&"
    return [sys.executable, *words[1:-1]]


def test_the_section_shows_the_gateway_side_and_ingest_with_errors() -> None:
    text = section()
    code = block(text, "python")
    for name in ("RegistryResolver(", "ExternalIngestor(", "Hub(", ".ingest_with_errors("):
        assert name in code
    assert "polku-registry serve" in block(text, "sh")


async def test_the_route_example_runs_and_prints_what_the_readme_shows(
    registry: RegistryServer, tmp_path: Path
) -> None:
    text = section()
    script = tmp_path / "route.py"
    script.write_text(block(text, "python"))
    env = {**os.environ, "POLKU_REGISTRY": registry.address, "PYTHONUNBUFFERED": "1"}
    plugin = await asyncio.create_subprocess_exec(
        *plugin_command(block(text, "sh")),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with RegistryClient(registry.address) as client:

            async def healthy() -> bool:
                plugins = await client.list_plugins(name="jsonl")
                return any(p.status == pb.PLUGIN_STATUS_HEALTHY for p in plugins)

            await eventually(healthy, within=DEADLINE, what="the jsonl plugin to be HEALTHY")
        route = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(DEADLINE):
            out, err = await route.communicate()
        assert route.returncode == 0, err.decode()
        assert out.decode() == block(text, "text")
    finally:
        if plugin.returncode is None:
            plugin.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            await plugin.wait()
