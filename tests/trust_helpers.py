"""Shared pieces of the trust acceptance tests (SPEC §6): principals, policy files,
certificates and a canary listener.

- :class:`Who`: one principal of a test policy, with its token (or certificate).
- :func:`policy_text` / :func:`write_policy`: the TOML policy file for some principals.
- :class:`Pki`: a trustme CA with the registry's certificate, client certificates
  (a ``spiffe://`` URI SAN, which trustme cannot make, is signed with the CA's key), a
  certificate from a foreign CA and an expired one, all written under a folder.
- :class:`Canary`: a TCP listener on loopback that counts connections, to prove that
  nothing was dialled.
- :class:`RebindingResolver`: a host-name table whose answer changes after a lookup.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry.testing import StaticResolver
from registry.trust.addresses import IPAddress
from registry.trust.tls import TlsFiles


def sha256_hex(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Who:
    """A principal of a test policy and the secret it is recognised by.

    The token is fresh and distinctive, so a test can look for it in logs.
    """

    name: str
    scopes: tuple[str, ...]
    names: tuple[str, ...] = ("*",)
    sources: tuple[str, ...] | None = None
    certificate: str | None = None
    with_token: bool = True
    token: str = field(default_factory=lambda: "tok-" + secrets.token_urlsafe(32))

    @property
    def bearer(self) -> tuple[tuple[str, str]]:
        """The call metadata that carries this principal's token."""
        return (("authorization", f"Bearer {self.token}"),)

    def entry(self) -> str:
        """This principal's ``[[principals]]`` table."""
        lines = ["[[principals]]", f'name = "{self.name}"']
        if self.with_token:
            lines.append(f'token_sha256 = "{sha256_hex(self.token)}"')
        if self.certificate is not None:
            lines.append(f'certificate = "{self.certificate}"')
        lines.append(f"scopes = {_toml_list(self.scopes)}")
        lines.append(f"names = {_toml_list(self.names)}")
        if self.sources is not None:
            lines.append(f"sources = {_toml_list(self.sources)}")
        return "\n".join(lines) + "\n"


def _toml_list(values: Iterable[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def policy_text(principals: Iterable[Who], *extra_entries: str) -> str:
    return "\n".join([*(p.entry() for p in principals), *extra_entries])


def write_policy(path: Path, principals: Iterable[Who], *extra_entries: str) -> Path:
    """Write the policy file atomically (a reader never sees half a file)."""
    replace_text(path, policy_text(principals, *extra_entries))
    return path


def replace_text(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".new")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


# -- certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Certificates under ``folder``; ``ca_file`` verifies the registry and its clients."""

    folder: Path
    ca: trustme.CA
    ca_file: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, folder: Path) -> Pki:
        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        ca_file = folder / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        cert, key = _write_leaf(ca.issue_cert("127.0.0.1", "localhost"), folder, "server")
        return cls(folder, ca, ca_file, cert, key)

    def server(self, *, mtls: bool) -> TlsFiles:
        """The registry's files; with ``mtls`` it requires client certificates of the CA."""
        return TlsFiles(
            ca=self.ca_file if mtls else None, cert=self.server_cert, key=self.server_key
        )

    def client(self, cert: tuple[Path, Path] | None = None) -> TlsFiles:
        """A client's files: the CA that verifies the registry, and a certificate if any."""
        if cert is None:
            return TlsFiles(ca=self.ca_file)
        return TlsFiles(ca=self.ca_file, cert=cert[0], key=cert[1])

    def spiffe(self, uri: str, name: str) -> tuple[Path, Path]:
        """A client certificate whose only URI SAN is ``uri`` (and a decoy DNS SAN and CN)."""
        return self._signed(
            name,
            self.ca,
            [x509.UniformResourceIdentifier(uri), x509.DNSName(f"{name}.decoy.test")],
            common_name=f"{name}-cn",
        )

    def foreign(self, uri: str) -> tuple[Path, Path]:
        """The same kind of certificate, from a CA the registry does not trust."""
        return self._signed("foreign", trustme.CA(), [x509.UniformResourceIdentifier(uri)], "x")

    def expired(self, uri: str) -> tuple[Path, Path]:
        """A certificate of the right CA that expired yesterday."""
        now = datetime.datetime.now(datetime.UTC)
        return self._signed(
            "expired",
            self.ca,
            [x509.UniformResourceIdentifier(uri)],
            "x",
            valid=(now - datetime.timedelta(days=2), now - datetime.timedelta(days=1)),
        )

    def _signed(
        self,
        name: str,
        ca: trustme.CA,
        sans: Sequence[x509.GeneralName],
        common_name: str,
        valid: tuple[datetime.datetime, datetime.datetime] | None = None,
    ) -> tuple[Path, Path]:
        ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        not_before, not_after = valid or (
            now - datetime.timedelta(hours=1),
            now + datetime.timedelta(hours=1),
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        cert_path, key_path = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path


def _write_leaf(leaf: trustme.LeafCert, folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


# -- proving that nothing was dialled ---------------------------------------------------


class Canary:
    """A TCP listener on 127.0.0.1 that counts the connections it accepts (and drops them)."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Canary:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class RebindingResolver(StaticResolver):
    """A :class:`StaticResolver` whose answer for a host changes after its first lookup(s).

    DNS rebinding made deterministic: ``rebind("plugin.test", 1, "127.0.0.1")`` answers
    the table's entry to the first lookup, ``127.0.0.1`` to every later one.
    """

    def __init__(self, table: dict[str, Sequence[str]]) -> None:
        super().__init__(table)
        self._later: dict[str, tuple[int, list[str]]] = {}

    def rebind(self, host: str, after: int, *ips: str) -> None:
        self._later[host.lower()] = (after, list(ips))

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        answer = await super().resolve(host, port)
        later = self._later.get(host.lower())
        if later is not None and self.lookups.count(host) >= later[0]:
            self.set(host, *later[1])
        return answer
