"""Running a README section as written: its blocks, its plugin command, its script."""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
from pathlib import Path

from registry.client import RegistryClient
from registry.testing import eventually
from registry.wire import pb

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0


def section(title: str) -> str:
    """The text of the README section headed ``## title``, up to the next one."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)^## ", readme, re.DOTALL | re.MULTILINE)
    assert match is not None, f"README.md has no {title!r} section"
    return match.group(1)


def blocks(text: str, language: str) -> list[str]:
    return [str(found) for found in re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)]


def plugin_command(shell: str) -> list[str]:
    """The block's ``python examples/...`` line as argv (its ``&`` and comment dropped)."""
    (line,) = [line for line in shell.splitlines() if line.startswith("python ")]
    words = shlex.split(line, comments=True)
    assert words[-1] == "&"
    return [sys.executable, *words[1:-1]]


async def wait_healthy(registry: str, name: str) -> None:
    async with RegistryClient(registry) as client:

        async def healthy() -> bool:
            plugins = await client.list_plugins(name=name)
            return any(p.status == pb.PLUGIN_STATUS_HEALTHY for p in plugins)

        await eventually(healthy, within=DEADLINE, what=f"the plugin {name} to be HEALTHY")


async def run_script(script: Path, env: dict[str, str]) -> str:
    """Run ``script`` as its own process in its folder; its stdout (it must exit 0)."""
    run = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        cwd=script.parent,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(DEADLINE):
        stdout, stderr = await run.communicate()
    assert run.returncode == 0, stderr.decode()
    return stdout.decode()
