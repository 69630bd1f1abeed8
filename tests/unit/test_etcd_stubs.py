"""The committed etcd stubs (bench/etcd/_pb) are what bench/etcd/gen.py makes from the
committed protos (bench/etcd/proto), and those keep etcd 3.4's wire names and numbers.

The protos are etcd's own with only the gogoproto and google.api.http options taken out
(bench/etcd/proto/README.md); the numbers pinned here are etcd 3.4.23's.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from google.protobuf.descriptor import Descriptor

from bench.etcd import kv, rpc

ROOT = Path(__file__).resolve().parents[2]
ETCD = ROOT / "bench" / "etcd"


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("etcd_gen", ETCD / "gen.py")
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
    generated, committed = tree(out), tree(ETCD / "_pb")
    assert sorted(generated) == sorted(committed)
    changed = [name for name in generated if generated[name] != committed[name]]
    assert changed == [], "run: python bench/etcd/gen.py"


def test_the_protos_import_only_each_other_and_carry_their_licence():
    protos = sorted((ETCD / "proto").rglob("*.proto"))
    assert [str(p.relative_to(ETCD / "proto")) for p in protos] == [
        "etcd/auth/authpb/auth.proto",
        "etcd/etcdserver/etcdserverpb/rpc.proto",
        "etcd/mvcc/mvccpb/kv.proto",
    ]
    for proto in protos:
        text = proto.read_text()
        assert "gogoproto" not in text
        assert "google.api" not in text
        imports = [line for line in text.splitlines() if line.startswith("import ")]
        assert all(line.startswith('import "etcd/') for line in imports), imports
    assert "Apache License" in (ETCD / "proto" / "LICENSE").read_text()


def test_strip_takes_out_only_the_foreign_options():
    upstream = (
        'syntax = "proto3";\npackage etcdserverpb;\n\nimport "gogoproto/gogo.proto";\n'
        'import "etcd/mvcc/mvccpb/kv.proto";\n\n// for grpc-gateway\n'
        'import "google/api/annotations.proto";\n\noption (gogoproto.marshaler_all) = true;\n\n'
        "service KV {\n  rpc Range(RangeRequest) returns (RangeResponse) {\n"
        '      option (google.api.http) = {\n        post: "/v3/kv/range"\n        body: "*"\n'
        "    };\n  }\n}\n\nmessage M {\n  bytes key = 1 [(gogoproto.nullable) = false];\n}\n"
    )
    assert load_generator().strip(upstream) == (
        'syntax = "proto3";\npackage etcdserverpb;\n\n'
        'import "etcd/mvcc/mvccpb/kv.proto";\n\n\n\n'
        "service KV {\n  rpc Range(RangeRequest) returns (RangeResponse) {\n  }\n}\n\n"
        "message M {\n  bytes key = 1;\n}\n"
    )


def fields(message: Descriptor) -> dict[str, int]:
    return {f.name: f.number for f in message.fields}


def test_the_calls_the_benchmark_makes_keep_their_wire_names():
    services = rpc.DESCRIPTOR.services_by_name
    assert rpc.DESCRIPTOR.package == "etcdserverpb"
    assert {"KV", "Watch", "Lease", "Cluster", "Maintenance", "Auth"} <= set(services)
    kv_methods = services["KV"].methods_by_name
    assert kv_methods["Range"].input_type.full_name == "etcdserverpb.RangeRequest"
    assert kv_methods["Put"].output_type.full_name == "etcdserverpb.PutResponse"
    keep_alive = services["Lease"].methods_by_name["LeaseKeepAlive"]
    assert keep_alive.client_streaming
    assert keep_alive.server_streaming
    watch = services["Watch"].methods_by_name["Watch"]
    assert watch.client_streaming
    assert watch.server_streaming


def test_field_numbers_are_etcds():
    assert fields(rpc.RangeRequest.DESCRIPTOR) == {
        "key": 1,
        "range_end": 2,
        "limit": 3,
        "revision": 4,
        "sort_order": 5,
        "sort_target": 6,
        "serializable": 7,
        "keys_only": 8,
        "count_only": 9,
        "min_mod_revision": 10,
        "max_mod_revision": 11,
        "min_create_revision": 12,
        "max_create_revision": 13,
    }
    assert fields(rpc.RangeResponse.DESCRIPTOR) == {"header": 1, "kvs": 2, "more": 3, "count": 4}
    assert fields(rpc.PutRequest.DESCRIPTOR) == {
        "key": 1,
        "value": 2,
        "lease": 3,
        "prev_kv": 4,
        "ignore_value": 5,
        "ignore_lease": 6,
    }
    assert fields(rpc.LeaseGrantRequest.DESCRIPTOR) == {"TTL": 1, "ID": 2}
    assert fields(rpc.LeaseGrantResponse.DESCRIPTOR) == {"header": 1, "ID": 2, "TTL": 3, "error": 4}
    assert fields(rpc.LeaseKeepAliveRequest.DESCRIPTOR) == {"ID": 1}
    assert fields(rpc.LeaseKeepAliveResponse.DESCRIPTOR) == {"header": 1, "ID": 2, "TTL": 3}
    assert fields(rpc.WatchRequest.DESCRIPTOR) == {
        "create_request": 1,
        "cancel_request": 2,
        "progress_request": 3,
    }
    assert fields(rpc.WatchCreateRequest.DESCRIPTOR) == {
        "key": 1,
        "range_end": 2,
        "start_revision": 3,
        "progress_notify": 4,
        "filters": 5,
        "prev_kv": 6,
        "watch_id": 7,
        "fragment": 8,
    }
    assert fields(rpc.WatchResponse.DESCRIPTOR) == {
        "header": 1,
        "watch_id": 2,
        "created": 3,
        "canceled": 4,
        "compact_revision": 5,
        "cancel_reason": 6,
        "fragment": 7,
        "events": 11,
    }
    assert fields(kv.KeyValue.DESCRIPTOR) == {
        "key": 1,
        "create_revision": 2,
        "mod_revision": 3,
        "version": 4,
        "value": 5,
        "lease": 6,
    }
    assert fields(kv.Event.DESCRIPTOR) == {"type": 1, "kv": 2, "prev_kv": 3}
    assert {v.name: v.number for v in kv.Event.EventType.DESCRIPTOR.values} == {
        "PUT": 0,
        "DELETE": 1,
    }
