"""How the command line shows plugins and replicas: tables for people, JSON for programs.

JSON is the protobuf JSON mapping with the proto field names (``plugin_id``, ``info``)
and every field present, so ``status`` always reads e.g. ``"PLUGIN_STATUS_HEALTHY"``.
The wide table (``-o wide``) adds the version and labels and keeps the whole last error.
A Watch stream is shown a whole revision at a time
(:class:`registry.revisions.WholeRevisions`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from registry.durations import format_duration

# Re-exported: a revision's messages split at it (tests size messages by it).
from registry.revisions import SPLIT_BUDGET as SPLIT_BUDGET
from registry.wire import pb

TABLE_COLUMNS = (
    "PLUGIN ID",
    "NAME",
    "TYPE",
    "ADDRESS",
    "ROUTES",
    "STATUS",
    "LAST CHECK",
    "LAST ERROR",
)
WIDE_COLUMNS = (
    "PLUGIN ID",
    "NAME",
    "VERSION",
    "TYPE",
    "ADDRESS",
    "ROUTES",
    "STATUS",
    "LAST CHECK",
    "LABELS",
    "LAST ERROR",
)
EMPTY_TABLE = "No plugins registered."
STATUS_COLUMNS = ("ADDRESS", "ROLE", "EPOCH", "APPLIED", "LAG", "UP")
ERROR_WIDTH = 40


def to_json(message: Message) -> dict[str, Any]:
    """The protobuf JSON mapping of ``message``, proto field names, every field present."""
    return MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def plugins_json(plugins: Iterable[pb.RegisteredPlugin]) -> str:
    """A JSON array of plugins, indented for reading."""
    return json.dumps([to_json(p) for p in plugins], indent=2)


def plugin_json(plugin: pb.RegisteredPlugin) -> str:
    return json.dumps(to_json(plugin), indent=2)


def watch_json(message: pb.WatchResponse) -> str:
    """One watch message as one compact line (JSON Lines)."""
    return json.dumps(to_json(message), separators=(",", ":"))


def status_json(status: pb.RegistryStatus) -> str:
    """The registry's status (``GetStatus``), indented for reading."""
    return json.dumps(to_json(status), indent=2)


def type_name(value: int) -> str:
    """``ingestor``/``emitter`` for a ``PluginType`` number; the number if unknown."""
    return _enum_name(pb.PluginType, "PLUGIN_TYPE_", value)


def status_name(value: int) -> str:
    """``healthy``/``unhealthy``/``unknown``/``expired``/``draining`` for a ``PluginStatus``."""
    return _enum_name(pb.PluginStatus, "PLUGIN_STATUS_", value)


def routes(info: pb.PluginInfo) -> str:
    """What a plugin is routed by: its sources, or the name an emitter is addressed by."""
    if info.type == pb.PLUGIN_TYPE_EMITTER:
        return info.emitter_name or info.name
    return ",".join(info.sources)


