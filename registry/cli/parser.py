"""The command line's parser: options that fall back on the environment, and value types.

Options read an environment variable, ``POLKU_REGISTRY_<OPTION>`` (``--registry``
reads ``POLKU_REGISTRY``): the command line beats the environment, which beats the
default. An option added with ``environment=False`` reads none.

argparse rather than click: the environment fall-back, the mutually exclusive
routes and the error formats operators and tests rely on are already here, and
click would be one more dependency without removing much of it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.durations import format_duration, parse_duration
from registry.trust.tls import TlsFiles

PROG = "polku-registry"
ENV_PREFIX = "POLKU_REGISTRY"


class CliError(Exception):
    """A failure reported as one line on stderr, exit status 1."""


class UsageError(CliError):
    """A bad value reported as one line on stderr (no usage block), exit status 2."""


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


class Parser(argparse.ArgumentParser):
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
        environment: bool = True,
        required: bool = False,
        exclusive: str = "",
        **kwargs: Any,
    ) -> None:
        """Add an option read from the command line, else ``env``, else ``default``.

        ``environment=False``: no variable at all (the filters of client commands).
        """
        env = (env or f"{ENV_PREFIX}_{dest(flags[-1]).upper()}") if environment else ""
        kind = kwargs.get("type")
        if kind in (duration, whole_seconds, count):
            kwargs.setdefault("metavar", "N" if kind is count else "D")
        if kind in (duration, whole_seconds) and default is not None:
            shown = f"default {format_duration(default)}"
        shown = "required" if required else shown or (f"default {default}" if default else "")
        note = "; ".join(part for part in (f"env {env}" if env else "", shown) if part)
        help = f"{help} ({note})" if note else help
        container: argparse._ActionsContainer = self
        if exclusive:
            if exclusive not in self._groups:
                self._groups[exclusive] = self.add_mutually_exclusive_group()
            container = self._groups[exclusive]
        action = container.add_argument(
            *flags,
            default=argparse.SUPPRESS,
            help=help.strip().replace("%", "%%"),
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
            name = option.action.dest
            if name in given:
                continue
            rivals_given = option.exclusive and any(
                o.exclusive == option.exclusive and o.action.dest in given for o in self.options
            )
            raw = "" if rivals_given or not option.env else environ.get(option.env, "")
            if raw:
                setattr(args, name, _from_environment(option, raw))
                from_env.setdefault(option.exclusive, []).append(option.env)
            elif option.required:
                also = f" (or set {option.env})" if option.env else ""
                self.error(f"{_flag(option)} is required{also}")
            else:
                setattr(args, name, option.default)
        for key, names in from_env.items():
            if key and len(names) > 1:
                raise CliError(f"{' and '.join(names)} are both set; give only one")
        for key in self.required_groups:
            group = [o for o in self.options if o.exclusive == key]
            if not any(getattr(args, o.action.dest) for o in group):
                self.error(f"one of {', '.join(map(_flag, group))} is required")


def dest(flag: str) -> str:
    """The namespace attribute of ``flag``: ``--lease-ttl`` is ``lease_ttl``."""
    return flag.lstrip("-").replace("-", "_")


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


# -- option values into settings ----------------------------------------------------------


def tls_files(ca: str | None, cert: str | None, key: str | None) -> TlsFiles | None:
    """The TLS files the options name; None when they name none.

    Raises:
        CliError: a certificate without its key, or a key without its certificate.
    """
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
