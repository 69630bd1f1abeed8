"""A local cache of the registry, fed by ``Watch``, that resolves sources to endpoints.

    with RegistryResolver("127.0.0.1:50051") as resolver:
        resolver.wait_synced(5)
        print(resolver.resolve("k8s"))

The cache follows one Watch stream: a snapshot, then one message per change. A
revision the registry split over several messages is applied once all of them arrived
(:mod:`ingestor.revisions`), so no view ever holds part of one. When the stream breaks
it reconnects with exponential backoff and jitter and resumes from the last revision
it applied; meanwhile it keeps serving the last view it had. Given several replicas
of one registry (``"a:1,b:2"`` or a list), each reconnect tries the next one: every
replica has the same history, so the resume misses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry

from ingestor import _loop
from ingestor._closing import Closing
from ingestor.errors import PluginConnectionError, PluginError
from ingestor.metrics import gateway_metrics
from ingestor.revisions import DEFAULT_MAX_PLUGIN_BYTES, Revision, RevisionAssembler
from ingestor.view import Endpoint, ResolverView
from registry.client import RegistryClient, parse_addresses
from registry.errors import RegistryError
from registry.lifecycle import cancel_and_wait
from registry.trust.tls import TlsFiles
from registry.wire import pb

log = logging.getLogger(__name__)

ViewHook = Callable[[ResolverView], None]


class _State(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    CLOSED = "closed"


class _Signal:
    """Wakes waiters on any thread or event loop each time the view changes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._futures: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    def notify(self) -> None:
        with self._cond:
            self._cond.notify_all()
            futures, self._futures = self._futures, set()
        for loop, future in futures:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_wake, future)

    def wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    async def wait_async(
        self,
        predicate: Callable[[], bool],
        timeout: float | None,  # noqa: ASYNC109 (shared with the sync wait)
    ) -> bool:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            with self._cond:
                if predicate():
                    return True
                future: asyncio.Future[None] = loop.create_future()
                self._futures.add((loop, future))
            try:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(future, remaining)
            finally:
                with self._cond:
                    self._futures.discard((loop, future))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RegistryResolver(Closing):
    """A Watch-fed cache of the registry: resolves a source to its HEALTHY endpoints.

    Thread rules: every method may be called from any thread. The Watch stream runs
    as one task, either on the package's private loop thread (``start()``, ``with``,
    or lazily on first resolution) or on the caller's loop (``await start_async()``,
    ``async with``); that loop must keep running while the resolver is in use. Views
    are immutable and swapped atomically, so resolution never blocks on the stream.

    ``registry_address``: ``host:port``, or the replicas of one registry as ``"a,b,c"``
    or a sequence; a Watch runs on one of them at a time, and each reconnect starts at
    the next one after the one that broke. With several, a replica that sends nothing
    within ``connect_timeout`` of being asked (a hung one) is left for the next.
    ``idle_timeout`` (seconds; None, the default, for never) drops a stream silent that
    long, not even a progress message, and reconnects; set it above the registry's
    progress interval.

    ``max_staleness`` (seconds): when set, resolving from a view not confirmed for
    longer (no message, not even an idle progress message, from a live stream) raises
    PluginConnectionError. Set it above the registry's progress interval (5 s by
    default). ``connect_timeout`` bounds how long :meth:`resolve_async` waits for the
    first snapshot. ``sources`` narrows the stream to plugins declaring one of them, and
    ``label_selector`` (e.g. ``"zone=a,!canary"``, SPEC §1.3) to plugins whose labels
    match; the registry checks its syntax, so a bad one leaves the resolver unsynced,
    with the registry's reason as its last error.
    Reconnection waits grow from ``backoff_initial`` to ``backoff_max`` seconds, jittered.
    ``token`` and ``tls`` are :class:`~registry.client.RegistryClient`'s: a bearer token
    for every call, and the TLS files to reach the registry with. Construction never
    connects.

    A snapshot (or change) too large for one message comes in several; the view is
    swapped once all have arrived, so :meth:`wait_synced` returns with the whole
    catalogue. ``max_plugin_bytes`` is the registry's ``--max-bytes-per-plugin``: with
    it the resolver knows a message that left room for one more plugin was the last of
    its revision; a revision whose last message was full waits for the next message
    (at the latest the registry's progress message).

    ``metrics``: a CollectorRegistry to report the view's staleness on
    (:mod:`ingestor.metrics`); None reports nothing.

    Raises (constructor):
        ValueError: a setting is out of range (the message names it), or ``metrics``
            holds other families of the gateway's names.
        RegistryError: ``token``/``tls`` refused, as RegistryClient refuses them (a token
            in clear to a non-loopback registry, unusable TLS files).
    """

    def __init__(
        self,
        registry_address: str | Sequence[str],
        *,
        max_staleness: float | None = None,
        connect_timeout: float = 5.0,
        sources: Iterable[str] = (),
        label_selector: str = "",
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        token: str | None = None,
        tls: TlsFiles | None = None,
        max_plugin_bytes: int = DEFAULT_MAX_PLUGIN_BYTES,
        idle_timeout: float | None = None,
        metrics: CollectorRegistry | None = None,
    ) -> None:
        if max_staleness is not None and max_staleness <= 0:
            raise ValueError(f"max_staleness: {max_staleness!r} must be positive")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout: {idle_timeout!r} must be positive")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout: {connect_timeout!r} must be positive")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("backoff_initial and backoff_max: need 0 < initial <= max")
        self._assembler = RevisionAssembler(max_plugin_bytes)
        self.addresses = parse_addresses(registry_address)
        self.address = ",".join(self.addresses)
        self.idle_timeout = idle_timeout
        self.max_staleness = max_staleness
        self.connect_timeout = connect_timeout
        self.sources = tuple(sources)
        self.label_selector = label_selector
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._token = token
        self._tls = tls
        # Refuses a token in clear (to any of them) or unusable TLS files now, not in the loop.
        RegistryClient(self.addresses, token=token, tls=tls)
        self._next = 0  # the index of the address the next Watch goes to
        self._lock = threading.Lock()
        self._state = _State.UNOPENED
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._view: ResolverView | None = None
        self._confirmed_at: float | None = None
        self._connected = False
        self._last_error = ""
        self._hooks: list[ViewHook] = []
        self._signal = _Signal()
        self._metrics = gateway_metrics(metrics)
        if self._metrics is not None:
            self._metrics.add_resolver(self)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start following the registry on the private loop thread; returns at once.

        Idempotent; a no-op when already started (on any loop). Never blocks, so it may
        be called anywhere, inside a running loop too.

        Raises:
            PluginError: the resolver is closed.
        """
        loop = _loop.bridge_loop()
        if self._claim(loop):
            loop.call_soon_threadsafe(self._spawn)

    async def start_async(self) -> None:
        """Start following the registry on the running loop (idempotent).

        Raises:
            PluginError: the resolver is closed.
        """
        if self._claim(asyncio.get_running_loop()):
            self._spawn()

    def close(self) -> None:
        """Stop the stream and refuse further use. Idempotent; safe before start.

        Waits for the stream task to end unless called inside a running event loop,
        where it only cancels it (use ``await aclose()`` there to wait).
        """
        loop, task = self._shut()
        if loop is None or task is None or loop.is_closed():
            return
        if _loop.running_loop() is loop:
            task.cancel()
            return
        try:
            future = asyncio.run_coroutine_threadsafe(cancel_and_wait(task), loop)
            if _loop.running_loop() is None:
                future.result(self.connect_timeout)
        except (RuntimeError, TimeoutError) as exc:  # its loop stopped, or is stuck
            log.warning("registry resolver stream did not stop cleanly: %r", exc)

    async def aclose(self) -> None:
        """Stop the stream and wait for it to end. Idempotent; safe before start."""
        loop, task = self._shut()
        if loop is None or task is None or loop.is_closed():
            return
        if asyncio.get_running_loop() is loop:
            await cancel_and_wait(task)
            return
        with contextlib.suppress(RuntimeError):
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(cancel_and_wait(task), loop))

    def _enter(self) -> None:
        self.start()

    async def _aenter(self) -> None:
        await self.start_async()

    # -- what it knows -----------------------------------------------------------------

    @property
    def view(self) -> ResolverView | None:
        """The current view; None until the first snapshot arrived."""
        return self._view

    @property
    def synced(self) -> bool:
        """Whether a snapshot has ever arrived."""
        return self._view is not None

    @property
    def connected(self) -> bool:
        """Whether the Watch stream is up now."""
        return self._connected

    @property
    def revision(self) -> int:
        """The registry revision the view reflects; 0 before the first snapshot."""
        view = self._view
        return 0 if view is None else view.revision

    @property
    def staleness(self) -> float:
        """Seconds since a live stream last confirmed the view; ``inf`` before any."""
        confirmed = self._confirmed_at
        return math.inf if confirmed is None else time.monotonic() - confirmed

    def subscribe(self, hook: ViewHook) -> Callable[[], None]:
        """Call ``hook(view)`` after every change of the view; returns an unsubscribe.

        Hooks run on the resolver's loop thread, right after the view is swapped: they
        must be quick, must not block, and must be thread-safe. Exceptions are logged.
        """
        with self._lock:
            self._hooks = [*self._hooks, hook]

        def unsubscribe() -> None:
            with self._lock:
                self._hooks = [h for h in self._hooks if h is not hook]

        return unsubscribe

    # -- resolution --------------------------------------------------------------------

    def resolve(self, source: str) -> tuple[Endpoint, ...]:
        """The HEALTHY endpoints of ``source`` from the current view; never blocks.

        Starts the resolver (on the private loop thread) when it was not started.

        Raises:
            PluginConnectionError: the resolver has not synced yet, its view is older
                than ``max_staleness``, or no HEALTHY plugin serves ``source``.
            PluginError: the resolver is closed.
        """
        view = self._current_view()
        return _routed(
            view, "source", source, view.routes, view.members, "no registered plugin declares it"
        )

    async def resolve_async(self, source: str) -> tuple[Endpoint, ...]:
        """Like :meth:`resolve`, but first waits up to ``connect_timeout`` for a snapshot.

        Raises:
            PluginConnectionError: as :meth:`resolve`, or no snapshot within the timeout.
            PluginError: the resolver is closed.
        Cancellation only abandons the wait.
        """
        if self._view is None:
            await self.wait_synced_async(self.connect_timeout)
        return self.resolve(source)

    def resolve_emitter(self, emitter_name: str) -> tuple[Endpoint, ...]:
        """The HEALTHY endpoints of the emitter ``emitter_name``; never blocks.

        As :meth:`resolve`, for an emitter name (a plugin's ``emitter_name``, else its
        name) instead of a source.

        Raises:
            PluginConnectionError: not synced yet, too stale, or no HEALTHY instance.
            PluginError: the resolver is closed.
        """
        view = self._current_view()
        nobody = "no registered emitter has that name"
        return _routed(view, "emitter", emitter_name, view.emitter_routes, view.emitters, nobody)

    def current_view(self) -> ResolverView:
        """The view resolution would use now.

        Raises:
            PluginConnectionError: not synced yet, or older than ``max_staleness``.
            PluginError: the resolver is closed.
        """
        return self._current_view()

    # -- waiting -----------------------------------------------------------------------

    def wait_synced(self, timeout: float | None = None) -> ResolverView:
        """Block until the first snapshot arrived (starting the resolver if needed).

        Raises:
            PluginConnectionError: no snapshot within ``timeout`` seconds.
            PluginError: the resolver is closed, or called inside a running event loop
                (use ``await wait_synced_async()`` there).
        """
        _loop.refuse_inside_loop("RegistryResolver.wait_synced", "wait_synced_async()")
        self._ensure_started()
        if not self._signal.wait(self._synced_or_closed, timeout):
            raise self._not_synced(timeout)
        return self._current_view(check_staleness=False)

    # The async waits take a timeout like their sync twins (and raise this package's errors).
    async def wait_synced_async(self, timeout: float | None = None) -> ResolverView:  # noqa: ASYNC109
        """Wait until the first snapshot arrived (starting the resolver if needed).

        Raises:
            PluginConnectionError: no snapshot within ``timeout`` seconds.
            PluginError: the resolver is closed.
        Cancellation only abandons the wait.
        """
        self._ensure_started()
        if not await self._signal.wait_async(self._synced_or_closed, timeout):
            raise self._not_synced(timeout)
        return self._current_view(check_staleness=False)

    def wait_for(
        self, predicate: Callable[[ResolverView], bool], timeout: float | None = None
    ) -> ResolverView:
        """Block until the view satisfies ``predicate``; returns that view.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
            PluginError: the resolver is closed, or called inside a running event loop.
        """
        _loop.refuse_inside_loop("RegistryResolver.wait_for", "wait_for_async()")
        self._ensure_started()
        if not self._signal.wait(self._matches(predicate), timeout):
            raise TimeoutError(f"the registry view did not match within {timeout} s")
        return self._current_view(check_staleness=False)

    async def wait_for_async(
        self,
        predicate: Callable[[ResolverView], bool],
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> ResolverView:
        """Wait until the view satisfies ``predicate``; returns that view.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
            PluginError: the resolver is closed.
        Cancellation only abandons the wait.
        """
        self._ensure_started()
        if not await self._signal.wait_async(self._matches(predicate), timeout):
            raise TimeoutError(f"the registry view did not match within {timeout} s")
        return self._current_view(check_staleness=False)

    # -- internals ---------------------------------------------------------------------

    def _claim(self, loop: asyncio.AbstractEventLoop) -> bool:
        with self._lock:
            if self._state is _State.CLOSED:
                raise PluginError("the registry resolver is closed")
            if self._state is _State.OPEN:
                return False
            self._state = _State.OPEN
            self._loop = loop
            return True

    def _spawn(self) -> None:
        with self._lock:
            if self._state is not _State.OPEN or self._task is not None:
                return
            self._task = asyncio.get_running_loop().create_task(
                self._follow(), name=f"registry-resolver {self.address}"
            )

    def _shut(self) -> tuple[asyncio.AbstractEventLoop | None, asyncio.Task[None] | None]:
        with self._lock:
            self._state = _State.CLOSED
            loop, task, self._task = self._loop, self._task, None
            self._hooks = []
        if self._metrics is not None:
            self._metrics.forget(self)
        self._signal.notify()
        return loop, task

    def _ensure_started(self) -> None:
        if self._state is _State.UNOPENED:
            self.start()

    def _synced_or_closed(self) -> bool:
        return self._view is not None or self._state is _State.CLOSED

    def _matches(self, predicate: Callable[[ResolverView], bool]) -> Callable[[], bool]:
        def check() -> bool:
            view = self._view
            return self._state is _State.CLOSED or (view is not None and predicate(view))

        return check

    def _current_view(self, *, check_staleness: bool = True) -> ResolverView:
        if self._state is _State.CLOSED:
            raise PluginError("the registry resolver is closed")
        self._ensure_started()
        view = self._view
        if view is None:
            raise self._not_synced(None)
        if check_staleness and self.max_staleness is not None:
            staleness = self.staleness
            if staleness > self.max_staleness:
                raise PluginConnectionError(
                    f"the view of registry {self.address} is {staleness:.1f} s old "
                    f"(max_staleness {self.max_staleness:g} s){self._error_suffix()}"
                )
        return view

    def _not_synced(self, timeout: float | None) -> PluginError:
        if self._state is _State.CLOSED:
            return PluginError("the registry resolver is closed")
        within = "" if timeout is None else f" within {timeout:g} s"
        return PluginConnectionError(
            f"no view of registry {self.address} yet: it has not answered Watch"
            f"{within}{self._error_suffix()}"
        )

    def _error_suffix(self) -> str:
        return f"; last error: {self._last_error}" if self._last_error else ""

    async def _follow(self) -> None:
        """Follow Watch until cancelled: resume after every break, back off between tries."""
        attempt = 0
        several = len(self.addresses) > 1
        while True:
            address = self.addresses[self._next]
            client: RegistryClient | None = None
            self._assembler.reset()  # a revision half received comes again on resume
            try:
                client = self._client(address)  # TLS files read again: a renewed certificate
                # Several replicas: one that says nothing is left for the next (a hung one).
                async with asyncio.timeout(self.connect_timeout if several else None) as silence:
                    async for message in client.watch(
                        since_revision=self.revision,
                        sources=self.sources,
                        label_selector=self.label_selector,
                    ):
                        if not self._connected:
                            self._connected = True
                            attempt = 0
                            log.info(
                                "watching registry %s from revision %d", address, self.revision
                            )
                        silence.reschedule(self._idle_deadline())
                        self._on_message(message)
                self._broke(address, "the stream ended")
            except TimeoutError:
                bound = self.idle_timeout if self._connected else self.connect_timeout
                self._broke(address, f"it sent nothing for {bound:g} s")
            except RegistryError as exc:
                self._broke(address, str(exc))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("registry resolver failed; retrying")
                self._broke(address, repr(exc))
            finally:
                self._connected = False
                if client is not None:
                    await client.close()
            self._next = (self._next + 1) % len(self.addresses)
            ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(attempt, 32))
            attempt += 1
            await asyncio.sleep(random.uniform(ceiling / 2, ceiling))

    def _idle_deadline(self) -> float | None:
        if self.idle_timeout is None:
            return None
        return asyncio.get_running_loop().time() + self.idle_timeout

    def _client(self, address: str) -> RegistryClient:
        # A fresh client per attempt: a new channel dials at once, without gRPC's backoff.
        return RegistryClient(address, token=self._token, tls=self._tls)

    def _broke(self, address: str, reason: str) -> None:
        if self._connected:
            log.warning(
                "lost registry %s (%s); serving the view of revision %d",
                address,
                reason,
                self.revision,
            )
        else:
            log.debug("registry %s unreachable: %s", address, reason)
        self._last_error = f"{address}: {reason}" if len(self.addresses) > 1 else reason

    def _on_message(self, message: pb.WatchResponse) -> None:
        self._confirmed_at = time.monotonic()
        self._last_error = ""
        for revision in self._assembler.feed(message):
            self._apply(revision)

    def _apply(self, revision: Revision) -> None:
        view = self._view
        if revision.snapshot:
            new = ResolverView.snapshot(revision.revision, revision.upserted)
        elif view is None:
            return  # cannot happen from revision 0 (a snapshot comes first); be safe
        elif revision.progress:
            new = view.at(revision.revision)
        else:
            new = view.apply(revision.revision, revision.upserted, revision.removed)
        if new is view:
            return
        self._view = new
        for hook in self._hooks:
            try:
                hook(new)
            except Exception:
                log.exception("registry view hook %r failed", hook)
        self._signal.notify()


def _routed(
    view: ResolverView,
    kind: str,
    key: str,
    routes: Mapping[str, tuple[Endpoint, ...]],
    members: Mapping[str, frozenset[str]],
    nobody: str,
) -> tuple[Endpoint, ...]:
    """The HEALTHY endpoints of ``key`` (a source or an emitter name), or why none."""
    endpoints = routes.get(key, ())
    if endpoints:
        return endpoints
    held = members.get(key)
    why = f"{len(held)} instance(s) registered, none HEALTHY" if held else nobody
    raise PluginConnectionError(
        f"no routable plugin for {kind} {key!r}: {why} (registry revision {view.revision})"
    )
