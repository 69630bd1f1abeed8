"""Random RegisterRequests over the wire to one registry: only the expected codes, ever.

The registry runs on its own event-loop thread for the whole test (not per example);
each hypothesis example sends one request through ``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loop_thread import LoopThread

from registry.server import RegistryServer
from registry.testing import running_registry
from registry.wire import pb, pb_grpc

T = TypeVar("T")

# The registry's health checker draws its jitter from the global ``random`` on its own
# thread while hypothesis generates the next example; hypothesis takes that for a
# strategy using ``random``. It is not one.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies"
    ":hypothesis.errors.HypothesisDeprecationWarning"
)

MAX_MESSAGE = 64 * 1024
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Harness:
    """One registry and one channel to it, living on a LoopThread."""

    def __init__(self, folder: Path) -> None:
        self.thread = LoopThread()
        self._folder = folder
        self._context: Any = None
        self.server: RegistryServer | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.PluginRegistryStub | None = None

    async def _start(self) -> None:
        self._context = running_registry(self._folder, max_message_bytes=MAX_MESSAGE)
        self.server = await self._context.__aenter__()
        self.channel = grpc.aio.insecure_channel(self.server.address)
        self.stub = pb_grpc.PluginRegistryStub(self.channel)

    async def _stop(self) -> None:
        channel, self.channel, self.stub = self.channel, None, None
        if channel is not None:
            await channel.close()
        if self._context is not None:
            await self._context.__aexit__(None, None, None)

    async def _register(self, request: pb.RegisterRequest) -> tuple[grpc.StatusCode, str, str]:
        assert self.stub is not None
        try:
            response = await self.stub.Register(request, timeout=20)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", ""
        return grpc.StatusCode.OK, "", response.plugin_id

    def register(self, request: pb.RegisterRequest) -> tuple[grpc.StatusCode, str, str]:
        return self.thread.run(self._register(request))

    async def _call(self, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
        try:
            await getattr(self.stub, method)(request, timeout=20)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    def call(self, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
        """Any unary RPC of the registry by name; returns its status code and details."""
        return self.thread.run(self._call(method, request))

    async def _list_ids(self) -> list[str]:
        assert self.stub is not None
        ids: list[str] = []
        request = pb.ListPluginsRequest(page_size=100)
        while True:
            response = await self.stub.ListPlugins(request, timeout=20)
            ids.extend(p.plugin_id for p in response.plugins)
            if not response.next_page_token:
                return ids
            request.page_token = response.next_page_token

    def list_ids(self) -> list[str]:
        return self.thread.run(self._list_ids())


@contextmanager
def harness(folder: Path) -> Iterator[Harness]:
    h = Harness(folder)
    try:
        h.thread.run(h._start())
        yield h
    finally:
        try:
            h.thread.run(h._stop())
        finally:
            h.thread.close()


# -- strategies ---------------------------------------------------------------
# Each example picks a few fields to get wrong (often none) and fills the others with
# valid values from small pools, so that accepted, refused and conflicting
# registrations (shared names and sources) all happen.

NAMES = ["alpha", "beta", "gamma", "a.b-c_d", "x" * 63]
SOURCES = ["k8s", "syslog", "audit", "metrics", "a/b:c"]
FIELDS = [
    "info",
    "name",
    "type",
    "address",
    "sources",
    "emitter_name",
    "version",
    "description",
    "capabilities",
    "labels",
    "lease",
]

texts = st.text(max_size=40)


hosts = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "plugin.svc"])
bad_hosts = st.sampled_from(["", "[zz]", "bad host", "[::1", "-x"])
good_ports = st.integers(1, 65535).map(str)
bad_ports = st.one_of(st.integers(-5, 70000).map(str), st.sampled_from(["", "abc", "0", "65536"]))

VALID: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(NAMES),
    "type": st.sampled_from([1, 2]),
    "address": st.one_of(
        st.builds(
            lambda s, h, p: f"{s}{h}:{p}",
            st.sampled_from(["", "http://", "https://"]),
            hosts,
            st.sampled_from(["1", "50051", "65535"]),
        ),
        st.just("unix:/tmp/p.sock"),
    ),
    "sources": st.lists(st.sampled_from(SOURCES), min_size=1, max_size=3, unique=True),
    "emitter_name": st.one_of(st.just(""), st.sampled_from(NAMES)),
    "version": st.sampled_from(["", "1.0.0", "v" * 64]),
    "description": st.sampled_from(["", "a plugin", "d" * 1024]),
    "capabilities": st.lists(st.sampled_from(["batch", "gzip", "json"]), max_size=3, unique=True),
    "labels": st.dictionaries(
        st.sampled_from(["team", "zone", "k8s.io/x"]), st.text("xyz-", max_size=5), max_size=3
    ),
    "lease": st.one_of(
        st.tuples(st.sampled_from([0, 3, 30, 3600]), st.just(False)), st.just((0, True))
    ),
}
GARBAGE: dict[str, st.SearchStrategy[Any]] = {
    "name": st.one_of(texts, st.just(""), st.just("a" * 64)),
    "type": st.one_of(st.just(0), st.just(99), st.integers(-(2**31), 2**31 - 1)),
    "address": st.one_of(
        st.builds(
            lambda s, h, p: f"{s}{h}:{p}",
            st.sampled_from(["", "ftp://", "http://"]),
            st.one_of(hosts, bad_hosts),
            st.one_of(good_ports, bad_ports),
        ),
        st.sampled_from(["unix:relative", "unix:", "", "localhost"]),
        texts,
        # Unicode digits in a port ("²" once answered INTERNAL).
        st.builds(lambda p: f"h:{p}", st.text("²³¹١٢٣٠", min_size=1, max_size=5)),
    ),
    "sources": st.one_of(
        st.lists(st.sampled_from(SOURCES), max_size=4),
        st.lists(texts, max_size=3),
        st.lists(st.text("abcdef", min_size=1, max_size=5), min_size=65, max_size=66, unique=True),
    ),
    "emitter_name": st.one_of(texts, st.just("e" * 64)),
    "version": st.one_of(texts, st.just("v" * 65)),
    "description": st.one_of(texts, st.just("d" * 1025), st.just("h" * (MAX_MESSAGE + 1))),
    "capabilities": st.lists(texts, max_size=3),
    "labels": st.one_of(
        st.dictionaries(texts, texts, max_size=3),
        st.dictionaries(st.text("abc", min_size=1, max_size=6), st.just("v"), min_size=33),
    ),
    "lease": st.tuples(
        st.one_of(st.sampled_from([1, 2, 3601]), st.integers(0, 2**32 - 1)), st.booleans()
    ),
}


@st.composite
def register_requests(draw: st.DrawFn) -> pb.RegisterRequest:
    bad = draw(st.sets(st.sampled_from(FIELDS), max_size=3))

    def value(field: str) -> Any:
        return draw(GARBAGE[field] if field in bad else VALID[field])

    ttl, no_lease = value("lease")
    request = pb.RegisterRequest(
        address=value("address"), lease_ttl_seconds=ttl, labels=value("labels"), no_lease=no_lease
    )
    if "info" not in bad:
        request.info.CopyFrom(
            pb.PluginInfo(
                name=value("name"),
                version=value("version"),
                type=value("type"),
                description=value("description"),
                sources=value("sources"),
                emitter_name=value("emitter_name"),
                capabilities=value("capabilities"),
            )
        )
    return request


def test_random_registrations_get_only_expected_answers(tmp_path):
    with harness(tmp_path) as h:
        accepted: dict[tuple[str, str], str] = {}
        codes: dict[grpc.StatusCode, int] = {}

        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(register_requests())
        def send(request: pb.RegisterRequest) -> None:
            code, details, plugin_id = h.register(request)
            codes[code] = codes.get(code, 0) + 1
            assert code in EXPECTED, f"{code.name}: {details} for {request!r:.500}"
            if code == grpc.StatusCode.OK:
                assert plugin_id
                # The same (name, address) replaces the previous instance.
                accepted[(request.info.name, request.address)] = plugin_id

        send()

        # Accepted, refused and conflicting requests were all among the random ones.
        assert codes.get(grpc.StatusCode.OK, 0) > 0, codes
        assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 0, codes
        assert codes.get(grpc.StatusCode.ALREADY_EXISTS, 0) > 0, codes

        # The registry still serves, and lists exactly the instances still registered.
        code, details, plugin_id = h.register(
            pb.RegisterRequest(
                info=pb.PluginInfo(name="after-the-storm", type=1, sources=["after-the-storm"]),
                address="127.0.0.1:1",
            )
        )
        assert code == grpc.StatusCode.OK, details
        accepted[("after-the-storm", "127.0.0.1:1")] = plugin_id
        listed = h.list_ids()
        assert len(listed) == len(set(listed))
        assert set(listed) == set(accepted.values())


ids = st.one_of(st.just(""), texts, st.just("01ARZ3NDEKTSV4RRFFQ69G5FAV"), st.just("i" * 65))
read_requests = st.one_of(
    st.builds(lambda i: ("Heartbeat", pb.HeartbeatRequest(plugin_id=i)), ids),
    st.builds(lambda i: ("Unregister", pb.UnregisterRequest(plugin_id=i)), ids),
    st.builds(lambda i: ("GetPlugin", pb.GetPluginRequest(plugin_id=i)), ids),
    st.builds(lambda s: ("Resolve", pb.ResolveRequest(source=s)), texts),
    st.builds(lambda e: ("Resolve", pb.ResolveRequest(emitter_name=e)), texts),
    st.just(("Resolve", pb.ResolveRequest())),
    st.builds(
        lambda t, ss, src, name, size, token: (
            "ListPlugins",
            pb.ListPluginsRequest(
                type=t, statuses=ss, source=src, name=name, page_size=size, page_token=token
            ),
        ),
        st.one_of(st.sampled_from([0, 1, 2, 99]), st.integers(-(2**31), 2**31 - 1)),
        st.lists(st.one_of(st.integers(0, 5), st.integers(-(2**31), 2**31 - 1)), max_size=3),
        st.one_of(st.sampled_from(["", *SOURCES]), texts),
        st.one_of(st.sampled_from(["", *NAMES]), texts),
        st.integers(0, 2**32 - 1),
        st.one_of(
            st.just(""),
            texts,
            st.binary(max_size=30).map(base64.urlsafe_b64encode).map(bytes.decode),
        ),
    ),
)
READ_EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


def test_random_reads_get_only_expected_answers(tmp_path):
    with harness(tmp_path) as h:
        code, details, plugin_id = h.register(
            pb.RegisterRequest(
                info=pb.PluginInfo(name="alpha", type=1, sources=["k8s"]), address="127.0.0.1:1"
            )
        )
        assert code == grpc.StatusCode.OK, details

        @settings(max_examples=200, deadline=None, database=None)
        @given(read_requests)
        def send(call: tuple[str, Any]) -> None:
            method, request = call
            code, details = h.call(method, request)
            assert code in READ_EXPECTED, f"{method} {code.name}: {details} for {request!r:.300}"

        send()
        assert h.list_ids() == [plugin_id]  # no random id was the real one
