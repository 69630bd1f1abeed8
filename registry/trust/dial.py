"""Channels to plugins: the one way the health checker and the gateway dial one.

    target = await vet(parse_address("address", raw), policy, resolver)
    channel = plugin_channel(target, credentials, options)

or, in one step, ``await PluginDialer(policy, resolver, credentials).dial(raw)``.

A channel goes to the vetted IP (or unix path) of its :class:`DialTarget`, never to a
name gRPC would resolve again; the address's own ``host:port`` is sent as
``:authority`` and, for ``https://`` plugins, is the name the certificate must carry.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from registry.trust.addresses import (
    AddressPolicy,
    DialTarget,
    HostResolver,
    parse_address,
    vet,
)
from registry.trust.tls import TlsFiles, channel_credentials

# Options plugin_channel sets itself; a caller's value for them is ignored.
_AUTHORITY = "grpc.default_authority"
_NAME_OVERRIDE = "grpc.ssl_target_name_override"


class PluginCredentials:
    """TLS credentials for dialling ``https://`` plugins.

    ``files.ca`` verifies the plugins (the system roots when absent); ``files.cert`` and
    ``files.key``, when given, are this side's client certificate (mTLS to plugins).
    The files are read once, here, so no dial reads a file on the event loop.

    Raises (constructor):
        ValueError: a file cannot be read, is not PEM, or the key does not belong to the
            certificate (the message names the file).
    """

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._credentials = channel_credentials(files)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The ``grpc.ChannelCredentials`` (shared by every channel; they are immutable)."""
        return self._credentials

    def __repr__(self) -> str:
        files = self.files
        return f"PluginCredentials(ca={files.ca}, cert={files.cert}, key={files.key})"


def _channel_settings(
    target: DialTarget,
    credentials: PluginCredentials | None,
    options: Iterable[tuple[str, int | str]],
) -> tuple[list[tuple[str, int | str]], grpc.ChannelCredentials | None]:
    """The options and, for ``https://`` plugins, the credentials of a channel to
    ``target``: the same for an aio channel and a synchronous one."""
    settings = [(key, value) for key, value in options if key not in (_AUTHORITY, _NAME_OVERRIDE)]
    settings.append((_AUTHORITY, target.authority))
    if not target.tls:
        return settings, None
    settings.append((_NAME_OVERRIDE, target.host))
    secure = (
        credentials.channel_credentials()
        if credentials is not None
        else grpc.ssl_channel_credentials()
    )
    return settings, secure


def plugin_channel(
    target: DialTarget,
    credentials: PluginCredentials | None,
    options: Iterable[tuple[str, int | str]] = (),
) -> grpc.aio.Channel:
    """A channel to a vetted target; no connection is made yet.

    Plaintext for ``tcp`` and ``unix`` targets; TLS for ``https://`` plugins, checking
    the certificate against ``target.host`` (the name, or the IP of an IP literal) with
    ``credentials`` (the system roots when None).
    """
    settings, secure = _channel_settings(target, credentials, options)
    if secure is None:
        return grpc.aio.insecure_channel(target.target, options=settings)
    return grpc.aio.secure_channel(target.target, secure, options=settings)


def sync_plugin_channel(
    target: DialTarget,
    credentials: PluginCredentials | None,
    options: Iterable[tuple[str, int | str]] = (),
) -> grpc.Channel:
    """A synchronous channel to a vetted target, as :func:`plugin_channel` makes an aio one."""
    settings, secure = _channel_settings(target, credentials, options)
    if secure is None:
        return grpc.insecure_channel(target.target, options=settings)
    return grpc.secure_channel(target.target, secure, options=settings)


@dataclass(frozen=True, slots=True)
class PluginDialer:
    """Parse, vet and open, with one policy, resolver and set of credentials."""

    policy: AddressPolicy
    resolver: HostResolver
    credentials: PluginCredentials | None = None

    async def vet(self, address: str, *, field: str = "address") -> DialTarget:
        """Where ``address`` may be dialled.

        Raises:
            InvalidArgument: the address does not parse.
            AddressRefused: the address policy refuses it (a subclass of the above).
        """
        return await vet(parse_address(field, address), self.policy, self.resolver, field=field)

    def open(
        self, target: DialTarget, options: Iterable[tuple[str, int | str]] = ()
    ) -> grpc.aio.Channel:
        """A channel to a vetted target (see :func:`plugin_channel`)."""
        return plugin_channel(target, self.credentials, options)
