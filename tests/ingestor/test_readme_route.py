"""The README's "Route payloads" section runs as written and prints what it shows.

Its shell block's plugin command runs as a real process against a real registry, then
its ``route.py`` runs as its own process; its stdout must be the README's output block.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from readme_sections import (
    DEADLINE,
    ROOT,
    blocks,
    plugin_command,
    run_script,
    section,
    wait_healthy,
)

from registry.server import RegistryServer

TITLE = "Route payloads"


def block(text: str, language: str) -> str:
    (found,) = blocks(text, language)
    return found


def test_the_section_shows_the_gateway_side_and_ingest_with_errors() -> None:
    text = section(TITLE)
    code = block(text, "python")
    for name in ("RegistryResolver(", "ExternalIngestor(", "Hub(", ".ingest_with_errors("):
        assert name in code
    assert "polku-registry serve" in block(text, "sh")


async def test_the_route_example_runs_and_prints_what_the_readme_shows(
    registry: RegistryServer, tmp_path: Path
) -> None:
    text = section(TITLE)
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
        await wait_healthy(registry.address, "jsonl")
        assert await run_script(script, env) == block(text, "text")
    finally:
        if plugin.returncode is None:
            plugin.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            await plugin.wait()
