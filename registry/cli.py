"""``polku-registry``: run the registry, migrate its database, and manage plugins.

Every option also reads an environment variable, ``POLKU_REGISTRY_<OPTION>``
(``--registry`` reads ``POLKU_REGISTRY``): the command line beats the environment,
which beats the default. Exit status: 0 success, 1 a runtime error (one line on
stderr), 2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry import render
from registry.client import DEFAULT_REGISTRY, RegistryClient, parse_addresses
from registry.durations import format_duration, parse_duration
from registry.errors import RegistryError, RegistryUnavailable
from registry.settings import RegistrySettings, default_database_url
from registry.trust.tls import TlsFiles
from registry.wire import pb

log = logging.getLogger(__name__)

PROG = "polku-registry"
ENV_PREFIX = "POLKU_REGISTRY"
STOP_GRACE = 5.0
TYPES = {"ingestor": pb.PLUGIN_TYPE_INGESTOR, "emitter": pb.PLUGIN_TYPE_EMITTER}
STATUSES = {
    "unknown": pb.PLUGIN_STATUS_UNKNOWN,
    "healthy": pb.PLUGIN_STATUS_HEALTHY,
    "unhealthy": pb.PLUGIN_STATUS_UNHEALTHY,
    "expired": pb.PLUGIN_STATUS_EXPIRED,
}
LOG_LEVELS = ("debug", "info", "warning", "error")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CliError(Exception):
    """A failure reported as one line on stderr, exit status 1."""


# -- argument types: argparse turns ArgumentTypeError into a usage error (exit 2) --------


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def whole_seconds(text: str) -> int:
    seconds = math.floor(duration(text) + 0.5)  # half up: round() would make 2.5s into 2s
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"{text!r} rounds to {seconds}s; it must be at least 1s")
    return seconds


def count(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return number


def label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key, value


# -- options that fall back on the environment --------------------------------------------


@dataclass(frozen=True, slots=True)
class _Option:
    action: argparse.Action
    env: str
    default: Any
    required: bool
    repeated: bool  # action="append": the variable holds a comma-separated list
    exclusive: str  # options sharing this key are mutually exclusive; "" for none


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose options fall back on environment variables, then defaults.

    Options are added with ``default=SUPPRESS`` so that after parsing the namespace holds
    exactly what the command line gave; :meth:`complete` then fills in the rest.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.options: list[_Option] = []
        self.required_groups: set[str] = set()
        self._groups: dict[str, argparse._MutuallyExclusiveGroup] = {}

    def option(
        self,
        *flags: str,
        help: str,
        default: Any = None,
        shown: str = "",
        env: str = "",
        required: bool = False,
        exclusive: str = "",
        **kwargs: Any,
    ) -> None:
        """Add an option read from the command line, else ``env``, else ``default``."""
        env = env or f"{ENV_PREFIX}_{_dest(flags[-1]).upper()}"
        kind = kwargs.get("type")
        if kind in (duration, whole_seconds, count):
            kwargs.setdefault("metavar", "N" if kind is count else "D")
        if kind in (duration, whole_seconds) and default is not None:
            shown = f"default {format_duration(default)}"
        shown = "required" if required else shown or (f"default {default}" if default else "")
        note = f"env {env}" + (f"; {shown}" if shown else "")
        container: argparse._ActionsContainer = self
        if exclusive:
            if exclusive not in self._groups:
                self._groups[exclusive] = self.add_mutually_exclusive_group()
            container = self._groups[exclusive]
        action = container.add_argument(
            *flags,
            default=argparse.SUPPRESS,
            help=f"{help} ({note})".strip().replace("%", "%%"),
            **kwargs,
        )
        repeated = kwargs.get("action") == "append"
        self.options.append(_Option(action, env, default, required, repeated, exclusive))

    def complete(self, args: argparse.Namespace, environ: Mapping[str, str]) -> None:
        """Fill each option the command line did not give, from the environment or default.

        Raises:
            CliError: an environment variable is malformed or conflicts with another.
            SystemExit: a required option is missing everywhere (a usage error).
        """
        given = set(vars(args))
        from_env: dict[str, list[str]] = {}
        for option in self.options:
            dest = option.action.dest
            if dest in given:
                continue
            rivals_given = option.exclusive and any(
                o.exclusive == option.exclusive and o.action.dest in given for o in self.options
            )
            raw = "" if rivals_given else environ.get(option.env, "")
            if raw:
                setattr(args, dest, _from_environment(option, raw))
                from_env.setdefault(option.exclusive, []).append(option.env)
            elif option.required:
                self.error(f"{_flag(option)} is required (or set {option.env})")
            else:
                setattr(args, dest, option.default)
        for key, names in from_env.items():
            if key and len(names) > 1:
                raise CliError(f"{' and '.join(names)} are both set; give only one")
        for key in self.required_groups:
            group = [o for o in self.options if o.exclusive == key]
            if not any(getattr(args, o.action.dest) for o in group):
                self.error(f"one of {', '.join(map(_flag, group))} is required")


def _flag(option: _Option) -> str:
    return option.action.option_strings[-1]


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _from_environment(option: _Option, raw: str) -> Any:
    action = option.action
    if isinstance(action, argparse._StoreTrueAction):
        word = raw.strip().lower()
        if word not in _TRUE + _FALSE:
            raise CliError(f"{option.env}={raw!r}: use one of {', '.join(_TRUE + _FALSE)}")
        return word in _TRUE
    items = [part.strip() for part in raw.split(",")] if option.repeated else [raw]
    convert: Callable[[str], Any] = action.type if callable(action.type) else str
    values = []
    for item in items:
        try:
            value = convert(item)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise CliError(f"{option.env}={raw!r}: {exc}") from exc
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise CliError(f"{option.env}={raw!r}: choose from {choices}")
        values.append(value)
    return values if option.repeated else values[0]


# -- the parser ---------------------------------------------------------------------------

# serve options that are RegistrySettings fields of the same name
SETTINGS_OPTIONS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("--lease-ttl", whole_seconds, "lease of a plugin that asks for none"),
    ("--health-interval", duration, "time between two health checks of a plugin"),
    ("--health-timeout", duration, "deadline of one health check"),
    ("--unhealthy-threshold", count, "failed checks that make a plugin unhealthy"),
    ("--healthy-threshold", count, "passed checks that make it healthy again"),
    ("--deregister-after", duration, "how long an unhealthy or expired plugin stays"),
    ("--max-message-bytes", count, "largest request accepted"),
    ("--max-plugins", count, "registrations held at most"),
    ("--max-bytes-per-plugin", count, "largest encoded registration"),
    ("--leader-lease", duration, "PostgreSQL replicas: how long a leader holds its lease"),
)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def build_parser() -> _Parser:
    """The parser of every command; :meth:`_Parser.complete` finishes what it parsed."""
    parser = _Parser(prog=PROG, description="The POLKU plugin registry and its operator tool.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    defaults = RegistrySettings(database_url="unused")

    def command(name: str, run: Callable[[argparse.Namespace], Any], help: str) -> _Parser:
        sub: _Parser = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run, parser=sub)
        return sub

    def db_option(sub: _Parser) -> None:
        shown = f"default {default_database_url()}"
        sub.option("--db", metavar="URL", shown=shown, help="sqlite:///PATH or postgresql://...")

    def client_options(sub: _Parser, *, output: bool = True) -> None:
        sub.option(
            "--registry",
            metavar="ADDR",
            env=ENV_PREFIX,
            default=DEFAULT_REGISTRY,
            help="host:port, or https://host:port for TLS; replicas as a,b,c",
        )
        sub.option("--timeout", type=duration, default=5.0, help="deadline of each call")
        sub.option("--token", metavar="TOKEN", help="bearer token (never sent in clear off-host)")
        sub.option("--tls-ca", metavar="PEM", help="CA that verifies the registry (TLS)")
        sub.option("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
        sub.option("--tls-key", metavar="PEM", help="key of --tls-cert")
        if output:
            sub.option("-o", "--output", choices=("table", "json"), default="table", help="format")

    serve = command("serve", _serve, "run the registry (migrations run at start)")
    serve.option("--listen", metavar="HOST:PORT", default=defaults.listen, help="serve here")
    for flag, kind, help in SETTINGS_OPTIONS:
        serve.option(flag, type=kind, default=getattr(defaults, _dest(flag)), help=help)
    db_option(serve)
    serve.option("--log-level", choices=LOG_LEVELS, type=str.lower, default="info", help="")
    trust_options(serve)
    replica_options(serve)

    db_option(command("migrate", _migrate, "bring a database to the current schema"))

    listing = command("list", _list, "list registered plugins")
    client_options(listing)
    listing.option("--source", help="only plugins that ingest this source")
    listing.option("--type", choices=tuple(TYPES), help="only plugins of this type")
    listing.option("--status", choices=tuple(STATUSES), action="append", help="repeatable")
    listing.option("--name", help="only instances of this plugin")

    get = command("get", _get, "show one plugin")
    get.add_argument("plugin_id", metavar="PLUGIN_ID")
    client_options(get)

    register = command("register", _register, "register a plugin on its behalf (no lease)")
    client_options(register, output=False)
    register.option("--name", required=True, help="plugin name")
    register.option("--address", required=True, help="host:port, http(s)://host:port, unix:/path")
    register.option("--source", action="append", exclusive="routes", help="a source; repeatable")
    register.option("--emitter-name", exclusive="routes", help="the name it emits as")
    register.required_groups.add("routes")
    register.option("--type", choices=tuple(TYPES), shown="default from the routes", help="")
    register.option("--version", default="", help="plugin version")
    register.option("--description", default="", help="what it does")
    register.option("--label", metavar="K=V", type=label, action="append", help="repeatable")

    deregister = command("deregister", _deregister, "remove a plugin")
    deregister.add_argument("plugin_id", metavar="PLUGIN_ID")
    client_options(deregister, output=False)

    watch = command("watch", _watch, "print changes as they happen, until interrupted")
    client_options(watch)
    watch.option("--source", action="append", help="only plugins of this source (repeatable)")

    release = command("release", _release, "free a plugin name and its sources (admin)")
    release.add_argument("name", metavar="NAME")
    client_options(release, output=False)

    client_options(command("status", _status, "show the registry's replicas and their lag"))

    token = command("token", _token, "make bearer tokens for the auth policy")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = token_commands.add_parser(
        "new", help="print a fresh token and its policy entry", description="print a token"
    )
    new.set_defaults(parser=new)
    new.add_argument("--principal", required=True, help="the principal's name in the policy")
    return parser


def replica_options(serve: _Parser) -> None:
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


def trust_options(serve: _Parser) -> None:
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


# serve options that are RegistrySettings fields of the same name; unset: the mode's default
LIMIT_OPTIONS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("--register-rate", rate, "Registers per second per principal (policy default 20, 0 off)"),
    ("--register-burst", limit, "burst of --register-rate (policy default 100)"),
    ("--max-instances-per-principal", limit, "live instances per principal (default 1000)"),
    ("--max-streams-per-principal", limit, "Watch/KeepAlive streams per principal (default 64)"),
    ("--max-concurrent-rpcs", count, "calls in flight at once (default 1024)"),
    ("--max-connections-per-peer", count, "connections with calls in flight per peer (256)"),
)


# -- commands -----------------------------------------------------------------------------


def _tls(ca: str | None, cert: str | None, key: str | None) -> TlsFiles | None:
    if not (ca or cert or key):
        return None
    try:
        return TlsFiles(
            ca=Path(ca) if ca else None,
            cert=Path(cert) if cert else None,
            key=Path(key) if key else None,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _serve_settings(args: argparse.Namespace) -> RegistrySettings:
    options = {_dest(flag): getattr(args, _dest(flag)) for flag, _, _ in SETTINGS_OPTIONS}
    limits = {
        _dest(flag): getattr(args, _dest(flag))
        for flag, _, _ in LIMIT_OPTIONS
        if getattr(args, _dest(flag)) is not None
    }
    allow = None
    if args.allow_addresses:
        allow = tuple(part.strip() for part in args.allow_addresses.split(",") if part.strip())
    try:
        return RegistrySettings(
            listen=args.listen,
            database_url=_database_url(args),
            auth_policy=args.auth_policy,
            insecure=args.insecure,
            reflection=not args.no_reflection,
            tls=_tls(args.tls_client_ca, args.tls_cert, args.tls_key),
            plugin_tls=_tls(args.plugin_tls_ca, args.plugin_tls_cert, args.plugin_tls_key),
            allow_addresses=allow,
            allow_unix_dirs=tuple(args.allow_unix_dir or ()),
            advertise=args.advertise,
            cluster_token=args.cluster_token,
            **options,
            **limits,
        )
    except ValueError as exc:
        raise CliError(f"invalid setting {exc}") from exc


async def _serve(args: argparse.Namespace) -> None:
    settings = _serve_settings(args)
    # Imported before logging is configured: importing alembic logs its plugin setup.
    from registry.server import RegistryServer  # the server side loads only for serve

    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Dependencies' chatter (alembic's migration steps) stays below the chosen level.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.root.level))
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


async def _migrate(args: argparse.Namespace) -> None:
    from registry.migrate import upgrade
    from registry.replica.lock import DatabaseLock, lock_for
    from registry.store import SqlStore

    url = _database_url(args)
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


async def _list(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        plugins = await client.list_plugins(
            type=TYPES[args.type] if args.type else 0,
            source=args.source or "",
            statuses=[STATUSES[s] for s in args.status or ()],
            name=args.name or "",
        )
    print(render.plugins_json(plugins) if args.output == "json" else render.plugins_table(plugins))


async def _get(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        plugin = await client.get_plugin(args.plugin_id)
    print(render.plugin_json(plugin) if args.output == "json" else render.plugin_detail(plugin))


async def _register(args: argparse.Namespace) -> None:
    kind = args.type or ("emitter" if args.emitter_name else "ingestor")
    info = pb.PluginInfo(
        name=args.name,
        version=args.version,
        type=TYPES[kind],
        description=args.description,
        sources=args.source or [],
        emitter_name=args.emitter_name or "",
    )
    async with _client(args) as client:
        response = await client.register(
            info, args.address, labels=dict(args.label or ()), no_lease=True
        )
    print(response.plugin_id)


async def _deregister(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        # Unregister is idempotent; an operator who mistypes an id should hear about it.
        await client.get_plugin(args.plugin_id)
        await client.unregister(args.plugin_id)
    print(f"deregistered {args.plugin_id}")


async def _watch(args: argparse.Namespace) -> None:
    await until_signalled(_follow(args))


async def _follow(args: argparse.Namespace) -> None:
    _client(args)  # refuses a token in clear to any of the addresses before dialing one
    addresses = _addresses(args)
    for number, address in enumerate(addresses, 1):
        if await _follow_one(args, address, last=number == len(addresses)):
            return


async def _follow_one(args: argparse.Namespace, address: str, *, last: bool) -> bool:
    """Watch on one address until the stream ends (True).

    False: it failed before its first message and the next address may be tried.
    Once a stream has shown something, its failure is the command's.
    """
    async with _client(args, address) as client:
        seen = False
        try:
            # The first message (the snapshot) must come within --timeout; later ones whenever.
            async with asyncio.timeout(args.timeout) as first:
                async for message in client.watch(sources=args.source or ()):
                    first.reschedule(None)
                    seen = True
                    lines = (
                        [render.watch_json(message)]
                        if args.output == "json"
                        else render.watch_lines(message)
                    )
                    for line in lines:
                        print(line, flush=True)
        except TimeoutError:
            if not last:
                return False
            raise CliError(
                f"the registry at {address} sent nothing within {format_duration(args.timeout)}"
            ) from None
        except RegistryUnavailable:
            if seen or last:
                raise
            return False
    return True


async def _release(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        response = await client.release(args.name)
    if not response.released:
        print(f"{args.name}: nobody owned it")
        return
    claims = [*response.sources, *response.emitter_names]
    freed = f" and {', '.join(claims)}" if claims else ""
    print(f"released {args.name}{freed} (owned by {response.principal})")


async def _status(args: argparse.Namespace) -> None:
    async with _client(args) as client:
        status = await client.get_status()
    print(render.status_json(status) if args.output == "json" else render.status_table(status))


async def _token(args: argparse.Namespace) -> None:
    from registry.trust.policy import PolicyError, new_token, policy_entry

    token = new_token()
    try:
        entry = policy_entry(args.principal, token)
    except PolicyError as exc:
        raise CliError(f"--principal: {exc}") from exc
    print(f"token: {token}")
    print("# Give the token to the principal; add this entry to the policy file:")
    print(entry)


# -- plumbing -----------------------------------------------------------------------------


def _addresses(args: argparse.Namespace) -> tuple[str, ...]:
    try:
        return parse_addresses(args.registry)
    except RegistryError as exc:
        raise CliError(f"--registry: {exc}") from exc


def _client(args: argparse.Namespace, address: str | None = None) -> RegistryClient:
    """A client of ``address``, else of every address of ``--registry``."""
    if args.timeout <= 0:
        raise CliError(f"--timeout: {args.timeout!r} must be more than 0")
    return RegistryClient(
        address or _addresses(args),
        timeout=args.timeout,
        token=args.token or None,
        tls=_tls(args.tls_ca, args.tls_cert, args.tls_key),
    )


def _database_url(args: argparse.Namespace) -> str:
    from registry.store import normalize_url  # SQLAlchemy loads only for serve and migrate

    url: str = args.db or default_database_url()
    try:
        normalize_url(url)
    except ValueError as exc:
        raise CliError(f"--db: {exc}") from exc  # not the URL itself: it may hold a password
    return url


async def until_signalled(work: Coroutine[Any, Any, None]) -> bool:
    """Run ``work`` until it ends or SIGINT/SIGTERM cancels it; True when a signal did.

    Raises:
        Whatever ``work`` raises, except the cancellation a signal caused.
    """
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        task.cancel()

    for sig in _SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await task
    except asyncio.CancelledError:
        if not received:
            raise
    finally:
        for sig in _SIGNALS:
            loop.remove_signal_handler(sig)
    return bool(received)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status is returned, never raised."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.parser.complete(args, os.environ)
        asyncio.run(args.run(args))
    except SystemExit as exc:  # argparse: --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader left (``| head``): no complaint, not even at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (RegistryError, CliError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    return 0
