"""The client commands: each calls the registry through :class:`RegistryClient` and prints.

Their filters and targets (``--name``, ``--source``, ``--type``, ``--status``, ``-l``)
read no environment variable: a variable left over from a ``register`` must not
quietly narrow a ``list`` (SPEC §9). How results look is :mod:`registry.render`'s.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from registry import render
from registry.cli.parser import ENV_PREFIX, CliError, Parser, duration, tls_files
from registry.client import DEFAULT_REGISTRY, RegistryClient, parse_addresses
from registry.errors import RegistryError
from registry.wire import pb

TYPES = {"ingestor": pb.PLUGIN_TYPE_INGESTOR, "emitter": pb.PLUGIN_TYPE_EMITTER}
STATUSES = {
    "unknown": pb.PLUGIN_STATUS_UNKNOWN,
    "healthy": pb.PLUGIN_STATUS_HEALTHY,
    "unhealthy": pb.PLUGIN_STATUS_UNHEALTHY,
    "expired": pb.PLUGIN_STATUS_EXPIRED,
    "draining": pb.PLUGIN_STATUS_DRAINING,
}


# -- options ------------------------------------------------------------------------------


def client_options(sub: Parser, *, output: tuple[str, ...] = ("table", "json")) -> None:
    """Where the registry is and how to reach it; ``-o`` with ``output`` unless empty."""
    sub.option(
        "--registry",
        metavar="ADDR",
        env=ENV_PREFIX,
        default=DEFAULT_REGISTRY,
        help="host:port, or https://host:port for TLS; replicas as a,b,c",
    )
    sub.option("--timeout", type=duration, default=5.0, help="deadline of each call, > 0")
    sub.option("--token", metavar="TOKEN", help="bearer token (never sent in clear off-host)")
    sub.option("--tls-ca", metavar="PEM", help="CA that verifies the registry (TLS)")
    sub.option("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
    sub.option("--tls-key", metavar="PEM", help="key of --tls-cert")
    if output:
        sub.option("-o", "--output", choices=output, default="table", help="format")


def selector_option(sub: Parser) -> None:
    sub.option(
        "-l",
        "--selector",
        metavar="SELECTOR",
        action="append",
        environment=False,
        help="labels that must hold: k=v, k!=v, k, !k, comma-separated; repeatable",
    )


def selector(args: argparse.Namespace) -> str:
    """The ``-l`` selectors as one: each must hold, as must each part of one."""
    return ",".join(args.selector or ())


def registry_addresses(args: argparse.Namespace) -> tuple[str, ...]:
    """Every address of ``--registry``.

    Raises:
        CliError: ``--registry`` is malformed.
    """
    try:
        return parse_addresses(args.registry)
    except RegistryError as exc:
        raise CliError(f"--registry: {exc}") from exc


def client_for(args: argparse.Namespace, address: str | None = None) -> RegistryClient:
    """A client of ``address``, else of every address of ``--registry``."""
    return RegistryClient(
        address or registry_addresses(args),
        timeout=args.timeout,
        token=args.token or None,
        tls=tls_files(args.tls_ca, args.tls_cert, args.tls_key),
    )


# -- commands -----------------------------------------------------------------------------


async def list_plugins(args: argparse.Namespace) -> None:
    async with client_for(args) as client:
        plugins = await client.list_plugins(
            type=TYPES[args.type] if args.type else 0,
            source=args.source or "",
            statuses=[STATUSES[s] for s in args.status or ()],
            name=args.name or "",
            label_selector=selector(args),
        )
    print(_plugins(args, plugins))


async def get_plugin(args: argparse.Namespace) -> None:
    async with client_for(args) as client:
        plugin = await client.get_plugin(args.plugin_id)
    if args.output == "json":
        print(render.plugin_json(plugin))
    elif args.output == "wide":  # its row of the wide table, as list -o wide shows it
        print(render.plugins_table([plugin], wide=True))
    else:
        print(render.plugin_detail(plugin))


async def drain(args: argparse.Namespace) -> None:
    async with client_for(args) as client:
        response = await client.drain(
            plugin_id=args.plugin_id or "", name=args.name or "", undrain=args.undrain
        )
    print(_plugins(args, response.plugins))


def _plugins(args: argparse.Namespace, plugins: Sequence[pb.RegisteredPlugin]) -> str:
    if args.output == "json":
        return render.plugins_json(plugins)
    return render.plugins_table(plugins, wide=args.output == "wide")


async def register(args: argparse.Namespace) -> None:
    kind = args.type or ("emitter" if args.emitter_name else "ingestor")
    info = pb.PluginInfo(
        name=args.name,
        version=args.version,
        type=TYPES[kind],
        description=args.description,
        sources=args.source or [],
        emitter_name=args.emitter_name or "",
    )
    async with client_for(args) as client:
        response = await client.register(
            info, args.address, labels=dict(args.label or ()), no_lease=True
        )
    print(response.plugin_id)


async def deregister(args: argparse.Namespace) -> None:
    async with client_for(args) as client:
        # Unregister is idempotent; an operator who mistypes an id should hear about it.
        await client.get_plugin(args.plugin_id)
        await client.unregister(args.plugin_id)
    print(f"deregistered {args.plugin_id}")


async def release(args: argparse.Namespace) -> None:
    async with client_for(args) as client:
        response = await client.release(args.name)
    if not response.released:
        print(f"{args.name}: nobody owned it")
        return
    claims = [*response.sources, *response.emitter_names]
    freed = f" and {', '.join(claims)}" if claims else ""
    print(f"released {args.name}{freed} (owned by {response.principal})")


async def show_status(args: argparse.Namespace) -> None:
    async with client_for(args) as client:
        status = await client.get_status()
    print(render.status_json(status) if args.output == "json" else render.status_table(status))


async def proto(args: argparse.Namespace) -> None:
    from registry.protos import write_protos

    for path in write_protos(Path(args.out)):
        print(path)


async def make_token(args: argparse.Namespace) -> None:
    from registry.trust.policy import PolicyError, new_token, policy_entry

    token = new_token()
    try:
        entry = policy_entry(args.principal, token)
    except PolicyError as exc:
        raise CliError(f"--principal: {exc}") from exc
    print(f"token: {token}")
    print("# Give the token to the principal; add this entry to the policy file:")
    print(entry)


async def help_page(args: argparse.Namespace) -> None:
    page: argparse.ArgumentParser = args.pages[args.topic or ""]
    page.print_help()
