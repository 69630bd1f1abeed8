"""Token buckets, bounded bucket maps and counters behind the per-caller limits (SPEC §6)."""

from __future__ import annotations

import pytest

from registry.trust.auth import CallerLimits, method_scope, parse_peer
from registry.trust.limits import BucketsByKey, KeyedCounter, PeerConnections, TokenBucket


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- TokenBucket ----------------------------------------------------------------


def test_a_bucket_starts_full_and_refills_at_its_rate():
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.25  # half a token
    assert bucket.take() is False
    clock.now += 0.25  # the other half
    assert bucket.take() is True
    assert bucket.take() is False


def test_a_bucket_saves_up_no_more_than_its_burst():
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, burst=5, clock=clock)
    clock.now += 3600
    assert sum(bucket.take() for _ in range(20)) == 5


def test_a_clock_stepping_back_neither_drains_nor_fills_a_bucket():
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, burst=2, clock=clock)
    assert bucket.take()
    clock.now -= 100
    assert bucket.take()
    assert not bucket.take()
    clock.now += 1
    assert bucket.take()


@pytest.mark.parametrize(
    ("rate", "burst", "field"),
    [
        (0, 1, "rate"),
        (-1, 1, "rate"),
        (float("inf"), 1, "rate"),
        (float("nan"), 1, "rate"),
        (1, 0, "burst"),
    ],
)
def test_a_bucket_refuses_nonsense(rate, burst, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TokenBucket(rate, burst)


# -- BucketsByKey ---------------------------------------------------------------


def test_buckets_are_per_key():
    clock = FakeClock()
    buckets = BucketsByKey(rate=1.0, burst=2, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]
    assert buckets.take("b") is True
    clock.now += 1
    assert buckets.take("a") is True
    assert buckets.take("a") is False


def test_the_map_of_buckets_stays_bounded_and_forgets_the_least_recently_used():
    clock = FakeClock()
    buckets = BucketsByKey(rate=1.0, burst=1, max_keys=3, clock=clock)
    for key in ("a", "b", "c"):
        assert buckets.take(key)
    assert buckets.take("a") is False  # "a" is now the most recently used
    assert buckets.take("d")  # evicts "b", the least recently used
    assert len(buckets) == 3
    assert "b" not in buckets
    assert "a" in buckets
    assert buckets.take("a") is False  # "a" kept its empty bucket
    for i in range(10_000):
        buckets.take(f"principal-{i}")
    assert len(buckets) == 3


def test_buckets_by_key_validate():
    with pytest.raises(ValueError, match=r"^max_keys:"):
        BucketsByKey(1.0, 1, max_keys=0)
    with pytest.raises(ValueError, match=r"^rate:"):
        BucketsByKey(0.0, 1)


# -- KeyedCounter ---------------------------------------------------------------


def test_a_counter_holds_at_most_its_limit_per_key():
    counter = KeyedCounter(limit=2)
    assert counter.acquire("a")
    assert counter.acquire("a")
    assert not counter.acquire("a")
    assert counter.acquire("b")
    assert counter.count("a") == 2
    counter.release("a")
    assert counter.count("a") == 1
    assert counter.acquire("a")


def test_a_counter_never_goes_negative_and_forgets_keys_at_zero():
    counter = KeyedCounter(limit=1)
    counter.release("never-acquired")
    assert counter.count("never-acquired") == 0
    assert len(counter) == 0
    assert counter.acquire("a")
    counter.release("a")
    counter.release("a")
    assert counter.count("a") == 0
    assert len(counter) == 0
    # A release too many does not leave room for a second acquisition.
    assert counter.acquire("a")
    assert not counter.acquire("a")


def test_a_counter_validates():
    with pytest.raises(ValueError, match=r"^limit:"):
        KeyedCounter(0)


# -- PeerConnections ------------------------------------------------------------


def test_connections_are_counted_per_host_while_they_have_calls():
    peers = PeerConnections(limit=2)
    assert peers.acquire("10.0.0.1", "10.0.0.1:1")
    assert peers.acquire("10.0.0.1", "10.0.0.1:1")  # a second call, same connection
    assert peers.acquire("10.0.0.1", "10.0.0.1:2")
    assert not peers.acquire("10.0.0.1", "10.0.0.1:3")  # a third connection
    assert peers.acquire("10.0.0.1", "10.0.0.1:2")  # existing connections still work
    assert peers.acquire("10.0.0.2", "10.0.0.2:3")  # another host
    assert peers.connections("10.0.0.1") == 2
    peers.release("10.0.0.1", "10.0.0.1:1")
    assert peers.connections("10.0.0.1") == 2  # one call is still in flight on :1
    peers.release("10.0.0.1", "10.0.0.1:1")
    assert peers.connections("10.0.0.1") == 1
    assert peers.acquire("10.0.0.1", "10.0.0.1:3")


def test_connections_forget_hosts_without_calls_and_ignore_unknown_releases():
    peers = PeerConnections(limit=1)
    peers.release("10.0.0.9", "10.0.0.9:1")
    assert peers.acquire("10.0.0.1", "10.0.0.1:1")
    peers.release("10.0.0.1", "10.0.0.1:2")
    peers.release("10.0.0.1", "10.0.0.1:1")
    peers.release("10.0.0.1", "10.0.0.1:1")
    assert len(peers) == 0
    assert peers.connections("10.0.0.1") == 0
    with pytest.raises(ValueError, match=r"^limit:"):
        PeerConnections(0)


# -- the pieces of the interceptor that need no server --------------------------


@pytest.mark.parametrize(
    ("peer", "parsed"),
    [
        ("ipv4:127.0.0.1:54321", ("127.0.0.1", "127.0.0.1:54321")),
        ("ipv6:[::1]:5", ("::1", "[::1]:5")),
        ("ipv6:%5B::1%5D:44556", ("::1", "[::1]:44556")),
        ("ipv6:%5Bfe80::1%25eth0%5D:7", ("fe80::1%eth0", "[fe80::1%eth0]:7")),
        ("ipv6:%5B::ffff:10.0.0.1%5D:9", ("10.0.0.1", "[::ffff:10.0.0.1]:9")),
        ("unix:", None),
        ("unix:/tmp/registry.sock", None),
        ("unix-abstract:x", None),
        ("", None),
        ("ipv4:", None),
    ],
)
def test_parse_peer(peer, parsed):
    assert parse_peer(peer) == parsed


def test_method_scopes_deny_by_default():
    prefix = "/polku.v1.PluginRegistry/"
    assert method_scope(prefix + "Register") == "register"
    assert method_scope(prefix + "KeepAlive") == "register"
    assert method_scope(prefix + "Watch") == "read"
    assert method_scope(prefix + "GetStatus") == "read"
    assert method_scope(prefix + "Release") == "admin"
    assert method_scope(prefix + "SomethingNew") == "admin"
    assert method_scope("/grpc.health.v1.Health/Check") is None
    assert method_scope("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    # Another service, whatever its name looks like: the prefix match is exact.
    assert method_scope("/polku.v1.PluginRegistryX/Register") is None


def test_caller_limits_defaults_depend_on_the_mode():
    limits = CallerLimits()
    assert limits.register_bucket(secured=True) == (20.0, 100)
    assert limits.max_streams(secured=True) == 64
    assert limits.register_bucket(secured=False) is None
    assert limits.max_streams(secured=False) is None


def test_caller_limits_set_apply_in_both_modes_and_zero_is_off():
    limits = CallerLimits(register_rate=5, register_burst=7, max_streams_per_principal=3)
    assert limits.register_bucket(secured=False) == (5.0, 7)
    assert limits.max_streams(secured=False) == 3
    off = CallerLimits(register_rate=0, max_streams_per_principal=0)
    assert off.register_bucket(secured=True) is None
    assert off.max_streams(secured=True) is None
    assert CallerLimits(register_burst=0).register_bucket(secured=True) is None
    # A rate set in open mode takes the default burst.
    assert CallerLimits(register_rate=1.5).register_bucket(secured=False) == (1.5, 100)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"max_concurrent_rpcs": 0}, "max_concurrent_rpcs"),
        ({"max_concurrent_rpcs": 1.5}, "max_concurrent_rpcs"),
        ({"max_connections_per_peer": 0}, "max_connections_per_peer"),
        ({"max_connections_per_peer": True}, "max_connections_per_peer"),
        ({"register_rate": -1}, "register_rate"),
        ({"register_rate": float("inf")}, "register_rate"),
        ({"register_rate": "20"}, "register_rate"),
        ({"register_burst": -1}, "register_burst"),
        ({"register_burst": 2.5}, "register_burst"),
        ({"max_streams_per_principal": -3}, "max_streams_per_principal"),
    ],
)
def test_caller_limits_validate_and_name_the_field(fields, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        CallerLimits(**fields)
