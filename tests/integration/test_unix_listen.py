"""A registry on a unix socket says where it is, and serves there."""

from __future__ import annotations

from pathlib import Path

from registry.client import RegistryClient
from registry.testing import running_registry


async def test_a_unix_socket_registry_names_its_socket(tmp_path: Path) -> None:
    listen = f"unix:{tmp_path}/registry.sock"
    async with running_registry(tmp_path, listen=listen) as server:
        assert server.address == server.advertised == listen
        async with RegistryClient(server.address) as client:
            assert await client.list_plugins() == []
            status = await client.get_status()
        assert status.address == listen
