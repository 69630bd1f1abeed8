"""Run every benchmark and print one table: our figure, the baseline, the ratio, the target.

    python -m bench.run            # the full run (a few minutes on 2 cores)
    python -m bench.run --quick    # seconds: keeps the benchmarks working in CI
    python -m bench.run --peer etcd [--quick]   # only the etcd peer suite (needs etcd:
                                                # apt-get install -y etcd-server)

Also writes the rows as JSON (``--json PATH``, default bench/results.json). Prints
numbers, never verdicts: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

SUITES = [
    "bench.registry_bench",
    "bench.ingest_bench",
    "bench.stream_bench",
    "bench.health_bench",
    "bench.trust_bench",
    "bench.watch_bench",
    "bench.isolation_bench",
    "bench.scale_bench",
    "bench.replica_bench",
]
# Peers run only when asked for (``--peer NAME``): they need software the tests never install.
PEERS = {"etcd": "bench.peer_etcd"}


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = ["scenario", "ours", "baseline", "ratio", "target", "unit", "p50_ms", "p99_ms"]
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for line in cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds per suite")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results.json"))
    parser.add_argument(
        "--peer", choices=sorted(PEERS), help="run only this peer's side-by-side suite"
    )
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for name in [PEERS[args.peer]] if args.peer else SUITES:
        started = time.perf_counter()
        suite = importlib.import_module(name)
        suite_rows = suite.run(quick=args.quick)
        print(f"# {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
        rows.extend(suite_rows)
    mode = ("quick" if args.quick else "full") + (f", peer {args.peer}" if args.peer else "")
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, nproc {os.cpu_count()}, {mode}")
    print_table(rows)
    args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
