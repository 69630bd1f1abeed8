"""``serve`` and ``migrate``: their options, the settings they make, and running them.

The server side (SQLAlchemy, Alembic, the server) is imported only when one of these
commands runs, so the client commands start without it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
from collections.abc import Callable
from typing import Any

from registry.cli.parser import CliError, Parser, count, dest, duration, tls_files, whole_seconds
from registry.cli.signals import until_signalled
from registry.logs import configure_logging
from registry.settings import RegistrySettings, default_database_url

log = logging.getLogger(__name__)

STOP_GRACE = 5.0
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 (off) or more")
    return value


def limit(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 (off) or more")
    return number


# serve options that are RegistrySettings fields of the same name
SETTINGS_OPTIONS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("--lease-ttl", whole_seconds, "lease of a plugin that asks for none"),
    ("--health-interval", duration, "time between two health checks of a plugin"),
    ("--health-timeout", duration, "deadline of one health check"),
    ("--unhealthy-threshold", count, "failed checks that make a plugin unhealthy"),
    ("--healthy-threshold", count, "passed checks that make it healthy again"),
    ("--first-check-wait", duration, "how long Register waits for the first check (0: off)"),
    ("--deregister-after", duration, "how long an unhealthy or expired plugin stays"),
    ("--max-message-bytes", count, "largest request accepted"),
    ("--max-plugins", count, "registrations held at most"),
    ("--max-bytes-per-plugin", count, "largest encoded registration"),
    ("--leader-lease", duration, "PostgreSQL replicas: how long a leader holds its lease"),
)

# serve options that are RegistrySettings fields of the same name; unset: the mode's default
LIMIT_OPTIONS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("--register-rate", rate, "Registers per second per principal (policy default 20, 0 off)"),
    ("--register-burst", limit, "burst of --register-rate (policy default 100)"),
    ("--max-instances-per-principal", limit, "live instances per principal (default 1000)"),
    ("--max-streams-per-principal", limit, "Watch/KeepAlive streams per principal (default 64)"),
    ("--max-concurrent-rpcs", count, "calls in flight at once (default 1024)"),
    ("--max-connections-per-peer", count, "connections with calls in flight per peer (256)"),
)


# -- options ------------------------------------------------------------------------------


def db_option(sub: Parser) -> None:
    shown = f"default {default_database_url()}"
    sub.option("--db", metavar="URL", shown=shown, help="sqlite:///PATH or postgresql://...")


def serve_options(serve: Parser) -> None:
    """Every option of ``serve``, in the order its help lists them."""
    defaults = RegistrySettings(database_url="unused")
    serve.option("--listen", metavar="HOST:PORT", default=defaults.listen, help="serve here")
    for flag, kind, help in SETTINGS_OPTIONS:
        serve.option(flag, type=kind, default=getattr(defaults, dest(flag)), help=help)
    db_option(serve)
    serve.option("--log-level", choices=LOG_LEVELS, type=str.lower, default="info", help="")
    serve.option("--log-format", choices=LOG_FORMATS, type=str.lower, default="text", help="")
    serve.option(
        "--metrics-listen",
        metavar="HOST:PORT",
        shown="default none",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )
    trust_options(serve)
    replica_options(serve)


def replica_options(serve: Parser) -> None:
    """serve's options of SPEC §8: how replicas on one PostgreSQL reach each other."""
    serve.option(
        "--advertise",
        metavar="HOST:PORT",
        shown="default the listen address with the port bound",
        help="where other replicas and clients reach this one",
    )
    serve.option(
        "--cluster-token",
        metavar="TOKEN",
        help="shared by every replica; required with --auth-policy on PostgreSQL",
    )


