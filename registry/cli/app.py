"""The command table (:func:`build_parser`) and :func:`main`, which runs one command."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import registry
from registry.cli import commands, follow, serve
from registry.cli.commands import STATUSES, TYPES, client_options, selector_option
from registry.cli.parser import PROG, CliError, Parser, UsageError, label
from registry.durations import format_duration
from registry.errors import RegistryError
from registry.logs import configure_logging


def build_parser() -> Parser:
    """The parser of every command; :meth:`Parser.complete` finishes what it parsed."""
    parser = Parser(
        prog=PROG,
        description="The POLKU plugin registry and its operator tool. "
        f"'{PROG} help COMMAND' shows a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {registry.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], Any], help: str) -> Parser:
        sub: Parser = subparsers.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run, parser=sub)
        return sub

    wide = ("table", "wide", "json")

    serve.serve_options(command("serve", serve.serve, "run the registry (migrations run at start)"))

    serve.db_option(command("migrate", serve.migrate, "bring a database to the current schema"))

    listing = command("list", commands.list_plugins, "list registered plugins")
    client_options(listing, output=wide)
    listing.option("--source", environment=False, help="only plugins that ingest this source")
    listing.option("--type", choices=tuple(TYPES), environment=False, help="only of this type")
    listing.option(
        "--status", choices=tuple(STATUSES), action="append", environment=False, help="repeatable"
    )
    listing.option("--name", environment=False, help="only instances of this plugin")
    selector_option(listing)

    get = command("get", commands.get_plugin, "show one plugin")
    get.add_argument("plugin_id", metavar="PLUGIN_ID")
    client_options(get, output=wide)

    register = command("register", commands.register, "register a plugin on its behalf (no lease)")
    client_options(register, output=())
    register.option("--name", required=True, help="plugin name")
    register.option("--address", required=True, help="host:port, http(s)://host:port, unix:/path")
    register.option("--source", action="append", exclusive="routes", help="a source; repeatable")
    register.option("--emitter-name", exclusive="routes", help="the name it emits as")
    register.required_groups.add("routes")
    register.option("--type", choices=tuple(TYPES), shown="default from the routes", help="")
    register.option("--version", default="", help="plugin version")
    register.option("--description", default="", help="what it does")
    register.option("--label", metavar="K=V", type=label, action="append", help="repeatable")

    deregister = command("deregister", commands.deregister, "remove a plugin")
    deregister.add_argument("plugin_id", metavar="PLUGIN_ID")
    client_options(deregister, output=())

    for name, undrain, help in (
        ("drain", False, "take a plugin's instances out of routing (still checked, kept)"),
        ("undrain", True, "put drained instances back into routing"),
    ):
        sub = command(name, commands.drain, help)
        sub.set_defaults(undrain=undrain)
        target = sub.add_mutually_exclusive_group(required=True)
        target.add_argument("plugin_id", metavar="PLUGIN_ID", nargs="?", help="one instance")
        target.add_argument("--name", help="every instance of this plugin")
        client_options(sub, output=wide)

    watch = command("watch", follow.watch, "print changes as they happen, until interrupted")
    client_options(watch)
    watch.option(
        "--source",
        action="append",
        environment=False,
        help="only plugins of this source (repeatable)",
    )
    selector_option(watch)
    watch.option(
        "--no-reconnect",
        action="store_true",
        default=False,
        help="exit 1 when the stream ends instead of resuming on a new one",
    )

    release = command("release", commands.release, "free a plugin name and its sources (admin)")
    release.add_argument("name", metavar="NAME")
    client_options(release, output=())

    status_help = "show the registry's replicas and their lag"
    client_options(command("status", commands.show_status, status_help))

    proto_help = "write the registry's .proto files (for grpcurl, Node, ...)"
    proto = command("proto", commands.proto, proto_help)
    proto.option("--out", metavar="DIR", required=True, help="folder to write polku/... under")

    token = command("token", commands.make_token, "make bearer tokens for the auth policy")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = token_commands.add_parser(
        "new", help="print a fresh token and its policy entry", description="print a token"
    )
    new.set_defaults(parser=new)
    new.add_argument("--principal", required=True, help="the principal's name in the policy")

    helping = command("help", commands.help_page, "show the commands, or one command's options")
    helping.add_argument(
        "topic", metavar="COMMAND", nargs="?", choices=sorted(subparsers.choices), help=""
    )
    helping.set_defaults(pages={"": parser, **subparsers.choices})
    return parser


def _check(args: argparse.Namespace) -> None:
    """Checks argparse cannot make without printing its usage block.

    Raises:
        UsageError: ``--timeout`` is not more than 0.
    """
    timeout = getattr(args, "timeout", None)
    if timeout is not None and timeout <= 0:
        raise UsageError(f"--timeout must be more than 0 (got {format_duration(timeout)})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status is returned, never raised.

    0 success, 1 a runtime error (one line on stderr), 2 a usage error, 130 interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.parser.complete(args, os.environ)
        _check(args)
        if args.command != "serve":  # serve's logging follows its flags
            configure_logging("warning", "text")  # the client's own warnings, as one line
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
        return 2 if isinstance(exc, UsageError) else 1
    return 0
