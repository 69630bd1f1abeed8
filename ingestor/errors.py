"""Errors of the gateway side: every failure of a call to a plugin is one of these.

    PluginError                  base; also misuse (a closed client, ``ingest`` inside a loop)
    ├── PluginConnectionError    the plugin cannot be reached: connect failure, UNAVAILABLE,
    │                            DEADLINE_EXCEEDED, no routable plugin, a too-stale registry view
    ├── PluginTransformError     the plugin answered but could not transform the payload:
    │                            errors and no events, or a non-transport error status;
    │                            or its answer was refused: over max_response_bytes, more
    │                            than max_events events or errors, undecodable
    └── PluginEmitError          an emitter did not deliver some events (``failed_event_ids``):
                                 it failed them for good, or retries ran out (its cause is
                                 the last failure: a PluginConnectionError when unreachable)

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


class PluginEmitError(PluginError):
    """An emitter plugin did not deliver some events; ``failed_event_ids`` names them.

    The ids are those of the events given to ``emit`` that were not delivered, in the
    order given (events without an id cannot be named: give every event one).
    ``errors`` holds the plugin's last ``EmitError`` for each of them that it
    explained (none when it could not be reached, or answered an error status);
    ``code`` is that status' name (``UNAVAILABLE``, ``DEADLINE_EXCEEDED`` for an
    unreachable one), empty when the plugin answered with per-event failures;
    ``address`` is the last endpoint tried, ``emitter`` the emitter's name.
    """

    def __init__(
        self,
        message: str,
        *,
        failed_event_ids: Sequence[str] = (),
        errors: Sequence[pb.EmitError] = (),
        address: str = "",
        code: str = "",
        emitter: str = "",
    ) -> None:
        super().__init__(message)
        self.failed_event_ids = list(failed_event_ids)
        self.errors = list(errors)
        self.address = address
        self.code = code
        self.emitter = emitter