def trust_options(serve: Parser) -> None:
    """serve's options of SPEC §6: the policy, TLS, addresses and limits."""
    serve.option("--auth-policy", metavar="FILE", help="TOML policy of principals (SIGHUP reloads)")
    serve.option(
        "--insecure", action="store_true", default=False, help="allow open mode off loopback"
    )
    serve.option(
        "--no-reflection", action="store_true", default=False, help="do not serve reflection"
    )
    serve.option("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    serve.option("--tls-key", metavar="PEM", help="key of --tls-cert")
    serve.option("--tls-client-ca", metavar="PEM", help="require client certificates of this CA")
    serve.option("--plugin-tls-ca", metavar="PEM", help="CA that verifies https:// plugins")
    serve.option("--plugin-tls-cert", metavar="PEM", help="client certificate to plugins (mTLS)")
    serve.option("--plugin-tls-key", metavar="PEM", help="key of --plugin-tls-cert")
    serve.option(
        "--allow-addresses",
        metavar="CIDR,...",
        shown="default loopback on a loopback listen, else private ranges",
        help="where plugins may be",
    )
    serve.option("--allow-unix-dir", metavar="DIR", action="append", help="repeatable")
    for flag, kind, help in LIMIT_OPTIONS:
        serve.option(flag, type=kind, metavar="N", help=help)


# -- settings -----------------------------------------------------------------------------


def serve_settings(args: argparse.Namespace) -> RegistrySettings:
    """The settings ``serve``'s options make.

    Raises:
        CliError: a setting is invalid, or the TLS files or ``--db`` are.
    """
    options = {dest(flag): getattr(args, dest(flag)) for flag, _, _ in SETTINGS_OPTIONS}
    limits = {
        dest(flag): getattr(args, dest(flag))
        for flag, _, _ in LIMIT_OPTIONS
        if getattr(args, dest(flag)) is not None
    }
    allow = None
    if args.allow_addresses:
        allow = tuple(part.strip() for part in args.allow_addresses.split(",") if part.strip())
    try:
        return RegistrySettings(
            listen=args.listen,
            database_url=database_url(args),
            auth_policy=args.auth_policy,
            insecure=args.insecure,
            reflection=not args.no_reflection,
            tls=tls_files(args.tls_client_ca, args.tls_cert, args.tls_key),
            plugin_tls=tls_files(args.plugin_tls_ca, args.plugin_tls_cert, args.plugin_tls_key),
            allow_addresses=allow,
            allow_unix_dirs=tuple(args.allow_unix_dir or ()),
            advertise=args.advertise,
            cluster_token=args.cluster_token,
            metrics_listen=args.metrics_listen or None,
            **options,
            **limits,
        )
    except ValueError as exc:
        raise CliError(f"invalid setting {exc}") from exc


def database_url(args: argparse.Namespace) -> str:
    """``--db``, else the embedded default.

    Raises:
        CliError: the URL is not one the registry can use (the URL is not repeated).
    """
    from registry.storage.store import normalize_url  # SQLAlchemy loads only for serve and migrate

    url: str = args.db or default_database_url()
    try:
        normalize_url(url)
    except ValueError as exc:
        raise CliError(f"--db: {exc}") from exc  # not the URL itself: it may hold a password
    return url


# -- commands -----------------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    settings = serve_settings(args)
    # Imported before logging is configured: importing alembic logs its plugin setup.
    from registry.server import RegistryServer  # the server side loads only for serve

    configure_logging(args.log_level, "json" if args.log_format == "json" else "text")
    server = RegistryServer(settings)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[bool]] = set()

        def reload() -> None:
            task = loop.create_task(server.reload_policy())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        # Before start: a SIGHUP while starting must not kill the process.
        loop.add_signal_handler(signal.SIGHUP, reload)
        try:
            await server.start()
            await server.wait_closed()
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    try:
        if await until_signalled(run()):
            log.info("stopping (grace %ss)", STOP_GRACE)
    finally:
        await server.stop(grace=STOP_GRACE)


async def migrate(args: argparse.Namespace) -> None:
    from registry.migrate import upgrade
    from registry.replica.lock import DatabaseLock, lock_for
    from registry.storage.store import SqlStore

    url = database_url(args)
    # Only the embedded default's folder is ours to create (SPEC §7).
    store = SqlStore.open(url, create_folder=url == default_database_url())
    lock: DatabaseLock | None = None
    try:
        # A live registry's database is never migrated under it (SPEC §8).
        lock = lock_for(url)
        await upgrade(store.engine)
    finally:
        await store.close()
        if lock is not None:
            lock.release()
    print(f"database {store.engine.url.render_as_string(hide_password=True)} at revision head")
