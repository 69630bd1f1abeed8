"""TLS credentials for the registry, its clients and the dialers of plugins."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
