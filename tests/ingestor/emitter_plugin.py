"""An SDK emitter plugin process whose sink is a SQLite file, for the emitter tests.

    python tests/ingestor/emitter_plugin.py --registry ADDR --db sink.db [--emitter-name N]
        [--fail ID]... [--retry-once ID]... [--delay SECONDS]

Every Emit it gets is recorded whole in ``received`` (one row per event per delivery,
with this process's pid), and each event id once in ``delivered`` (``INSERT OR
IGNORE``): an idempotent sink shared by every instance pointed at the same file.
``--fail ID`` answers that id as failed for good (``retryable = false``);
``--retry-once ID`` fails it retryably the first time this process sees it, and
accepts it after. ``--delay`` holds each answer (after recording it), so a kill is
likely to land between the sink's write and the gateway's answer. ``Shutdown`` adds
a row to ``shutdowns``. It registers as ``--name`` (``sink``) with a 3 s lease.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import threading
import time

from registry.sdk import run_plugin
from registry.wire import pb

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS received (id TEXT, pid INTEGER)",
    "CREATE TABLE IF NOT EXISTS delivered (id TEXT PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS shutdowns (pid INTEGER)",
)


def open_sink(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in SCHEMA:
        db.execute(statement)
    return db


class SinkEmitter:
    def __init__(self, args: argparse.Namespace) -> None:
        self.db = open_sink(args.db)
        self.fail = set(args.fail)
        self.retry_once = set(args.retry_once)
        self.delay = args.delay
        self.seen_retryable: set[str] = set()
        self.lock = threading.Lock()

    def emit(self, request: pb.EmitRequest) -> pb.EmitResponse:
        response = pb.EmitResponse()
        pid = os.getpid()
        with self.lock:
            accepted = []
            for event in request.events:
                if event.id in self.fail:
                    response.failed_event_ids.append(event.id)
                    response.errors.append(
                        pb.EmitError(event_id=event.id, message="refused", retryable=False)
                    )
                elif event.id in self.retry_once and event.id not in self.seen_retryable:
                    self.seen_retryable.add(event.id)
                    response.failed_event_ids.append(event.id)
                    response.errors.append(
                        pb.EmitError(event_id=event.id, message="busy", retryable=True)
                    )
                else:
                    accepted.append(event.id)
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT INTO received VALUES (?, ?)", [(i, pid) for i in accepted])
            self.db.executemany(
                "INSERT OR IGNORE INTO delivered VALUES (?)", [(i,) for i in accepted]
            )
            self.db.execute("COMMIT")
        response.success_count = len(accepted)
        if self.delay:
            time.sleep(self.delay)
        return response

    def shutdown(self) -> pb.ShutdownResponse:
        with self.lock:
            self.db.execute("INSERT INTO shutdowns VALUES (?)", (os.getpid(),))
        return pb.ShutdownResponse(success=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--name", default="sink")
    parser.add_argument("--emitter-name", default="sink")
    parser.add_argument("--fail", action="append", default=[])
    parser.add_argument("--retry-once", action="append", default=[])
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_plugin(
        {"name": args.name, "emitter_name": args.emitter_name},
        SinkEmitter(args),
        registry=args.registry,
        lease_ttl_seconds=3,
    )


if __name__ == "__main__":
    main()
