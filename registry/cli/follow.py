"""``watch``: print the registry's changes a whole revision at a time, reconnecting.

A stream that ends or breaks after it has delivered something is followed by another,
on the next address of ``--registry``, resuming after the last whole revision printed
(:class:`~registry.revisions.WholeRevisions`), so nothing is printed twice or by half.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from registry import render
from registry.cli.commands import client_for, registry_addresses, selector
from registry.cli.parser import PROG, CliError
from registry.cli.signals import until_signalled
from registry.durations import format_duration
from registry.errors import RegistryError, RegistryUnavailable
from registry.revisions import WholeRevisions
from registry.settings import RegistrySettings
from registry.wire import pb

# Pauses between reconnects, jittered, doubling from the first to the last.
RECONNECT_BACKOFF = 0.5
RECONNECT_BACKOFF_MAX = 5.0
# Codes after which a new Watch stream may succeed; any other refusal is final.
_RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)


async def watch(args: argparse.Namespace) -> None:
    await until_signalled(follow(args))


@dataclass(slots=True)
class _Position:
    """Where a watch stands: what it printed, and where a new stream resumes."""

    revisions: WholeRevisions
    since: int = 0  # the last whole revision printed: a new stream resumes after it
    live: bool = False  # a stream delivered something: from now on, failures reconnect


@dataclass(frozen=True, slots=True)
class _Ended:
    """How one Watch stream ended, when another stream may do better."""

    reason: str  # for the reconnect line
    error: Exception  # the command's failure, should it give up here
    delivered: bool  # this stream delivered a message


async def follow(args: argparse.Namespace) -> None:
    """Print the changes of the registry at ``--registry`` until cancelled.

    Before any stream has delivered a message, each address is tried once and the last
    failure is the command's. After that a stream that ends or breaks is followed by
    another, on the next address, resuming after the last whole revision printed (a
    revision is printed only once whole, so never half of one), with one line on stderr
    and a growing pause before each; ``--no-reconnect``: the command fails instead.

    Raises:
        CliError: no address answered; or a stream ended under ``--no-reconnect``.
        RegistryError: the registry refused the watch (a bad selector, no permission).
    """
    client_for(args)  # refuses a token in clear to any of the addresses before dialing one
    addresses = registry_addresses(args)
    defaults = RegistrySettings(database_url="unused")
    position = _Position(WholeRevisions(defaults.max_bytes_per_plugin))
    pauses = _reconnect_pauses()
    for attempt in itertools.count():
        ended = await _stream(args, addresses[attempt % len(addresses)], position)
        if not position.live:
            if attempt + 1 < len(addresses):
                continue
            raise ended.error
        if args.no_reconnect:
            raise CliError(f"the watch stream ended (--no-reconnect): {ended.reason}")
        if ended.delivered:
            pauses = _reconnect_pauses()  # that stream worked: start the pauses over
        pause = next(pauses)
        resume = f"after revision {position.since}" if position.since else "with a new snapshot"
        print(
            f"{PROG}: watch: {' '.join(ended.reason.split())}; "
            f"reconnecting in {format_duration(pause)} to resume {resume}",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.sleep(pause)


async def _stream(args: argparse.Namespace, address: str, position: _Position) -> _Ended:
    """Print one Watch stream's whole revisions, from ``position``, until it ends.

    Raises:
        RegistryError: the registry refused the watch; a new stream would be refused too.
    """
    position.revisions.reset()  # what the last stream left half is sent again
    delivered = False
    async with client_for(args, address) as client:
        try:
            # The first message (a snapshot, or progress on a resume) must come within
            # --timeout; later ones whenever.
            async with asyncio.timeout(args.timeout) as first:
                async for message in client.watch(
                    since_revision=position.since,
                    sources=args.source or (),
                    label_selector=selector(args),
                ):
                    first.reschedule(None)
                    delivered = position.live = True
                    for revision in position.revisions.feed(message):
                        _print_revision(args, revision)
                        position.since = revision[0].revision
        except TimeoutError:
            waited = format_duration(args.timeout)
            error = CliError(f"the registry at {address} sent nothing within {waited}")
            return _Ended(str(error), error, delivered)
        except RegistryError as exc:
            if not _worth_reconnecting(exc):
                raise
            return _Ended(str(exc), exc, delivered)
    error = CliError(f"the registry at {address} closed the stream")
    return _Ended(str(error), error, delivered)


def _worth_reconnecting(exc: RegistryError) -> bool:
    """Whether a new stream may succeed where this one broke (not a refusal)."""
    if isinstance(exc, RegistryUnavailable):
        return True
    cause = exc.__cause__
    return isinstance(cause, grpc.aio.AioRpcError) and cause.code() in _RECONNECT_CODES


def _print_revision(args: argparse.Namespace, messages: Sequence[pb.WatchResponse]) -> None:
    if args.output == "json":  # JSON Lines: each message as the registry sent it
        lines = [render.watch_json(message) for message in messages]
    else:
        lines = render.revision_lines(messages)
    for line in lines:
        print(line, flush=True)


def _reconnect_pauses() -> Iterator[float]:
    """Jittered pauses, doubling from RECONNECT_BACKOFF to RECONNECT_BACKOFF_MAX (ms)."""
    pause = RECONNECT_BACKOFF
    while True:
        yield round(random.uniform(pause / 2, pause), 3)
        pause = min(RECONNECT_BACKOFF_MAX, pause * 2)
