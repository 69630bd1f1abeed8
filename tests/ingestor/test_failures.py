"""The one verdict on a failed plugin RPC, shared by the async and the sync path."""

from __future__ import annotations

import grpc
import pytest

from ingestor.failures import OVER_RECEIVE_LIMIT, Failure, judge

Code = grpc.StatusCode
BIG = f"{OVER_RECEIVE_LIMIT} (9 vs. 8)"


@pytest.mark.parametrize(
    ("code", "details", "dropped", "failure", "retry"),
    [
        (Code.UNAVAILABLE, "", False, Failure.TRANSPORT, True),
        (Code.DEADLINE_EXCEEDED, "", False, Failure.TRANSPORT, False),  # may still run there
        (Code.CANCELLED, "", True, Failure.TRANSPORT, True),  # we closed its channel
        (Code.CANCELLED, "", False, Failure.STATUS, False),  # the plugin cancelled it
        (
            Code.RESOURCE_EXHAUSTED,
            f"{OVER_RECEIVE_LIMIT} (9 vs. 8)",
            False,
            Failure.TOO_LARGE,
            False,
        ),
        (Code.RESOURCE_EXHAUSTED, "SERVER: too big", False, Failure.STATUS, False),
        (Code.UNKNOWN, "plugin bug", False, Failure.STATUS, False),
        (Code.INVALID_ARGUMENT, "", False, Failure.STATUS, False),
    ],
)
def test_verdicts(code, details, dropped, failure, retry) -> None:
    verdict = judge(code, details, dropped=dropped)
    assert (verdict.failure, verdict.retry) == (failure, retry)
    assert verdict.breaker_failure is (failure is not Failure.STATUS)
    assert verdict.drop_channel is (failure is Failure.TRANSPORT)
