"""An SDK plugin for the streaming tests: echoes each payload, tagged with its instance.

    python stream_plugin.py --registry ADDR --name N --source S --instance a [--hold]

Each event's payload is the request's data and its ``metadata["instance"]`` the
``--instance`` given. With ``--hold`` it answers nothing: each request prints
``holding <data>`` and waits for ever (a plugin to SIGKILL with requests in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from registry.sdk import run_plugin
from registry.wire import event_pb, pb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registry", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    never = asyncio.Event()

    async def ingest(request: pb.IngestRequest) -> pb.IngestResponse:
        if args.hold:
            print(f"holding {request.data.decode()}", flush=True)
            await never.wait()
        event = event_pb.Event(
            id=request.data.decode(),
            source=request.source,
            payload=request.data,
            metadata={"instance": args.instance},
        )
        return pb.IngestResponse(events=[event])

    run_plugin(
        {"name": args.name, "sources": [args.source]},
        ingest=ingest,
        registry=args.registry,
    )


if __name__ == "__main__":
    main()
