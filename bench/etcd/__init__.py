"""etcd 3.4 as a benchmark peer: its own gRPC stubs (generated) and its server process.

The one door to the generated code in ``_pb`` (``gen.py`` makes it from ``proto/``)::

    from bench.etcd import kv, rpc, rpc_grpc, Etcd

``Etcd`` runs the Debian ``etcd-server`` binary on loopback ports of its own.
"""

from __future__ import annotations

from bench.etcd._pb.etcd.etcdserver.etcdserverpb import rpc_pb2 as rpc
from bench.etcd._pb.etcd.etcdserver.etcdserverpb import rpc_pb2_grpc as rpc_grpc
from bench.etcd._pb.etcd.mvcc.mvccpb import kv_pb2 as kv
from bench.etcd.server import MISSING, Etcd, etcd_binary, prefix_end

__all__ = ["MISSING", "Etcd", "etcd_binary", "kv", "prefix_end", "rpc", "rpc_grpc"]
