"""SPEC §6 through the ``polku-registry`` command line: serve with a policy and TLS,
``token new``, client flags and ``POLKU_REGISTRY_TOKEN``, SIGHUP reloads, ``release``.

The registry runs as ``python -m registry serve`` and each client command as a
process of its own; only loopback is ever dialled (a canary on 127.0.0.1 proves that
a refused client sends nothing).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import DEADLINE, RegistryProcess, cli, ok, one_line_error
from trust_helpers import Pki, Who, policy_text, replace_text, write_policy

from registry.client import RegistryClient
from registry.errors import Unauthenticated
from registry.testing import eventually

DEAD = "127.0.0.1:9"
ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")

A = Who("team-a", ("register", "read"), names=("team-a-*",))
B = Who("team-b", ("register", "read"), names=("*",))
ADMIN = Who("admin", ("admin",))


class Serve(RegistryProcess):
    """``serve`` over an SQLite file in ``folder`` (127.0.0.1:0 unless ``args`` say else)."""

    def __init__(self, folder: Path, *args: str) -> None:
        super().__init__(f"sqlite:///{folder}/registry.db", *args)

    def send_signal(self, sig: signal.Signals) -> None:
        assert self._process is not None
        assert self._process.poll() is None, self.output
        self._process.send_signal(sig)


serve = Serve


def port_of(address: str) -> str:
    return address.rpartition(":")[2]


# -- 7. open mode off loopback -------------------------------------------------------------


async def test_open_mode_off_loopback_needs_insecure(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/registry.db"
    refused = await asyncio.to_thread(cli, "serve", "--listen", "0.0.0.0:0", "--db", db)
    line = one_line_error(refused)
    assert "--auth-policy" in line
    assert "--insecure" in line

    process = serve(tmp_path, "--listen", "0.0.0.0:0", "--insecure")
    try:
        address = await _start(process)
        assert address.startswith("0.0.0.0:")

        def insecure() -> list[str]:
            return [line for line in process.output.splitlines() if "INSECURE" in line]

        [warning] = await eventually(insecure, within=DEADLINE, what="the INSECURE warning")
        assert " WARNING " in warning, warning
        assert "--auth-policy" in warning
    finally:
        code = await asyncio.to_thread(process.stop)
    assert code == 0, process.output
    assert len([line for line in process.output.splitlines() if "INSECURE" in line]) == 1
    assert "Traceback" not in process.output


# -- 8 and 10. token new, TLS, client flags, release -------------------------------------------


@dataclass
class TlsRegistry:
    address: str  # https://localhost:PORT
    pki: Pki
    token: str  # team-a's, from token new
    printed: str  # what token new printed


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRegistry]:
    """A registry serving TLS whose policy holds the entry ``token new`` printed."""
    folder = tmp_path_factory.mktemp("tls-registry")
    printed = ok(cli("token", "new", "--principal", "team-a"))
    token = printed.splitlines()[0].removeprefix("token: ")
    entry = printed.partition("\n")[2]
    policy = folder / "policy.toml"
    policy.write_text(entry + "\n" + policy_text([B, ADMIN]), encoding="utf-8")
    pki = Pki.create(folder / "pki")
    process = serve(
        folder, "--auth-policy", str(policy),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
    )  # fmt: skip
    try:
        address = process.start()
        yield TlsRegistry(f"https://localhost:{port_of(address)}", pki, token, printed)
    finally:
        assert process.stop() == 0, process.output
        output = process.output
        assert "Traceback" not in output
        for secret in (token, A.token, B.token, ADMIN.token):
            assert secret not in output  # tokens are never logged


def over_tls(registry: TlsRegistry, *args: str, token: str | None = None) -> list[str]:
    flags = ["--registry", registry.address, "--tls-ca", str(registry.pki.ca_file)]
    return [*args, *flags, *(["--token", token] if token else [])]


def test_token_new_prints_a_token_and_its_policy_entry(tls_registry: TlsRegistry) -> None:
    token = tls_registry.token
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token), token  # 256 bits, URL-safe base64
    entry = tomllib.loads(tls_registry.printed.partition("\n")[2])
    [principal] = entry["principals"]
    assert principal["name"] == "team-a"
    assert principal["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert token not in tls_registry.printed.partition("\n")[2]  # the entry holds the hash only
    assert set(principal["scopes"]) <= {"register", "read"}
    assert principal["names"] == ["team-a-*"]
    assert ok(cli("token", "new", "--principal", "team-a")) != tls_registry.printed  # fresh


def test_token_new_for_a_bad_principal_name_is_one_line() -> None:
    result = cli("token", "new", "--principal", "bad name")
    assert result.stdout == ""  # no token that no entry could ever carry
    assert "must be 1-128 letters" in one_line_error(result)


def test_list_over_tls_with_a_token(tls_registry: TlsRegistry) -> None:
    plugin_id = ok(
        cli(*over_tls(tls_registry, "register", token=tls_registry.token),
            "--name", "team-a-listed", "--address", DEAD, "--source", "listed")
    ).strip()  # fmt: skip
    assert ULID.fullmatch(plugin_id), plugin_id
    listed = json.loads(
        ok(cli(*over_tls(tls_registry, "list", "-o", "json", token=tls_registry.token)))
    )
    assert plugin_id in {p["plugin_id"] for p in listed}
    # The same from the environment.
    from_env = cli(
        *over_tls(tls_registry, "list", "-o", "json"), POLKU_REGISTRY_TOKEN=tls_registry.token
    )
    assert plugin_id in {p["plugin_id"] for p in json.loads(ok(from_env))}


def test_list_without_a_token_is_one_line(tls_registry: TlsRegistry) -> None:
    line = one_line_error(cli(*over_tls(tls_registry, "list")))
    assert "no identity" in line or "UNAUTHENTICATED" in line.upper(), line
    line = one_line_error(cli(*over_tls(tls_registry, "list", token="not-the-token")))
    assert "not in the auth policy" in line, line
    assert "not-the-token" not in line


def test_a_token_is_never_sent_in_clear_off_the_host() -> None:
    # Connecting to 0.0.0.0 reaches this host's 127.0.0.1 listeners: a canary there shows
    # that the refused client made no connection at all (not merely a refused call).
    with socket.create_server(("127.0.0.1", 0)) as canary:
        port = canary.getsockname()[1]
        line = one_line_error(
            cli("register", "--registry", f"0.0.0.0:{port}", "--token", "x",
                "--name", "n", "--address", DEAD, "--source", "s")
        )  # fmt: skip
        assert "in clear" in line, line
        canary.setblocking(False)
        with pytest.raises(BlockingIOError):
            canary.accept()  # nothing connected
    # The refusal comes before any channel exists, whatever the address.
    for registry in ("10.1.2.3:1", "http://10.1.2.3:1", "registry.example:1"):
        line = one_line_error(
            cli("register", "--registry", registry, "--token", "x", "--timeout", "1s",
                "--name", "n", "--address", DEAD, "--source", "s")
        )  # fmt: skip
        assert "refusing to send a token in clear" in line, line
        assert "unavailable" not in line.lower(), line


def test_release_by_an_admin_frees_a_name(tls_registry: TlsRegistry) -> None:
    a_id = ok(
        cli(*over_tls(tls_registry, "register", token=tls_registry.token),
            "--name", "team-a-rel", "--address", "127.0.0.1:40501", "--source", "rel-src")
    ).strip()  # fmt: skip
    as_b = over_tls(tls_registry, "register", token=B.token)
    claim = ["--name", "team-a-rel", "--address", DEAD, "--source", "rel-src"]
    line = one_line_error(cli(*as_b, *claim))
    assert "team-a-rel" in line
    assert a_id not in line
    assert "40501" not in line

    line = one_line_error(cli(*over_tls(tls_registry, "release", "team-a-rel", token=B.token)))
    assert "lacks scope 'admin'" in line, line
    released = ok(cli(*over_tls(tls_registry, "release", "team-a-rel", token=ADMIN.token)))
    assert released.strip() == "released team-a-rel and rel-src (owned by team-a)"
    again = ok(cli(*over_tls(tls_registry, "release", "team-a-rel", token=ADMIN.token)))
    assert "nobody owned it" in again

    b_id = ok(cli(*as_b, *claim)).strip()
    assert ULID.fullmatch(b_id), b_id


def test_a_client_certificate_is_an_identity(tmp_path: Path) -> None:
    """``serve --tls-client-ca`` (mTLS) and the client's ``--tls-cert``/``--tls-key``."""
    pki = Pki.create(tmp_path / "pki")
    ops = Who("ops", ("read",), certificate="spiffe://test/ops", with_token=False)
    policy = write_policy(tmp_path / "policy.toml", [ops, ADMIN])
    cert, key = pki.spiffe("spiffe://test/ops", "ops")
    process = serve(
        tmp_path, "--auth-policy", str(policy), "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca_file),
    )  # fmt: skip
    try:
        port = port_of(process.start())
        base = ["--registry", f"https://127.0.0.1:{port}", "--tls-ca", str(pki.ca_file)]
        mine = [*base, "--tls-cert", str(cert), "--tls-key", str(key)]
        assert json.loads(ok(cli("list", *mine, "-o", "json"))) == []
        register = ["--name", "ops-1", "--address", DEAD, "--source", "ops"]
        line = one_line_error(cli("register", *mine, *register))
        assert "'ops'" in line
        assert "lacks scope 'register'" in line
        # A token rides along on the same connection and wins over the certificate.
        assert ULID.fullmatch(ok(cli("register", *mine, "--token", ADMIN.token, *register)).strip())
        # Without a certificate there is no TLS session at all.
        line = one_line_error(cli("list", *base, "--token", ADMIN.token, "--timeout", "5s"))
        assert "unavailable" in line.lower(), line
    finally:
        assert process.stop() == 0, process.output


