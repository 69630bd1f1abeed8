import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from registry._pb.polku.event.v1 import event_pb2 as _event_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PluginType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLUGIN_TYPE_UNSPECIFIED: _ClassVar[PluginType]
    PLUGIN_TYPE_INGESTOR: _ClassVar[PluginType]
    PLUGIN_TYPE_EMITTER: _ClassVar[PluginType]

class PluginStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLUGIN_STATUS_UNSPECIFIED: _ClassVar[PluginStatus]
    PLUGIN_STATUS_UNKNOWN: _ClassVar[PluginStatus]
    PLUGIN_STATUS_HEALTHY: _ClassVar[PluginStatus]
    PLUGIN_STATUS_UNHEALTHY: _ClassVar[PluginStatus]
    PLUGIN_STATUS_EXPIRED: _ClassVar[PluginStatus]
    PLUGIN_STATUS_DRAINING: _ClassVar[PluginStatus]

class ReplicaRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_ROLE_UNSPECIFIED: _ClassVar[ReplicaRole]
    REPLICA_ROLE_LEADER: _ClassVar[ReplicaRole]
    REPLICA_ROLE_FOLLOWER: _ClassVar[ReplicaRole]
PLUGIN_TYPE_UNSPECIFIED: PluginType
PLUGIN_TYPE_INGESTOR: PluginType
PLUGIN_TYPE_EMITTER: PluginType
PLUGIN_STATUS_UNSPECIFIED: PluginStatus
PLUGIN_STATUS_UNKNOWN: PluginStatus
PLUGIN_STATUS_HEALTHY: PluginStatus
PLUGIN_STATUS_UNHEALTHY: PluginStatus
PLUGIN_STATUS_EXPIRED: PluginStatus
PLUGIN_STATUS_DRAINING: PluginStatus
REPLICA_ROLE_UNSPECIFIED: ReplicaRole
REPLICA_ROLE_LEADER: ReplicaRole
REPLICA_ROLE_FOLLOWER: ReplicaRole

