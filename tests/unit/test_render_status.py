"""render: the ``status`` table and its JSON."""

from __future__ import annotations

import json

from registry import render
from registry.wire import pb


def replicated() -> pb.RegistryStatus:
    return pb.RegistryStatus(
        address="10.0.0.2:50051",
        role=pb.REPLICA_ROLE_FOLLOWER,
        leader="10.0.0.1:50051",
        epoch=7,
        revision=1234,
        backend="postgresql",
        replicas=[
            pb.ReplicaStatus(
                address="10.0.0.1:50051",
                role=pb.REPLICA_ROLE_LEADER,
                epoch=7,
                applied_revision=1234,
                lag=0,
                up=True,
            ),
            pb.ReplicaStatus(
                address="10.0.0.22:50051",
                role=pb.REPLICA_ROLE_FOLLOWER,
                epoch=6,
                applied_revision=1200,
                lag=34,
                up=False,
            ),
        ],
    )


def test_the_table_opens_with_the_leader_then_aligns_one_row_a_replica() -> None:
    header, columns, first, second = render.status_table(replicated()).splitlines()
    assert header == "leader 10.0.0.1:50051 epoch 7 revision 1234 (postgresql)"
    assert columns.split() == list(render.STATUS_COLUMNS)
    assert first.split() == ["10.0.0.1:50051", "leader", "7", "1234", "0", "yes"]
    assert second.split() == ["10.0.0.22:50051", "follower", "6", "1200", "34", "no"]
    for column in render.STATUS_COLUMNS:  # every cell starts where its header starts
        at = columns.index(column)
        assert first[at] != " ", column
        assert second[at] != " ", column
        assert at == 0 or first[at - 1] == " " == second[at - 1], column


def test_no_leader_shows_a_dash() -> None:
    status = pb.RegistryStatus(epoch=8, revision=5, backend="postgresql")
    header, columns = render.status_table(status).splitlines()
    assert header == "leader - epoch 8 revision 5 (postgresql)"
    assert columns.split() == list(render.STATUS_COLUMNS)


def test_json_is_the_proto_mapping_with_field_names() -> None:
    data = json.loads(render.status_json(replicated()))
    assert data["leader"] == "10.0.0.1:50051"
    assert data["role"] == "REPLICA_ROLE_FOLLOWER"
    assert data["epoch"] == "7"  # int64 as a string, as the protobuf JSON mapping says
    assert data["replicas"][1] == {
        "address": "10.0.0.22:50051",
        "role": "REPLICA_ROLE_FOLLOWER",
        "epoch": "6",
        "applied_revision": "1200",
        "lag": "34",
        "up": False,
    }