# -- 9. SIGHUP reloads the policy ----------------------------------------------------------


async def can_list(address: str, who: Who) -> bool:
    async with RegistryClient(address, token=who.token) as client:
        try:
            await client.list_plugins()
        except Unauthenticated:
            return False
    return True


def warnings_in(output: str) -> list[str]:
    return [line for line in output.splitlines() if " WARNING " in line]


async def test_sighup_reloads_the_policy_and_keeps_it_on_a_bad_file(tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy.toml", [A])
    # Off loopback, which a policy allows (reached through 127.0.0.1 only).
    process = serve(tmp_path, "--auth-policy", str(policy), "--listen", "0.0.0.0:0")
    try:
        address = "127.0.0.1:" + port_of(await _start(process))
        assert "INSECURE" not in process.output
        assert await can_list(address, A)  # serving, and the SIGHUP handler is installed
        assert not await can_list(address, B)

        write_policy(policy, [A, B])
        process.send_signal(signal.SIGHUP)
        await eventually(lambda: can_list(address, B), within=DEADLINE, what="B admitted")

        before = warnings_in(process.output)
        replace_text(policy, policy_text([A, B]) + '\n[[principals]]\nname = "broken\n')
        process.send_signal(signal.SIGHUP)

        def new_warnings() -> list[str]:
            return warnings_in(process.output)[len(before) :]

        [warning] = await eventually(new_warnings, within=DEADLINE, what="a reload warning")
        assert "auth policy not reloaded" in warning, warning
        assert await can_list(address, A)
        assert await can_list(address, B)

        # Revocation works the same way: B leaves the file, then the registry.
        write_policy(policy, [A])
        process.send_signal(signal.SIGHUP)

        async def b_refused() -> bool:
            return not await can_list(address, B)

        await eventually(b_refused, within=DEADLINE, what="B refused")
        assert await can_list(address, A)
        assert new_warnings() == [warning]  # one line for the bad file, nothing since
    finally:
        code = await asyncio.to_thread(process.stop)
    assert code == 0, process.output
    assert "Traceback" not in process.output
    for secret in (A.token, B.token):
        assert secret not in process.output


async def _start(process: RegistryProcess) -> str:
    return await asyncio.to_thread(process.start)


HEX63 = '[[principals]]\nname = "a"\ntoken_sha256 = "' + "a" * 63 + '"\nscopes = ["read"]\n'


@pytest.mark.parametrize(
    ("policy", "complaint"),
    [
        (HEX63, "64 hex digits"),
        ("principals = []\n", "no principals"),
        ("", "no principals"),
        ('[[principals]]\nname = "a"\ntoken_sha256 = "' + "a" * 64 + '"\nscopes = ["read"]\n'
         'scope = ["admin"]\n', "unknown key"),
    ],
    ids=["63-hex", "empty-list", "empty-file", "typo"],
)  # fmt: skip
def test_a_bad_policy_refuses_to_start(tmp_path: Path, policy: str, complaint: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(policy, encoding="utf-8")
    result = cli("serve", "--db", f"sqlite:///{tmp_path}/r.db", "--auth-policy", str(path))
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr
    assert errors[0] == result.stderr.strip().splitlines()[-1]
    assert errors[0].startswith("polku-registry: error: "), errors[0]
    assert complaint in errors[0], errors[0]
    assert str(path) in errors[0]
    assert "serving on" not in result.stderr


def test_a_bad_policy_is_one_line_on_stderr(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(HEX63, encoding="utf-8")
    one_line_error(cli("serve", "--db", f"sqlite:///{tmp_path}/r.db", "--auth-policy", str(path)))
