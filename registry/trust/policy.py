"""The auth policy file (SPEC §6): the principals, how each is recognised, what each may do.

    [[principals]]
    name = "team-a"
    token_sha256 = "9f86d0…"             # hex sha256 of the token; no token is stored in clear
    certificate = "spiffe://prod/team-a"  # the verified mTLS identity
    scopes = ["register", "read"]
    names = ["team-a-*"]                  # plugin names it may register (globs)
    sources = ["k8s-*", "audit"]          # optional; absent: any source nobody owns

A file that is wrong in any way refuses to load as a whole, with a one-line reason that
names the file, the principal and the key: a typo in a key must never quietly widen or
narrow what somebody may do. :class:`PolicyHolder` keeps the policy in force and swaps
it on reload (SIGHUP) only for a file that loads.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.model import SCOPES, Principal

log = logging.getLogger(__name__)

# The keys of a [[principals]] entry; anything else is refused by name.
_KEYS = frozenset({"name", "token_sha256", "certificate", "scopes", "names", "sources"})
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# Principal names end up in logs, messages and the ownership table: keep them plain.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+-]{0,127}")
_MAX_STRING = 1024


class PolicyError(ValueError):
    """The policy file cannot be read or is invalid; the message is one line and says where."""


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    """One principal of the policy and how it is recognised (a token hash, a certificate, both)."""

    principal: Principal
    token_sha256: bytes | None = None
    certificate: str | None = None


@dataclass(frozen=True)
class AuthPolicy:
    """A loaded, valid policy: immutable; a reload builds a new one.

    Raises:
        PolicyError: on construction, for no entries or for two entries that share a
            name, a token hash or a certificate.
    """

    entries: tuple[PolicyEntry, ...]
    source: str = field(default="<policy>", compare=False)
    # Derived lookups, built once; not part of the policy's value.
    _tokens: tuple[tuple[bytes, Principal], ...] = field(
        init=False, repr=False, compare=False, default=()
    )
    _certificates: dict[str, Principal] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if not self.entries:
            raise PolicyError(f"{self.source}: no principals: a policy needs at least one")
        names: set[str] = set()
        tokens: dict[bytes, str] = {}
        certificates: dict[str, Principal] = {}
        for entry in self.entries:
            name = entry.principal.name
            if entry.token_sha256 is None and entry.certificate is None:
                raise PolicyError(
                    f"{self.source}: principal {name!r}: give token_sha256 or certificate"
                )
            if name in names:
                raise PolicyError(f"{self.source}: principal {name!r}: name: appears twice")
            names.add(name)
            if entry.token_sha256 is not None:
                other = tokens.setdefault(entry.token_sha256, name)
                if other != name:
                    raise PolicyError(
                        f"{self.source}: principal {name!r}: token_sha256: "
                        f"principal {other!r} has the same one"
                    )
            if entry.certificate is not None:
                holder = certificates.setdefault(entry.certificate, entry.principal)
                if holder.name != name:
                    raise PolicyError(
                        f"{self.source}: principal {name!r}: certificate: "
                        f"principal {holder.name!r} has the same one, {entry.certificate!r}"
                    )
        digests = tuple(
            (e.token_sha256, e.principal) for e in self.entries if e.token_sha256 is not None
        )
        object.__setattr__(self, "_tokens", digests)
        object.__setattr__(self, "_certificates", certificates)

    @property
    def principals(self) -> tuple[Principal, ...]:
        return tuple(e.principal for e in self.entries)

    def principal_named(self, name: str) -> Principal | None:
        """The principal called ``name`` (of a call a replica forwarded), or None."""
        return next((e.principal for e in self.entries if e.principal.name == name), None)

    @classmethod
    def load(cls, path: str | Path) -> AuthPolicy:
        """Read and parse a policy file. Blocking: run it off the event loop once serving.

        Raises:
            PolicyError: the file cannot be read, is not TOML, or is not a valid policy.
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise PolicyError(f"{path}: cannot read the auth policy: {reason}") from exc
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<policy>") -> AuthPolicy:
        """Parse the TOML text of a policy; ``source`` names it in error messages.

        Raises:
            PolicyError: not TOML, or not a valid policy (the message says which key).
        """
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{source}: not valid TOML: {exc}") from exc
        unknown = sorted(set(document) - {"principals"})
        if unknown:
            raise PolicyError(f"{source}: unknown top-level key {unknown[0]!r} (known: principals)")
        raw = document.get("principals")
        if raw is None or raw == []:
            raise PolicyError(f"{source}: no principals: a policy needs at least one")
        if not isinstance(raw, list):
            raise PolicyError(f"{source}: principals: must be an array of tables [[principals]]")
        entries = tuple(_entry(source, i, item) for i, item in enumerate(raw))
        return cls(entries, source=source)

    def identify_token(self, token: str) -> Principal | None:
        """The principal whose token_sha256 is the hash of ``token``, or None.

        Compares with every entry, without stopping at a match, so that the time taken
        does not tell which entry (or whether an early one) matched.
        """
        try:
            digest = hashlib.sha256(token.encode()).digest()
        except UnicodeEncodeError:
            return None
        found: Principal | None = None
        for expected, principal in self._tokens:
            if hmac.compare_digest(digest, expected):
                found = principal
        return found

    def identify_certificate(self, identity: str) -> Principal | None:
        """The principal whose ``certificate`` is ``identity`` (a verified peer's), or None."""
        # A certificate identity is not a secret (TLS proved it): a plain lookup is fine.
        return self._certificates.get(identity)


