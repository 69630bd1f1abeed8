"""The Python example plugins: their transforms, and the CSV one served by a PluginHost.

(The JSON-lines example runs as its own process in test_plugin_process.py.)
"""

from __future__ import annotations

import json
from types import ModuleType

import grpc
import pytest

from registry import RegistryServer
from registry.sdk import PluginHost, ingest_response
from registry.wire import event_pb, pb, pb_grpc

from .conftest import load_example

jsonl = load_example("jsonl_ingestor")
csv_example = load_example("csv_ingestor")


def run(
    module: ModuleType, data: bytes, source: str = "src", cluster: str = ""
) -> pb.IngestResponse:
    return ingest_response(
        module.ingest(pb.IngestRequest(source=source, data=data, cluster=cluster))
    )


def test_jsonl_one_event_per_line_and_an_error_with_the_offset_of_each_bad_line():
    good_1 = b'{"id": "e1", "event_type": "deploy", "severity": "ERROR"}\n'
    bad_1 = b"{oops\n"
    blank = b"   \n"
    bad_2 = b"[1, 2]\r\n"
    good_2 = b'{"type": "login"}'
    response = run(jsonl, good_1 + bad_1 + blank + bad_2 + good_2, cluster="eu")

    first, second = response.events
    assert (first.id, first.event_type, first.source) == ("e1", "deploy", "src")
    assert first.severity == event_pb.SEVERITY_ERROR
    assert first.payload == good_1.strip()
    assert dict(first.metadata) == {"line": "1", "cluster": "eu"}
    assert second.id  # a fresh UUID
    assert (second.event_type, second.metadata["line"]) == ("login", "5")
    assert second.timestamp_unix_ns > 0

    assert [(e.message, e.offset) for e in response.errors] == [
        ("not valid JSON", len(good_1)),
        ("not a JSON object", len(good_1 + bad_1 + blank)),
    ]
    assert response.errors[0].details.startswith("line 2: ")


def test_jsonl_reports_bytes_that_are_not_text_at_their_line():
    response = run(jsonl, b'{"a": 1}\n\xff\xfe{\n')
    assert len(response.events) == 1
    assert [e.offset for e in response.errors] == [9]


def test_csv_one_event_per_row_with_the_row_as_metadata_and_json_payload():
    data = b'\xef\xbb\xbfhost,event_type,note\nweb-1,restart,"a, quoted\nnote"\n\nweb-2,,x\n'
    response = run(csv_example, data)
    assert not response.errors
    first, second = response.events
    assert dict(first.metadata) == {
        "host": "web-1",
        "event_type": "restart",
        "note": "a, quoted\nnote",
    }
    assert first.event_type == "restart"
    assert json.loads(first.payload) == dict(first.metadata)
    assert (second.event_type, second.metadata["host"]) == ("csv.row", "web-2")


def test_csv_a_row_with_the_wrong_number_of_fields_is_an_error_at_its_offset():
    header, good, bad, last = b"a,b\r\n", b"1,2\r\n", b'3,"x\ny",4\r\n', b"5,6"
    response = run(csv_example, header + good + bad + last)
    assert [e.metadata["a"] for e in response.events] == ["1", "5"]
    (error,) = response.errors
    assert error.offset == len(header + good)
    assert error.message == "row has 3 fields; the header has 2"


@pytest.mark.parametrize(
    ("data", "message", "offset"),
    [(b"", "no header row", 0), (b"a,b\n1,\xff\n", "not UTF-8", 6)],
)
def test_csv_payloads_it_cannot_read(data, message, offset):
    response = run(csv_example, data)
    assert not response.events
    assert [(e.message, e.offset) for e in response.errors] == [(message, offset)]


async def test_the_csv_example_served_by_a_plugin_host(registry: RegistryServer) -> None:
    info = {"name": "csv", "sources": ["csv"]}
    async with PluginHost(info, ingest=csv_example.ingest, registry=registry.address) as host:
        await host.wait_registered()
        async with grpc.aio.insecure_channel(host.address) as channel:
            stub = pb_grpc.IngestorPluginStub(channel)
            request = pb.IngestRequest(source="csv", data=b"k,v\none,1\ntwo,2\n")
            response = await stub.Ingest(request, timeout=30)
    assert [e.metadata["k"] for e in response.events] == ["one", "two"]
