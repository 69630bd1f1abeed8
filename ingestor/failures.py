"""What a failed RPC to a plugin means: the one place that decides, for every path.

    verdict = judge(exc.code(), exc.details() or "", dropped=connection.dropped)

The async (``grpc.aio``) and the synchronous (``grpc``) paths, and any client of a
plugin service (an ingestor, an emitter), act on the same verdict:

- ``TOO_LARGE``: this side's receive limit refused the answer. The endpoint answered
  with something no working plugin sends (a breaker failure), the channel is fine.
- ``TRANSPORT``: the endpoint could not be reached (UNAVAILABLE, DEADLINE_EXCEEDED, or a
  call cancelled because this side dropped its channel). A breaker failure; the channel
  is dropped; another instance may be tried unless the call timed out there (it may
  still be running, and must not run twice).
- ``STATUS``: the plugin answered an error status: it is up (a breaker success), the
  request is the problem; not retried.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import grpc

# Statuses that say the plugin could not be reached, not that it refused the request.
TRANSPORT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# How gRPC words RESOURCE_EXHAUSTED when this side's receive limit refused an answer;
# a plugin's own RESOURCE_EXHAUSTED (or its refusal of a large request, "SERVER: ...")
# is an answer like any other.
OVER_RECEIVE_LIMIT = "CLIENT: Received message larger than max"


class Failure(enum.Enum):
    TOO_LARGE = "too large"
    TRANSPORT = "transport"
    STATUS = "status"


@dataclass(frozen=True, slots=True)
class Verdict:
    """How to treat one failed RPC: its kind, and whether another instance may be tried."""

    failure: Failure
    code: Any  # grpc.StatusCode
    details: str
    retry: bool = False

    @property
    def breaker_failure(self) -> bool:
        """Whether it counts against the endpoint's breaker."""
        return self.failure is not Failure.STATUS

    @property
    def drop_channel(self) -> bool:
        """Whether the channel is broken (to be dropped and made again next time)."""
        return self.failure is Failure.TRANSPORT


def judge(code: Any, details: str, *, dropped: bool) -> Verdict:
    """The verdict on an RPC that ended with ``code`` and ``details``.

    ``dropped``: this side dropped the call's channel meanwhile (so a CANCELLED is ours,
    not the caller's).
    """
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and OVER_RECEIVE_LIMIT in details:
        return Verdict(Failure.TOO_LARGE, code, details)
    if code in TRANSPORT_CODES or (code is grpc.StatusCode.CANCELLED and dropped):
        return Verdict(
            Failure.TRANSPORT, code, details, retry=code is not grpc.StatusCode.DEADLINE_EXCEEDED
        )
    return Verdict(Failure.STATUS, code, details)


def judge_error(exc: grpc.RpcError, *, dropped: bool) -> Verdict:
    """:func:`judge` of a raised RPC error (``grpc.aio.AioRpcError`` or a sync ``grpc.Call``)."""
    return judge(exc.code(), exc.details() or "", dropped=dropped)
