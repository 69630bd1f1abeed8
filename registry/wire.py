"""The one door to the generated protobuf and gRPC code.

Hand-written code imports wire types from here, never from ``registry._pb``:
``from registry.wire import pb, pb_grpc, event_pb``.
"""

from registry._pb.polku.event.v1 import event_pb2 as event_pb
from registry._pb.polku.v1 import plugin_pb2 as pb
from registry._pb.polku.v1 import plugin_pb2_grpc as pb_grpc

__all__ = ["event_pb", "pb", "pb_grpc"]