def age(stamp: Timestamp | None, now: datetime) -> str:
    """``3s ago``, ``5m ago``, ``2h ago``, ``4d ago``; ``-`` when never."""
    if stamp is None:
        return "-"
    seconds = max(0, int((now - stamp.ToDatetime(tzinfo=UTC)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def plugins_table(
    plugins: Sequence[pb.RegisteredPlugin], *, now: datetime | None = None, wide: bool = False
) -> str:
    """An aligned table, one plugin a row; :data:`EMPTY_TABLE` when there are none.

    ``wide``: the :data:`WIDE_COLUMNS` (version and labels too), the last error uncut.
    """
    if not plugins:
        return EMPTY_TABLE
    now = now or datetime.now(UTC)
    rows: list[tuple[str, ...]] = [WIDE_COLUMNS if wide else TABLE_COLUMNS]
    for p in plugins:
        error = _one_line(p.last_error)
        cells = {
            "PLUGIN ID": p.plugin_id,
            "NAME": p.info.name,
            "VERSION": p.info.version or "-",
            "TYPE": type_name(p.info.type),
            "ADDRESS": p.address,
            "ROUTES": routes(p.info) or "-",
            "STATUS": status_name(p.status),
            "LAST CHECK": age(_stamp(p, "last_check_at"), now),
            "LABELS": labels(p.labels) or "-",
            "LAST ERROR": (error if wide else _truncate(error, ERROR_WIDTH)) or "-",
        }
        rows.append(tuple(cells[column] for column in rows[0]))
    return _align(rows)


def labels(values: Mapping[str, str]) -> str:
    """``key=value`` pairs sorted by key, comma-separated (the selector syntax)."""
    return ",".join(f"{key}={value}" for key, value in sorted(values.items()))


def role_name(value: int) -> str:
    """``leader``/``follower`` for a ``ReplicaRole`` number; ``-`` when unspecified."""
    if value == pb.REPLICA_ROLE_UNSPECIFIED:
        return "-"
    return _enum_name(pb.ReplicaRole, "REPLICA_ROLE_", value)


def status_table(status: pb.RegistryStatus) -> str:
    """A header line (leader, epoch, head revision, backend), then a row per replica."""
    backend = status.backend or "-"
    header = (
        f"leader {status.leader or '-'} epoch {status.epoch} revision {status.revision} ({backend})"
    )
    rows = [STATUS_COLUMNS] + [
        (
            r.address or "-",
            role_name(r.role),
            str(r.epoch),
            str(r.applied_revision),
            str(r.lag),
            "yes" if r.up else "no",
        )
        for r in status.replicas
    ]
    return "\n".join([header, _align(rows)])


def _align(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def plugin_detail(plugin: pb.RegisteredPlugin, *, now: datetime | None = None) -> str:
    """One plugin as aligned ``key: value`` lines."""
    now = now or datetime.now(UTC)
    info = plugin.info
    is_emitter = info.type == pb.PLUGIN_TYPE_EMITTER
    ttl = plugin.lease_ttl_seconds
    fields = [
        ("plugin id", plugin.plugin_id),
        ("name", info.name),
        ("type", type_name(info.type)),
        ("version", info.version),
        ("description", _one_line(info.description)),
        ("address", plugin.address),
        ("emitter name" if is_emitter else "sources", routes(info).replace(",", ", ")),
        ("capabilities", ", ".join(info.capabilities)),
        ("status", status_name(plugin.status)),
        ("lease", format_duration(ttl) if ttl else "none (registered by an operator)"),
        ("labels", labels(plugin.labels).replace(",", ", ")),
        ("registered", _when(_stamp(plugin, "registered_at"), now)),
        ("last heartbeat", _when(_stamp(plugin, "last_heartbeat_at"), now)),
        ("last check", _when(_stamp(plugin, "last_check_at"), now)),
        ("last error", _one_line(plugin.last_error)),
        ("revision", str(plugin.revision)),
    ]
    width = max(len(key) for key, _ in fields) + 1
    return "\n".join(f"{key + ':':<{width}} {value or '-'}" for key, value in fields)


def watch_lines(message: pb.WatchResponse) -> list[str]:
    """One watch message for people: one line per plugin upserted or removed.

    A snapshot opens with a header line (so an empty one still shows); a progress
    message (no changes) gives no lines.
    """
    rev = f"revision {message.revision}"
    count = len(message.upserted)
    header = f"{rev} snapshot ({count} plugin{'' if count == 1 else 's'})"
    lines = [header] if message.snapshot else []
    action = "present" if message.snapshot else "upserted"
    lines += [
        f"{rev} {action} {p.plugin_id} {p.info.name} {type_name(p.info.type)} {p.address} "
        f"routes={routes(p.info) or '-'} status={status_name(p.status)}"
        for p in message.upserted
    ]
    lines += [f"{rev} removed {plugin_id}" for plugin_id in message.removed_plugin_ids]
    return lines


def revision_lines(messages: Sequence[pb.WatchResponse]) -> list[str]:
    """A whole revision (its messages, in order; see :mod:`registry.revisions`) for people.

    As :func:`watch_lines` of one message holding them all: a split snapshot gets one
    header counting every plugin in it.
    """
    if not messages:
        return []
    first = messages[0]
    whole = pb.WatchResponse(
        revision=first.revision,
        snapshot=first.snapshot,
        removed_plugin_ids=first.removed_plugin_ids,
    )
    for message in messages:
        whole.upserted.extend(message.upserted)
    return watch_lines(whole)


def _enum_name(enum: Any, prefix: str, value: int) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def _stamp(plugin: pb.RegisteredPlugin, field: str) -> Timestamp | None:
    return getattr(plugin, field) if plugin.HasField(field) else None


def _when(stamp: Timestamp | None, now: datetime) -> str:
    if stamp is None:
        return ""
    moment = stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")
    return f"{moment} ({age(stamp, now)})"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
