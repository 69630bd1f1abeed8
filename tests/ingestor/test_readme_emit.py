"""The README's "Send events out through emitters" section runs as written.

Its shell block's emitter command (examples/stdout_emitter.py) runs as a real process
against a real registry, then its ``emit.py`` runs as its own process: the script's
stdout must be the first output block, the emitter's stdout the second.
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

TITLE = "Send events out through emitters"


def test_the_section_shows_the_emitter_the_hub_and_an_sdk_emitter() -> None:
    text = section(TITLE)
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
    text = section(TITLE)
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
        await wait_healthy(registry.address, "stdout-emitter")
        assert await run_script(script, env) == script_output
    finally:
        if plugin.returncode is None:
            plugin.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DEADLINE):
            await plugin.wait()
    assert printed.read_text() == emitter_output