def _entry(source: str, index: int, item: Any) -> PolicyEntry:
    """One [[principals]] table, checked key by key."""
    where = f"principals[{index}]"
    if not isinstance(item, dict):
        raise PolicyError(f"{source}: {where}: must be a table [[principals]]")
    name = item.get("name")
    if name is None:
        raise PolicyError(f"{source}: {where}: name: missing")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise PolicyError(
            f"{source}: {where}: name: must be 1-128 letters, digits or ._:@/+- "
            "starting with a letter or digit"
        )
    where = f"principal {name!r}"

    def fail(key: str, reason: str) -> PolicyError:
        return PolicyError(f"{source}: {where}: {key}: {reason}")

    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key (known: {', '.join(sorted(_KEYS))})")

    digest: bytes | None = None
    if "token_sha256" in item:
        value = item["token_sha256"]
        # Never echo the value: a token pasted here by mistake must not reach a log.
        if not isinstance(value, str):
            raise fail("token_sha256", "must be a string of 64 hex digits")
        if not _HEX64.fullmatch(value):
            raise fail("token_sha256", f"must be 64 hex digits (got {len(value)} characters)")
        digest = bytes.fromhex(value)

    certificate: str | None = None
    if "certificate" in item:
        certificate = item["certificate"]
        if not isinstance(certificate, str) or not _plain(certificate):
            raise fail("certificate", "must be a non-empty string without control characters")

    if digest is None and certificate is None:
        raise fail("token_sha256", "missing: give token_sha256 or certificate (or both)")

    scopes = _strings(item, "scopes", fail, required=True)
    if not scopes:
        raise fail("scopes", f"must name at least one of {', '.join(SCOPES)}")
    for scope in scopes:
        if scope not in SCOPES:
            raise fail("scopes", f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")

    names = _strings(item, "names", fail, required=False) or ()
    sources = _strings(item, "sources", fail, required=False)
    principal = Principal(name=name, scopes=frozenset(scopes), names=names, sources=sources)
    return PolicyEntry(principal=principal, token_sha256=digest, certificate=certificate)


def _strings(
    item: dict[str, Any], key: str, fail: Callable[[str, str], PolicyError], *, required: bool
) -> tuple[str, ...] | None:
    """A list of non-empty strings under ``key``; None when absent and optional."""
    if key not in item:
        if required:
            raise fail(key, "missing")
        return None
    value = item[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise fail(key, "must be a list of strings")
    for v in value:
        if not _plain(v):
            raise fail(key, "entries must be non-empty strings without control characters")
    return tuple(value)


def _plain(value: str) -> bool:
    return 0 < len(value) <= _MAX_STRING and value.isprintable()


# -- tokens -------------------------------------------------------------------


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def token_sha256(token: str) -> str:
    """The hex sha256 of a token, as the policy file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


def policy_entry(principal: str, token: str) -> str:
    """The ``[[principals]]`` entry for ``token``, for ``polku-registry token new``.

    It carries the hash only. The grant is a narrow suggestion to edit: register and
    read, plugin names prefixed with the principal's name, and sources left open to
    whatever nobody owns yet (a commented line shows how to narrow them).

    Raises:
        PolicyError: ``principal`` is not a valid principal name.
    """
    if not _NAME.fullmatch(principal):
        raise PolicyError(
            f"principal {principal!r}: must be 1-128 letters, digits or ._:@/+- "
            "starting with a letter or digit"
        )
    return (
        "[[principals]]\n"
        f'name = "{principal}"\n'
        f'token_sha256 = "{token_sha256(token)}"\n'
        'scopes = ["register", "read"]\n'
        f'names = ["{principal}-*"]  # the plugin names it may register\n'
        f'# sources = ["{principal}-*"]  # optional: the sources and emitter names it may claim\n'
    )


# -- the policy in force ------------------------------------------------------


class PolicyHolder:
    """The policy in force, read from one file; :meth:`reload` swaps it for a good file only.

    ``current`` is read on every call by the interceptor (``holder`` itself is also a
    callable that returns it) and replaced by a single assignment, so readers on the
    loop never see a half-loaded policy.
    """

    def __init__(self, path: str | Path, policy: AuthPolicy) -> None:
        self.path = Path(path)
        self.current: AuthPolicy | None = policy

    def __call__(self) -> AuthPolicy | None:
        return self.current

    @classmethod
    def from_file(cls, path: str | Path) -> PolicyHolder:
        """Load the policy at start. Blocking.

        Raises:
            PolicyError: the file cannot be read or is invalid.
        """
        return cls(path, AuthPolicy.load(path))

    async def reload(self) -> bool:
        """Re-read the file off the event loop; return whether the policy changed.

        A file that does not load keeps the old policy and logs one WARNING with the
        reason (no traceback; reasons never carry a token).
        """
        try:
            policy = await asyncio.to_thread(AuthPolicy.load, self.path)
        except PolicyError as exc:
            log.warning("auth policy not reloaded, the previous one stays in force: %s", exc)
            return False
        if policy == self.current:
            return False
        self.current = policy
        log.info("auth policy reloaded from %s: %d principals", self.path, len(policy.entries))
        return True
