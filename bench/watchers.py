"""Hold N Watch streams open and drain them, in a process of its own.

    python -m bench.watchers HOST:PORT N

Prints ``watching`` once every stream has had its first message, then drains until
killed. The propagation benchmark runs its extra watchers here, as production
gateways would be: separate processes, not the measuring client's event loop.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from registry.wire import pb, pb_grpc


async def main(address: str, count: int) -> None:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.PluginRegistryStub(channel)
        started = asyncio.Semaphore(0)

        async def drain() -> None:
            call = stub.Watch(pb.WatchRequest())
            first = True
            async for _ in call:
                if first:
                    started.release()
                    first = False

        tasks = [asyncio.create_task(drain()) for _ in range(count)]
        for _ in range(count):
            await started.acquire()
        print("watching", flush=True)
        await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
