"""The committed generated code is exactly what scripts/gen_protos.py makes from proto/.

Also pins the upstream field numbers (SPEC §1.1) and this project's additions (§1.2),
so that a renumbering cannot slip through a regeneration.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor

from registry.wire import event_pb, pb

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "registry" / "_pb"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tree(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_regenerating_changes_nothing(tmp_path):
    out = tmp_path / "_pb"
    load_generator().generate(out)
    generated, committed = tree(out), tree(COMMITTED)
    assert sorted(generated) == sorted(committed)
    changed = [name for name in generated if generated[name] != committed[name]]
    assert changed == [], "run: python scripts/gen_protos.py"


def fields(message: Descriptor) -> dict[str, int]:
    return {f.name: f.number for f in message.fields}


def values(enum: EnumDescriptor) -> dict[str, int]:
    return {v.name: v.number for v in enum.values}


UPSTREAM_MESSAGES = {
    (event_pb, "Event"): {
        "id": 1,
        "timestamp_unix_ns": 2,
        "source": 3,
        "event_type": 4,
        "metadata": 5,
        "payload": 6,
        "route_to": 7,
        "severity": 10,
        "outcome": 11,
    },
    (pb, "PluginInfo"): {
        "name": 1,
        "version": 2,
        "type": 3,
        "description": 4,
        "sources": 5,
        "emitter_name": 6,
        "capabilities": 7,
    },
    (pb, "IngestRequest"): {"source": 1, "cluster": 2, "format": 3, "data": 4},
    (pb, "IngestResponse"): {"events": 1, "errors": 2},
    (pb, "IngestError"): {"message": 1, "details": 2, "offset": 3},
    (pb, "EmitRequest"): {"events": 1},
    (pb, "EmitResponse"): {"success_count": 1, "failed_event_ids": 2, "errors": 3},
    (pb, "EmitError"): {"event_id": 1, "message": 2, "retryable": 3},
    (pb, "ShutdownResponse"): {"success": 1, "message": 2},
    (pb, "PluginHealthResponse"): {"healthy": 1, "message": 2, "components": 3},
    (pb, "HeartbeatRequest"): {"plugin_id": 1},
    (pb, "HeartbeatResponse"): {"acknowledged": 1},
    (pb, "UnregisterRequest"): {"plugin_id": 1},
}


@pytest.mark.parametrize(
    ("module", "message", "expected"),
    [(module, name, expected) for (module, name), expected in UPSTREAM_MESSAGES.items()],
    ids=[name for _, name in UPSTREAM_MESSAGES],
)
def test_upstream_messages_keep_their_field_numbers(module, message, expected):
    assert fields(module.DESCRIPTOR.message_types_by_name[message]) == expected


def test_register_messages_keep_upstream_numbers_and_add_after_them():
    request = fields(pb.RegisterRequest.DESCRIPTOR)
    assert request["info"] == 1
    assert request["address"] == 2
    assert request["lease_ttl_seconds"] == 3
    assert request["labels"] == 4
    response = fields(pb.RegisterResponse.DESCRIPTOR)
    assert response["accepted"] == 1
    assert response["message"] == 2
    assert response["plugin_id"] == 3
    assert response["lease_ttl_seconds"] == 4
    assert response["heartbeat_interval_seconds"] == 5


def test_field_types_of_the_additions():
    uint32 = pb.RegisterRequest.DESCRIPTOR.fields_by_name["info"].TYPE_UINT32
    for message, name in [
        (pb.RegisterRequest, "lease_ttl_seconds"),
        (pb.RegisterResponse, "lease_ttl_seconds"),
        (pb.RegisterResponse, "heartbeat_interval_seconds"),
    ]:
        assert message.DESCRIPTOR.fields_by_name[name].type == uint32
    labels = pb.RegisterRequest.DESCRIPTOR.fields_by_name["labels"]
    assert labels.message_type.GetOptions().map_entry


def test_upstream_enums():
    assert values(event_pb.DESCRIPTOR.enum_types_by_name["Severity"]) == {
        "SEVERITY_UNSPECIFIED": 0,
        "SEVERITY_DEBUG": 1,
        "SEVERITY_INFO": 2,
        "SEVERITY_WARNING": 3,
        "SEVERITY_ERROR": 4,
        "SEVERITY_CRITICAL": 5,
    }
    assert values(event_pb.DESCRIPTOR.enum_types_by_name["Outcome"]) == {
        "OUTCOME_UNSPECIFIED": 0,
        "OUTCOME_SUCCESS": 1,
        "OUTCOME_FAILURE": 2,
        "OUTCOME_TIMEOUT": 3,
        "OUTCOME_UNKNOWN": 4,
    }
    assert values(pb.DESCRIPTOR.enum_types_by_name["PluginType"]) == {
        "PLUGIN_TYPE_UNSPECIFIED": 0,
        "PLUGIN_TYPE_INGESTOR": 1,
        "PLUGIN_TYPE_EMITTER": 2,
    }
    assert values(pb.DESCRIPTOR.enum_types_by_name["PluginStatus"]) == {
        "PLUGIN_STATUS_UNSPECIFIED": 0,
        "PLUGIN_STATUS_UNKNOWN": 1,
        "PLUGIN_STATUS_HEALTHY": 2,
        "PLUGIN_STATUS_UNHEALTHY": 3,
        "PLUGIN_STATUS_EXPIRED": 4,
        "PLUGIN_STATUS_DRAINING": 5,
    }


def test_packages_and_services():
    assert event_pb.DESCRIPTOR.package == "polku.event.v1"
    assert pb.DESCRIPTOR.package == "polku.v1"
    methods = {
        name: {m.name: (m.input_type.full_name, m.output_type.full_name) for m in s.methods}
        for name, s in pb.DESCRIPTOR.services_by_name.items()
    }
    empty = "google.protobuf.Empty"
    assert methods["IngestorPlugin"] == {
        "Info": (empty, "polku.v1.PluginInfo"),
        "Health": (empty, "polku.v1.PluginHealthResponse"),
        "Ingest": ("polku.v1.IngestRequest", "polku.v1.IngestResponse"),
    }
    assert methods["EmitterPlugin"] == {
        "Info": (empty, "polku.v1.PluginInfo"),
        "Health": (empty, "polku.v1.PluginHealthResponse"),
        "Emit": ("polku.v1.EmitRequest", "polku.v1.EmitResponse"),
        "Shutdown": (empty, "polku.v1.ShutdownResponse"),
    }
    registry = methods["PluginRegistry"]
    assert registry["Register"] == ("polku.v1.RegisterRequest", "polku.v1.RegisterResponse")
    assert registry["Heartbeat"] == ("polku.v1.HeartbeatRequest", "polku.v1.HeartbeatResponse")
    assert registry["Unregister"] == ("polku.v1.UnregisterRequest", empty)
    assert registry["GetPlugin"] == ("polku.v1.GetPluginRequest", "polku.v1.RegisteredPlugin")
    watch = pb.DESCRIPTOR.services_by_name["PluginRegistry"].methods_by_name["Watch"]
    assert watch.server_streaming
    assert not watch.client_streaming


def test_registered_plugin_fields():
    assert set(fields(pb.RegisteredPlugin.DESCRIPTOR)) == {
        "plugin_id",
        "info",
        "address",
        "status",
        "registered_at",
        "last_heartbeat_at",
        "last_check_at",
        "last_error",
        "lease_ttl_seconds",
        "labels",
        "revision",
    }
    assert set(fields(pb.Endpoint.DESCRIPTOR)) == {"plugin_id", "address", "status"}
    assert set(fields(pb.WatchResponse.DESCRIPTOR)) == {
        "revision",
        "snapshot",
        "upserted",
        "removed_plugin_ids",
    }
