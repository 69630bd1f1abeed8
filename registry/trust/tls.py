"""TLS credentials for the registry, its clients and the dialers of plugins.

- :class:`TlsFiles`: the PEM files one side of a connection uses.
- :class:`ServerCredentials`: the registry's credentials. gRPC asks them before every
  new TLS handshake whether the certificate changed; they compare the files' stat
  (mtime, size, inode) with what they loaded and reload only when it moved, so a
  renewed certificate is served without a restart. A new set that does not load (a
  half-written file, a key that does not match) keeps the old one and logs one warning.
- :func:`channel_credentials`: a client's credentials, read once when it is built.

Every file problem is a ``ValueError`` with one line naming the file, never its content.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

# A file's identity as far as reloading cares: (mtime_ns, size, inode); None if missing.
_Stat = tuple[int, int, int] | None
_Signature = tuple[_Stat, ...]

# Attempts to read a set of files that keeps changing under us, at construction.
_SETTLE_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files of one side of a TLS connection.

    ``ca``: the bundle that verifies the peer (a client without one uses the system
    roots; a server with one requires client certificates, i.e. mTLS). ``cert`` and
    ``key``: this side's own chain and key (a server's, or a client's for mTLS).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls: a certificate and its key go together")


class ServerCredentials:
    """The registry's TLS server credentials, reloaded when their files change.

    ``files.cert`` and ``files.key`` are served; ``files.ca``, when given, is the bundle
    client certificates must chain to (mTLS: a client without one fails the handshake).
    Build the gRPC credentials with :meth:`credentials`, once per server.

    Thread rules: gRPC calls the check from its own threads, one call per new
    connection (never per RPC); it costs a ``stat`` of each file, and reads them only
    when one changed. While one handshake reloads, others go on with the current set.

    Raises (constructor):
        ValueError: no certificate or key, a file cannot be read, is not PEM, or the
            key does not belong to the certificate (the message names the file).
    """

    def __init__(self, files: TlsFiles) -> None:
        if files.cert is None or files.key is None:
            raise ValueError("tls: serving TLS needs a certificate and its key")
        self.files = files
        self._lock = threading.Lock()
        self._loaded = _load_settled(files)
        self._rejected: _Signature | None = None

    @property
    def requires_client_certificate(self) -> bool:
        """Whether clients must present a certificate (a client CA was given)."""
        return self.files.ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """New gRPC server credentials that follow the files, for one server's port."""
        served = self._loaded

        def fetch() -> Any:
            # Called by gRPC core on its own thread before each handshake; None = no change.
            nonlocal served
            try:
                current = self._current()
            except Exception:  # a bug here must not break handshakes: keep what is served
                log.exception("tls: checking %s for changes failed", self.files.cert)
                return None
            if current is served:
                return None
            served = current
            return current.config

        return grpc.dynamic_ssl_server_credentials(
            served.config, fetch, require_client_authentication=self.requires_client_certificate
        )

    def _current(self) -> _Loaded:
        """The newest set that loaded, reloading first when the files changed."""
        loaded = self._loaded
        if not self._lock.acquire(blocking=False):
            return loaded  # another handshake is reloading; this one keeps the current set
        try:
            signature = _signature(self.files)
            if signature in (loaded.signature, self._rejected):
                return loaded
            try:
                fresh = _load(self.files)
            except _Unsettled:
                log.debug("tls: %s is being written; trying again at the next handshake", self)
                return loaded
            except ValueError as exc:
                self._rejected = signature
                log.warning("tls: keeping the certificate already served: %s", exc)
                return loaded
            self._loaded, self._rejected = fresh, None
            log.info("tls: reloaded certificate %s and key %s", self.files.cert, self.files.key)
            return fresh
        finally:
            self._lock.release()

    def __repr__(self) -> str:
        files = self.files
        return f"ServerCredentials(cert={files.cert}, key={files.key}, client_ca={files.ca})"


def channel_credentials(tls: TlsFiles | None) -> grpc.ChannelCredentials:
    """A client's TLS credentials: ``tls.ca`` (else the system roots), and the client's
    own ``tls.cert``/``tls.key`` for mTLS. The files are read now, once.

    Raises:
        ValueError: a file cannot be read, is not PEM, or the key does not belong to
            the certificate (the message names the file).
    """
    if tls is None:
        return grpc.ssl_channel_credentials()
    roots = _read_certificates(tls.ca, "CA bundle") if tls.ca is not None else None
    key = chain = None
    if tls.cert is not None and tls.key is not None:
        chain, key = _read_pair(tls.cert, tls.key)
    return grpc.ssl_channel_credentials(
        root_certificates=roots, private_key=key, certificate_chain=chain
    )


# -- loading ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Loaded:
    """One set of server files that loaded, and the stat it was read at."""

    signature: _Signature
    config: grpc.ServerCertificateConfiguration


class _Unsettled(ValueError):
    """The files changed while being read: read them again later, do not reject them."""


def _paths(files: TlsFiles) -> tuple[Path, ...]:
    return tuple(path for path in (files.cert, files.key, files.ca) if path is not None)


def _stat(path: Path) -> _Stat:
    try:
        info = os.stat(path)  # follows symlinks: a Kubernetes secret swaps its ..data link
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def _signature(files: TlsFiles) -> _Signature:
    return tuple(_stat(path) for path in _paths(files))


def _load_settled(files: TlsFiles) -> _Loaded:
    for _ in range(_SETTLE_ATTEMPTS - 1):
        try:
            return _load(files)
        except _Unsettled:
            continue
    return _load(files)


def _load(files: TlsFiles) -> _Loaded:
    """Read and check the server's files.

    Raises:
        _Unsettled: a file changed while it was read.
        ValueError: a file cannot be read, is not PEM, or key and certificate differ.
    """
    assert files.cert is not None
    assert files.key is not None
    signature = _signature(files)
    chain, key = _read_pair(files.cert, files.key)
    roots = _read_certificates(files.ca, "client CA bundle") if files.ca is not None else None
    # The key check reads the paths again: only a set that stood still is the one checked.
    if _signature(files) != signature:
        raise _Unsettled(f"tls: {files.cert} changed while being read")
    config = grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=roots)
    return _Loaded(signature, config)


def _read(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"tls: cannot read {what} {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(f"tls: {what} {path} is not PEM (binary data)") from exc


def _read_certificates(path: Path, what: str) -> bytes:
    text = _read(path, what)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError as exc:
        raise ValueError(
            f"tls: {what} {path} holds no valid PEM certificate ({_reason(exc)})"
        ) from exc
    return text.encode("ascii")


def _read_pair(cert: Path, key: Path) -> tuple[bytes, bytes]:
    """A certificate chain and its key, checked to belong together."""
    chain = _read_certificates(cert, "certificate")
    key_text = _read(key, "key")
    if "ENCRYPTED" in key_text:
        raise ValueError(f"tls: key {key} is encrypted; give it unencrypted")
    if "PRIVATE KEY-----" not in key_text:
        raise ValueError(f"tls: key {key} holds no PEM private key")
    try:
        # The standard library checks a key against its certificate only from files.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"tls: key {key} does not belong to certificate {cert}") from exc
        raise ValueError(f"tls: key {key} is not a valid PEM private key ({_reason(exc)})") from exc
    except OSError as exc:  # deleted between the two reads
        raise ValueError(f"tls: cannot read key {key}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # _no_password: it was encrypted after all
        raise ValueError(f"tls: key {key} is encrypted; give it unencrypted") from exc
    return chain, key_text.encode("ascii")


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise ValueError("encrypted keys are not supported")


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.library or "malformed")