class PluginInfo(_message.Message):
    __slots__ = ("name", "version", "type", "description", "sources", "emitter_name", "capabilities")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    EMITTER_NAME_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    type: PluginType
    description: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    emitter_name: str
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., type: _Optional[_Union[PluginType, str]] = ..., description: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., emitter_name: _Optional[str] = ..., capabilities: _Optional[_Iterable[str]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("source", "cluster", "format", "data")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    source: str
    cluster: str
    format: str
    data: bytes
    def __init__(self, source: _Optional[str] = ..., cluster: _Optional[str] = ..., format: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("events", "errors")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_event_pb2.Event]
    errors: _containers.RepeatedCompositeFieldContainer[IngestError]
    def __init__(self, events: _Optional[_Iterable[_Union[_event_pb2.Event, _Mapping]]] = ..., errors: _Optional[_Iterable[_Union[IngestError, _Mapping]]] = ...) -> None: ...

class IngestError(_message.Message):
    __slots__ = ("message", "details", "offset")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    message: str
    details: str
    offset: int
    def __init__(self, message: _Optional[str] = ..., details: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class EmitRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_event_pb2.Event]
    def __init__(self, events: _Optional[_Iterable[_Union[_event_pb2.Event, _Mapping]]] = ...) -> None: ...

class EmitResponse(_message.Message):
    __slots__ = ("success_count", "failed_event_ids", "errors")
    SUCCESS_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILED_EVENT_IDS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    success_count: int
    failed_event_ids: _containers.RepeatedScalarFieldContainer[str]
    errors: _containers.RepeatedCompositeFieldContainer[EmitError]
    def __init__(self, success_count: _Optional[int] = ..., failed_event_ids: _Optional[_Iterable[str]] = ..., errors: _Optional[_Iterable[_Union[EmitError, _Mapping]]] = ...) -> None: ...

class EmitError(_message.Message):
    __slots__ = ("event_id", "message", "retryable")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    message: str
    retryable: bool
    def __init__(self, event_id: _Optional[str] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class ShutdownResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class PluginHealthResponse(_message.Message):
    __slots__ = ("healthy", "message", "components")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    healthy: bool
    message: str
    components: _containers.ScalarMap[str, bool]
    def __init__(self, healthy: _Optional[bool] = ..., message: _Optional[str] = ..., components: _Optional[_Mapping[str, bool]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("info", "address", "lease_ttl_seconds", "labels", "no_lease")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INFO_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    NO_LEASE_FIELD_NUMBER: _ClassVar[int]
    info: PluginInfo
    address: str
    lease_ttl_seconds: int
    labels: _containers.ScalarMap[str, str]
    no_lease: bool
    def __init__(self, info: _Optional[_Union[PluginInfo, _Mapping]] = ..., address: _Optional[str] = ..., lease_ttl_seconds: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., no_lease: _Optional[bool] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("accepted", "message", "plugin_id", "lease_ttl_seconds", "heartbeat_interval_seconds")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    plugin_id: str
    lease_ttl_seconds: int
    heartbeat_interval_seconds: int
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., plugin_id: _Optional[str] = ..., lease_ttl_seconds: _Optional[int] = ..., heartbeat_interval_seconds: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("plugin_id",)
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    def __init__(self, plugin_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("acknowledged",)
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    acknowledged: bool
    def __init__(self, acknowledged: _Optional[bool] = ...) -> None: ...

class UnregisterRequest(_message.Message):
    __slots__ = ("plugin_id",)
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    def __init__(self, plugin_id: _Optional[str] = ...) -> None: ...

class RegisteredPlugin(_message.Message):
    __slots__ = ("plugin_id", "info", "address", "status", "registered_at", "last_heartbeat_at", "last_check_at", "last_error", "lease_ttl_seconds", "labels", "revision")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECK_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    info: PluginInfo
    address: str
    status: PluginStatus
    registered_at: _timestamp_pb2.Timestamp
    last_heartbeat_at: _timestamp_pb2.Timestamp
    last_check_at: _timestamp_pb2.Timestamp
    last_error: str
    lease_ttl_seconds: int
    labels: _containers.ScalarMap[str, str]
    revision: int
    def __init__(self, plugin_id: _Optional[str] = ..., info: _Optional[_Union[PluginInfo, _Mapping]] = ..., address: _Optional[str] = ..., status: _Optional[_Union[PluginStatus, str]] = ..., registered_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_check_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_error: _Optional[str] = ..., lease_ttl_seconds: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., revision: _Optional[int] = ...) -> None: ...

class ListPluginsRequest(_message.Message):
    __slots__ = ("type", "source", "statuses", "name", "page_size", "page_token", "label_selector")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    type: PluginType
    source: str
    statuses: _containers.RepeatedScalarFieldContainer[PluginStatus]
    name: str
    page_size: int
    page_token: str
    label_selector: str
    def __init__(self, type: _Optional[_Union[PluginType, str]] = ..., source: _Optional[str] = ..., statuses: _Optional[_Iterable[_Union[PluginStatus, str]]] = ..., name: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., label_selector: _Optional[str] = ...) -> None: ...

class ListPluginsResponse(_message.Message):
    __slots__ = ("plugins", "revision", "next_page_token")
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    plugins: _containers.RepeatedCompositeFieldContainer[RegisteredPlugin]
    revision: int
    next_page_token: str
    def __init__(self, plugins: _Optional[_Iterable[_Union[RegisteredPlugin, _Mapping]]] = ..., revision: _Optional[int] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetPluginRequest(_message.Message):
    __slots__ = ("plugin_id",)
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    def __init__(self, plugin_id: _Optional[str] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("source", "emitter_name", "label_selector")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    EMITTER_NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    source: str
    emitter_name: str
    label_selector: str
    def __init__(self, source: _Optional[str] = ..., emitter_name: _Optional[str] = ..., label_selector: _Optional[str] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("plugin_id", "address", "status")
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    address: str
    status: PluginStatus
    def __init__(self, plugin_id: _Optional[str] = ..., address: _Optional[str] = ..., status: _Optional[_Union[PluginStatus, str]] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("endpoints", "revision")
    ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    endpoints: _containers.RepeatedCompositeFieldContainer[Endpoint]
    revision: int
    def __init__(self, endpoints: _Optional[_Iterable[_Union[Endpoint, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("since_revision", "sources", "label_selector")
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    sources: _containers.RepeatedScalarFieldContainer[str]
    label_selector: str
    def __init__(self, since_revision: _Optional[int] = ..., sources: _Optional[_Iterable[str]] = ..., label_selector: _Optional[str] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("revision", "snapshot", "upserted", "removed_plugin_ids")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    UPSERTED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_PLUGIN_IDS_FIELD_NUMBER: _ClassVar[int]
    revision: int
    snapshot: bool
    upserted: _containers.RepeatedCompositeFieldContainer[RegisteredPlugin]
    removed_plugin_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, revision: _Optional[int] = ..., snapshot: _Optional[bool] = ..., upserted: _Optional[_Iterable[_Union[RegisteredPlugin, _Mapping]]] = ..., removed_plugin_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released", "principal", "sources", "emitter_names")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    EMITTER_NAMES_FIELD_NUMBER: _ClassVar[int]
    released: bool
    principal: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    emitter_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, released: _Optional[bool] = ..., principal: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., emitter_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("address", "role", "epoch", "applied_revision", "lag", "last_seen", "up")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    address: str
    role: ReplicaRole
    epoch: int
    applied_revision: int
    lag: int
    last_seen: _timestamp_pb2.Timestamp
    up: bool
    def __init__(self, address: _Optional[str] = ..., role: _Optional[_Union[ReplicaRole, str]] = ..., epoch: _Optional[int] = ..., applied_revision: _Optional[int] = ..., lag: _Optional[int] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., up: _Optional[bool] = ...) -> None: ...

class RegistryStatus(_message.Message):
    __slots__ = ("address", "role", "leader", "epoch", "revision", "replicas", "backend")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LEADER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    address: str
    role: ReplicaRole
    leader: str
    epoch: int
    revision: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaStatus]
    backend: str
    def __init__(self, address: _Optional[str] = ..., role: _Optional[_Union[ReplicaRole, str]] = ..., leader: _Optional[str] = ..., epoch: _Optional[int] = ..., revision: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaStatus, _Mapping]]] = ..., backend: _Optional[str] = ...) -> None: ...

class ForwardedHeartbeat(_message.Message):
    __slots__ = ("plugin_id", "principal")
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    principal: str
    def __init__(self, plugin_id: _Optional[str] = ..., principal: _Optional[str] = ...) -> None: ...

class HeartbeatBatch(_message.Message):
    __slots__ = ("heartbeats",)
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    heartbeats: _containers.RepeatedCompositeFieldContainer[ForwardedHeartbeat]
    def __init__(self, heartbeats: _Optional[_Iterable[_Union[ForwardedHeartbeat, _Mapping]]] = ...) -> None: ...

class HeartbeatBatchResult(_message.Message):
    __slots__ = ("refused",)
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    refused: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, refused: _Optional[_Iterable[str]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("plugin_id", "name", "undrain")
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UNDRAIN_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    name: str
    undrain: bool
    def __init__(self, plugin_id: _Optional[str] = ..., name: _Optional[str] = ..., undrain: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("plugins", "revision")
    PLUGINS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    plugins: _containers.RepeatedCompositeFieldContainer[RegisteredPlugin]
    revision: int
    def __init__(self, plugins: _Optional[_Iterable[_Union[RegisteredPlugin, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("plugin_id",)
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    def __init__(self, plugin_id: _Optional[str] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("plugin_id", "acknowledged", "lease_ttl_seconds")
    PLUGIN_ID_FIELD_NUMBER: _ClassVar[int]
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    plugin_id: str
    acknowledged: bool
    lease_ttl_seconds: int
    def __init__(self, plugin_id: _Optional[str] = ..., acknowledged: _Optional[bool] = ..., lease_ttl_seconds: _Optional[int] = ...) -> None: ...
