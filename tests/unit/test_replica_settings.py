"""The replica settings (SPEC §8): the cluster token, the leader lease, and which
databases make a registry one replica among several."""

from __future__ import annotations

import pytest

from registry.settings import RegistrySettings

PG = "postgresql://postgres@127.0.0.1:5432/registry"
SQLITE = "sqlite:///registry.db"
TOKEN = "c" * 16


def test_a_policy_on_postgresql_requires_a_cluster_token() -> None:
    with pytest.raises(ValueError, match=r"^cluster_token: required") as caught:
        RegistrySettings(database_url=PG, auth_policy="policy.toml")
    assert "POLKU_REGISTRY_CLUSTER_TOKEN" in str(caught.value)


def test_a_policy_on_postgresql_with_a_cluster_token_is_accepted() -> None:
    settings = RegistrySettings(database_url=PG, auth_policy="policy.toml", cluster_token=TOKEN)
    assert settings.replicated
    assert settings.cluster_token == TOKEN


def test_open_mode_on_postgresql_needs_no_cluster_token() -> None:
    assert RegistrySettings(database_url=PG).cluster_token is None


def test_sqlite_with_a_policy_needs_no_cluster_token() -> None:
    settings = RegistrySettings(database_url=SQLITE, auth_policy="policy.toml")
    assert not settings.replicated
    assert settings.cluster_token is None


@pytest.mark.parametrize("token", ["", "c" * 15, "c" * 513])
def test_a_cluster_token_of_the_wrong_length_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match=r"^cluster_token: .*must be 16 to 512 characters"):
        RegistrySettings(database_url=PG, auth_policy="policy.toml", cluster_token=token)


@pytest.mark.parametrize("token", ["c" * 16, "c" * 512])
def test_a_cluster_token_at_the_bounds_is_accepted(token: str) -> None:
    assert RegistrySettings(database_url=PG, cluster_token=token).cluster_token == token


@pytest.mark.parametrize("token", ["c" * 15 + "\n", "c" * 15 + "\x00", "c" * 15 + "\t"])
def test_a_cluster_token_that_is_not_printable_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match=r"^cluster_token: must be printable"):
        RegistrySettings(database_url=PG, cluster_token=token)


def test_a_cluster_token_that_is_not_ascii_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^cluster_token: must be printable ASCII"):
        RegistrySettings(database_url=PG, cluster_token="\u00e9" * 16)


@pytest.mark.parametrize("lease", [0.5, 5.0, 300])
def test_leader_leases_within_bounds_are_accepted(lease: float) -> None:
    assert RegistrySettings(database_url=PG, leader_lease=lease).leader_lease == lease


@pytest.mark.parametrize("lease", [0, -1, 0.49, 300.01, 3600])
def test_leader_leases_out_of_bounds_are_refused(lease: float) -> None:
    with pytest.raises(ValueError, match=r"^leader_lease: .*must be from 0.5 to 300 seconds"):
        RegistrySettings(database_url=PG, leader_lease=lease)


def test_the_default_leader_lease_is_five_seconds() -> None:
    assert RegistrySettings(database_url=PG).leader_lease == 5.0


@pytest.mark.parametrize("interval", [0, -0.1])
def test_the_replica_poll_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ValueError, match=r"^replica_poll_interval: "):
        RegistrySettings(database_url=PG, replica_poll_interval=interval)


@pytest.mark.parametrize(
    "url",
    ["postgresql://u@h/db", "postgres://u@h/db", "postgresql+asyncpg://u@h/db"],
)
def test_postgresql_urls_make_a_replica(url: str) -> None:
    assert RegistrySettings(database_url=url).replicated


@pytest.mark.parametrize("url", [SQLITE, "sqlite+aiosqlite:///x.db", "sqlite://"])
def test_sqlite_urls_do_not(url: str) -> None:
    assert not RegistrySettings(database_url=url).replicated


def test_every_postgresql_url_the_store_takes_needs_the_cluster_token() -> None:
    with pytest.raises(ValueError, match="cluster_token"):
        RegistrySettings(database_url="postgres+asyncpg://u@h/db", auth_policy="policy.toml")


def test_a_refused_cluster_token_is_never_echoed() -> None:
    token = "s3cret-but-too-long-" * 30
    with pytest.raises(ValueError, match=r"^cluster_token: ") as refused:
        RegistrySettings(database_url=PG, cluster_token=token)
    assert "<redacted>" in str(refused.value)
    assert "s3cret" not in str(refused.value)
