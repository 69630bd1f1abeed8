"""Which endpoint a call goes to: round-robin, skipping those whose breaker is open.

    balancer = Balancer(BreakerSettings(), "source 'k8s'")
    endpoint = balancer.pick(endpoints)            # its breaker's permit is held
    balancer.breaker(endpoint.address).success()   # or failure(), or release()

One balancer per client (an ingestor; an emitter alike), shared by every thread and
event loop that calls through it: the turn is an ``itertools.count`` (its ``next`` is
atomic), the breakers are thread-safe (:mod:`ingestor.breaker`) and the table of them
is only ever read whole or changed by single dict operations.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from typing import overload

from ingestor.breaker import BreakerSettings, BreakerState, CircuitBreaker
from ingestor.errors import PluginConnectionError
from ingestor.view import Endpoint


class Balancer:
    """Spreads calls over endpoints and keeps one circuit breaker per endpoint.

    ``what`` names the client's target in errors (``"source 'k8s'"``).
    """

    def __init__(self, settings: BreakerSettings, what: str) -> None:
        self.settings = settings
        self.what = what
        self._breakers: dict[str, CircuitBreaker] = {}
        self._turn = itertools.count()

    def breaker(self, address: str) -> CircuitBreaker:
        """The breaker of ``address`` (made on first use)."""
        breaker = self._breakers.get(address)
        if breaker is None:
            breaker = self._breakers.setdefault(address, CircuitBreaker(self.settings))
        return breaker

    def next(self, endpoints: tuple[Endpoint, ...]) -> Endpoint:
        """The next endpoint in turn, breakers ignored (for a health probe)."""
        return endpoints[next(self._turn) % len(endpoints)]

    @overload
    def pick(self, endpoints: tuple[Endpoint, ...], *, avoid: str = "") -> Endpoint: ...

    @overload
    def pick(
        self, endpoints: tuple[Endpoint, ...], *, avoid: str = "", fail: bool
    ) -> Endpoint | None: ...

    def pick(
        self, endpoints: tuple[Endpoint, ...], *, avoid: str = "", fail: bool = True
    ) -> Endpoint | None:
        """The next endpoint in turn (not ``avoid``) whose breaker lets a call through.

        The caller holds the breaker's permit and must report the call's outcome.

        Raises:
            PluginConnectionError: with ``fail``, when every breaker is open.
        """
        candidates = [e for e in endpoints if e.address != avoid] if avoid else endpoints
        start = next(self._turn)
        count = len(candidates)
        for i in range(count):
            endpoint = candidates[(start + i) % count]
            if self.breaker(endpoint.address).allow():
                return endpoint
        if not fail:
            return None
        wait = min(self.breaker(e.address).retry_after() for e in candidates)
        raise PluginConnectionError(
            f"every instance of {self.what} is failing (circuit open); next try in {wait:.1f} s",
            address=candidates[0].address if count == 1 else "",
        )

    def keep_only(self, addresses: Collection[str]) -> None:
        """Forget the breakers of endpoints not in ``addresses`` (no longer routable)."""
        for address in [a for a in list(self._breakers) if a not in addresses]:
            self._breakers.pop(address, None)

    def states(self) -> dict[str, BreakerState]:
        """The state of each endpoint's breaker, by address."""
        return {address: breaker.state for address, breaker in dict(self._breakers).items()}
