"""The etcd peer benchmark runs end to end, in its smallest form (no figure is judged).

Needs the etcd binary (Debian ``etcd-server``, which the benchmark's setup installs and the
tests never do): skipped without it. Real processes throughout: a registry, etcd, a plugin
server and the watcher processes, all on 127.0.0.1, every load bounded in time.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.etcd import MISSING, etcd_binary
from bench.peer_etcd import main
from bench.peer_etcd_calls import Plan

ROOT = Path(__file__).resolve().parents[2]
# One short repetition of everything, 200 instances for "10,000".
SMOKE = Plan(
    rounds=1,
    seconds=0.2,
    propagations=10,
    big=200,
    list_calls=2,
    idle_seconds=0.5,
    expiry_rounds=1,
    expiry_each=1,
)


@pytest.mark.skipif(etcd_binary() is None, reason=MISSING)
@pytest.mark.timeout(110)
def test_every_row_is_measured_against_etcd():
    rows = asyncio.run(main(SMOKE))
    scenarios = [r["scenario"] for r in rows]
    for expected in [
        "renewal",
        "Resolve vs Range",
        "propagation, 1 watcher(s)",
        "propagation, 100 watcher(s)",
        "expiry",
        "Register vs LeaseGrant+Put",
        "ListPlugins all",
        "load",
        "RSS after a fresh load",
        "RSS after a restart",
        "restart to serving",
        "idle CPU",
    ]:
        assert any(expected in s for s in scenarios), expected
    for r in rows:
        assert r["ours"] >= 0, r
        assert r["baseline"] >= 0, r
    assert all(r["scenario"].startswith("etcd") for r in rows)


def test_the_switch_without_etcd_says_how_to_install_it(tmp_path):
    env = {**os.environ, "ETCD": str(tmp_path / "no-etcd-here")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--peer",
            "etcd",
            "--quick",
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [MISSING]
    assert not (tmp_path / "r.json").exists()
