"""A POLKU emitter plugin: each event out as one JSON line on stdout, once per id.

    python examples/stdout_emitter.py --registry 127.0.0.1:50051

It registers as the emitter ``stdout`` (``--emitter-name``). Each event becomes a line
``{"id": …, "source": …, "type": …, "payload": …}`` (the payload decoded as UTF-8,
replacing what is not). The gateway delivers at least once (it resends after a
failure it could not see the end of), so the emitter is idempotent by ``Event.id``: an
id it printed lately (the last ``--remember`` ids) is acknowledged and not printed
again. An event without an id is refused, non-retryably, since it could not be
deduplicated. ``Shutdown`` (the gateway closing) flushes stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TextIO

from registry.sdk import run_plugin
from registry.wire import pb


class StdoutEmitter:
    """Prints events as JSON lines, skipping ids it printed among the last ``remember``."""

    def __init__(self, remember: int = 100_000, out: TextIO | None = None) -> None:
        self.remember = remember
        self._out = out
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()  # plain handlers run in a thread pool

    def emit(self, request: pb.EmitRequest) -> pb.EmitResponse:
        out = self._out or sys.stdout
        response = pb.EmitResponse()
        with self._lock:
            for event in request.events:
                if not event.id:
                    response.errors.append(
                        pb.EmitError(event_id="", message="an event needs an id", retryable=False)
                    )
                    continue
                if event.id not in self._seen:
                    line = {
                        "id": event.id,
                        "source": event.source,
                        "type": event.event_type,
                        "payload": event.payload.decode("utf-8", "replace"),
                    }
                    print(json.dumps(line), file=out)
                    self._seen[event.id] = None
                    if len(self._seen) > self.remember:
                        self._seen.popitem(last=False)
                response.success_count += 1
            out.flush()
        return response

    def shutdown(self) -> pb.ShutdownResponse:
        (self._out or sys.stdout).flush()
        return pb.ShutdownResponse(success=True, message="flushed")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--registry", default=None, help="else $POLKU_REGISTRY")
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--advertise", default=None)
    parser.add_argument("--name", default="stdout-emitter")
    parser.add_argument("--emitter-name", default="stdout")
    parser.add_argument("--lease-ttl", type=int, default=0)
    parser.add_argument("--remember", type=int, default=100_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    run_plugin(
        {"name": args.name, "version": "1.0.0", "emitter_name": args.emitter_name},
        StdoutEmitter(args.remember),
        registry=args.registry,
        listen=args.listen,
        advertise=args.advertise,
        lease_ttl_seconds=args.lease_ttl,
    )


if __name__ == "__main__":
    main()
