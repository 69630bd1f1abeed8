"""Hold N etcd watch streams on a key prefix open and drain them, in a process of its own.

    python -m bench.etcd.watchers HOST:PORT N PREFIX

etcd's counterpart of ``bench.watchers``: one gRPC ``Watch`` stream per watcher (not
clientv3's one multiplexed stream), all on one channel. Prints ``watching`` once every
stream has been created, then drains until killed.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from bench.etcd import prefix_end, rpc, rpc_grpc


def create_request(prefix: bytes) -> rpc.WatchRequest:
    return rpc.WatchRequest(
        create_request=rpc.WatchCreateRequest(key=prefix, range_end=prefix_end(prefix))
    )


async def main(address: str, count: int, prefix: bytes) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = rpc_grpc.WatchStub(channel)
        started = asyncio.Semaphore(0)

        async def drain() -> None:
            call = stub.Watch()
            await call.write(create_request(prefix))
            async for response in call:
                if response.created:
                    started.release()

        tasks = [asyncio.create_task(drain()) for _ in range(count)]
        for _ in range(count):
            await started.acquire()
        print("watching", flush=True)
        await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()))
