"""Errors of the gateway side: every failure of a call to a plugin is one of these.

    PluginError                  base; also misuse (a closed client, ``ingest`` inside a loop)
    ├── PluginConnectionError    the plugin cannot be reached: connect failure, UNAVAILABLE,
    │                            DEADLINE_EXCEEDED, no routable plugin, a too-stale registry view
    └── PluginTransformError     the plugin answered but could not transform the payload:
                                 errors and no events, or a non-transport error status;
                                 or its answer was refused: over max_response_bytes, more
                                 than max_events events or errors, undecodable

RPC errors are translated where the call is made and chained (``raise ... from exc``).
"""

from __future__ import annotations

from collections.abc import Sequence

from registry.wire import pb


class PluginError(Exception):
    """Base of every error this package raises on purpose."""


class PluginConnectionError(PluginError):
    """No plugin could be reached for the call; a later call may succeed.

    ``address`` is the endpoint that failed, empty when none was tried (no routable
    plugin, a view too stale, a registry never reached).
    """

    def __init__(self, message: str, *, address: str = "") -> None:
        super().__init__(message)
        self.address = address


class PluginTransformError(PluginError):
    """The plugin answered but produced no events, or an answer the gateway refuses.

    ``errors`` holds the plugin's ``IngestError`` messages (empty when the plugin
    answered with an error status instead); ``code`` is that status' name, or empty
    (also for a refused answer, whose message names the limit or says undecodable).
    """

    def __init__(
        self,
        message: str,
        *,
        address: str = "",
        code: str = "",
        errors: Sequence[pb.IngestError] = (),
    ) -> None:
        super().__init__(message)
        self.address = address
        self.code = code
        self.errors = list(errors)
