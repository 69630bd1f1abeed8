"""Domain objects to wire messages. The servicer and the watch hub share these."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import cast

from google.protobuf.timestamp_pb2 import Timestamp

from registry.model import Change, Plugin, PluginStatus, PluginType
from registry.wire import pb


def _stamp(field: Timestamp, value: datetime) -> None:
    # Timestamp.FromDatetime is several times slower; these are UTC-aware datetimes.
    field.seconds = int(value.timestamp())
    field.nanos = value.microsecond * 1000


def wire_type(value: PluginType) -> pb.PluginType:
    return cast(pb.PluginType, int(value))


def wire_status(value: PluginStatus) -> pb.PluginStatus:
    return cast(pb.PluginStatus, int(value))


def _fill_info(info: pb.PluginInfo, plugin: Plugin) -> None:
    reg = plugin.registration
    info.name = reg.name
    info.version = reg.version
    info.type = wire_type(reg.type)
    info.description = reg.description
    info.sources.extend(reg.sources)
    info.emitter_name = reg.emitter_name
    info.capabilities.extend(reg.capabilities)


def registered_plugin(plugin: Plugin) -> pb.RegisteredPlugin:
    """The wire form of a plugin, filled in place (no temporary submessages to copy)."""
    message = pb.RegisteredPlugin(
        plugin_id=plugin.plugin_id,
        address=plugin.address,
        status=wire_status(plugin.status),
        last_error=plugin.last_error,
        lease_ttl_seconds=plugin.registration.lease_ttl_seconds,
        labels=plugin.registration.labels,
        revision=plugin.revision,
    )
    _fill_info(message.info, plugin)
    _stamp(message.registered_at, plugin.registered_at)
    if plugin.last_heartbeat_at is not None:
        _stamp(message.last_heartbeat_at, plugin.last_heartbeat_at)
    if plugin.last_check_at is not None:
        _stamp(message.last_check_at, plugin.last_check_at)
    return message


# Field 1, wire type 2 (length-delimited): ``repeated RegisteredPlugin plugins = 1``.
_LIST_ITEM_TAG = b"\x0a"
# Field 3, wire type 2: ``repeated RegisteredPlugin upserted = 3`` of a WatchResponse.
_UPSERTED_TAG = b"\x1a"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _list_item(data: bytes) -> bytes:
    return _LIST_ITEM_TAG + _varint(len(data)) + data


# The other fields of a ListPluginsResponse: ``int64 revision = 2``, ``string
# next_page_token = 3`` (varint, length-delimited).
_LIST_REVISION_TAG = b"\x10"
_LIST_TOKEN_TAG = b"\x1a"


def plugin_list(items: list[bytes], revision: int, next_page_token: str) -> bytes:
    """A ListPluginsResponse, encoded, from :meth:`MessageCache.encoded` items.

    The items are already ``plugins`` fields (field 1 of a list), so the response is
    their concatenation and two more fields, handed to gRPC as it is (ListPlugins'
    response serializer passes bytes through, registry.server): listing 10,000 parses
    and serialises nothing.
    """
    parts: list[bytes] = list(items)
    if revision:
        parts.append(_LIST_REVISION_TAG + _varint(revision & 0xFFFFFFFFFFFFFFFF))
    if next_page_token:
        data = next_page_token.encode()
        parts.append(_LIST_TOKEN_TAG + _varint(len(data)) + data)
    return b"".join(parts)


# The other fields of a WatchResponse: ``int64 revision = 1``, ``bool snapshot = 2``,
# ``repeated string removed_plugin_ids = 4`` (varint, varint, length-delimited).
_REVISION_TAG = b"\x08"
_SNAPSHOT_TRUE = b"\x10\x01"
_REMOVED_TAG = b"\x22"


def watch_message(
    revision: int,
    items: list[bytes],
    removed: list[str],
    *,
    snapshot: bool = False,
) -> bytes:
    """A WatchResponse, encoded; its ``upserted`` are :meth:`MessageCache.encoded` items.

    Encoded here, once, and handed to gRPC as they are (the Watch method's response
    serializer passes bytes through), so one change costs one encoding however many
    watchers get it. The fields come in field-number order, as protobuf writes them:
    the same bytes ``pb.WatchResponse(...).SerializeToString()`` gives. The items are
    framed as field 1 of a list; only their one-byte tag differs from ``upserted``'s,
    so each is re-tagged through a memoryview (no copy of its own) and joined once.
    """
    parts: list[bytes | memoryview] = []
    if revision:
        parts.append(_REVISION_TAG + _varint(revision & 0xFFFFFFFFFFFFFFFF))
    if snapshot:
        parts.append(_SNAPSHOT_TRUE)
    for item in items:
        parts.append(_UPSERTED_TAG)
        parts.append(memoryview(item)[1:])
    for plugin_id in removed:
        data = plugin_id.encode()
        parts.append(_REMOVED_TAG + _varint(len(data)) + data)
    return b"".join(parts)


def endpoint(plugin: Plugin) -> pb.Endpoint:
    return pb.Endpoint(
        plugin_id=plugin.plugin_id, address=plugin.address, status=wire_status(plugin.status)
    )


class _Entry:
    __slots__ = ("encoded", "message", "plugin")

    def __init__(self, plugin: Plugin) -> None:
        self.plugin = plugin
        self.message = registered_plugin(plugin)
        self.encoded: bytes | None = None


class MessageCache:
    """RegisteredPlugin messages (and their encoded bytes), built once per plugin state.

    Plugins are immutable, so a cached message is reused while the catalog still
    holds the very same object; ListPlugins of thousands and Watch messages are then
    parsed from the shared encoded bytes, not rebuilt. Removed plugins are dropped
    as changes commit.
    """

    def __init__(self) -> None:
        self._messages: dict[str, _Entry] = {}

    def __contains__(self, plugin_id: object) -> bool:
        """Whether some state of the plugin ``plugin_id`` is cached."""
        return plugin_id in self._messages

    def _entry(self, plugin: Plugin) -> _Entry:
        entry = self._messages.get(plugin.plugin_id)
        if entry is None or entry.plugin is not plugin:
            entry = self._messages[plugin.plugin_id] = _Entry(plugin)
        return entry

    def get(self, plugin: Plugin) -> pb.RegisteredPlugin:
        return self._entry(plugin).message

    def encoded(self, plugin: Plugin, *, keep: bool = True) -> bytes:
        """The plugin as the bytes of a ``RegisteredPlugin`` field (``field 1``) of a list.

        ``keep=False`` is for a state the catalog may no longer hold (a lagging
        watcher's change, a snapshot older than the view): the cached bytes if the
        cache holds this very state, else bytes built for the caller alone, so that
        old states neither replace newer entries nor bring removed plugins back.
        """
        if not keep:
            entry = self._messages.get(plugin.plugin_id)
            if entry is None or entry.plugin is not plugin:
                return _list_item(registered_plugin(plugin).SerializeToString())
        else:
            entry = self._entry(plugin)
        if entry.encoded is None:
            entry.encoded = _list_item(entry.message.SerializeToString())
        return entry.encoded

    async def warm(self, plugins: list[Plugin]) -> None:
        """Build the entries of ``plugins`` in slices, yielding to the loop between
        them: after a start, the first ListPlugins of all is then no slower than the next."""
        for start in range(0, len(plugins), 256):
            for plugin in plugins[start : start + 256]:
                self.encoded(plugin)
            await asyncio.sleep(0)

    def forget(self, changes: list[Change]) -> None:
        for change in changes:
            for plugin in change.removed:
                self._messages.pop(plugin.plugin_id, None)

    def clear(self) -> None:
        self._messages.clear()
