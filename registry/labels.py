"""Label selectors (SPEC §1.3): which plugins a List, Resolve or Watch is about.

A selector is a comma-separated list of requirements that must all hold, a subset
of Kubernetes label selectors::

    key=value    the label is there and equal to value (``key==value`` alike)
    key!=value   the label is absent, or has another value
    key          the label is there, whatever its value
    !key         the label is absent

Whitespace around requirements, keys and values is ignored; the empty selector
(``""``, or whitespace only) matches every plugin. Keys follow the registry's label
key rules and values its label value rules (:mod:`registry.validation`), so a
selector can name every label a plugin can register, except values holding a comma
or starting or ending with whitespace. Set-based forms (``in``, ``notin``) are not
supported.

A selector is parsed once per request; matching a plugin costs one dict lookup per
requirement.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from registry.errors import InvalidArgument
from registry.validation import _LABEL_KEY, DEFAULT_LIMITS, Limits

FIELD = "label_selector"
# Requirements per selector: twice the labels a plugin may carry is room for a
# presence and a value test of every one, and bounds what matching a plugin costs.
MAX_REQUIREMENTS = 64
# How much of a bad requirement an error message quotes.
_QUOTED = 80


class Op(enum.Enum):
    """What a requirement tests, by the text it is written with."""

    EQUAL = "="
    NOT_EQUAL = "!="
    PRESENT = ""
    ABSENT = "!"


@dataclass(frozen=True, slots=True)
class Requirement:
    """One comma-separated part of a selector."""

    key: str
    op: Op
    value: str = ""

    def holds(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfies this requirement."""
        op = self.op
        if op is Op.EQUAL:
            return labels.get(self.key) == self.value
        if op is Op.NOT_EQUAL:
            return labels.get(self.key) != self.value
        if op is Op.PRESENT:
            return self.key in labels
        return self.key not in labels

    def __str__(self) -> str:
        if self.op is Op.ABSENT:
            return f"!{self.key}"
        if self.op is Op.EQUAL and self.value.startswith("="):
            return f"{self.key}=={self.value}"  # "k==v" would read as v without its "="
        return f"{self.key}{self.op.value}{self.value}"


@dataclass(frozen=True, slots=True)
class Selector:
    """Requirements that must all hold; no requirement at all matches everything.

    False in a boolean context when empty, so callers can skip matching entirely.
    ``str()`` gives the canonical text, which parses back to an equal selector.
    """

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether every requirement holds for ``labels``."""
        return all(requirement.holds(labels) for requirement in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


EVERYTHING = Selector()


def parse_selector(text: str, limits: Limits = DEFAULT_LIMITS) -> Selector:
    """Parse a ``label_selector``; the empty (or all-whitespace) text matches everything.

    ``limits``: the registry's label limits, which keys and values are checked against.

    Raises:
        InvalidArgument: ``label_selector``, naming the bad requirement and why: an
            empty requirement (``a=1,,b``), a missing or malformed key, a value too
            long or holding control characters, a misplaced ``!``, too many
            requirements.
    """
    if not text or text.isspace():
        return EVERYTHING
    # Counted before splitting: a huge selector is refused without building its parts.
    count = text.count(",") + 1
    if count > MAX_REQUIREMENTS:
        raise InvalidArgument(FIELD, f"has {count} requirements; the limit is {MAX_REQUIREMENTS}")
    return Selector(
        tuple(_requirement(i, part.strip(), limits) for i, part in enumerate(text.split(","), 1))
    )


def _requirement(number: int, term: str, limits: Limits) -> Requirement:
    if not term:
        raise _bad(number, term, "is empty")
    # Keys hold neither "=" nor "!": the first of them is where the operator starts.
    at = next((i for i, c in enumerate(term) if c in "=!"), len(term))
    key, rest = term[:at].strip(), term[at:]
    if not rest:
        op, value = Op.PRESENT, ""
    elif rest.startswith("!="):
        op, value = Op.NOT_EQUAL, rest[2:]
    elif rest.startswith("=="):
        op, value = Op.EQUAL, rest[2:]
    elif rest.startswith("="):
        op, value = Op.EQUAL, rest[1:]
    elif at == 0:  # "!key"
        op, key, value = Op.ABSENT, rest[1:].strip(), ""
        if any(c in "=!" for c in key):
            raise _bad(number, term, "'!key' takes no operator or value")
    else:
        raise _bad(number, term, "'!' must start the requirement or be part of '!='")
    _check_key(number, term, key, limits)
    value = value.strip()
    if len(value) > limits.max_label_value:
        raise _bad(
            number,
            term,
            f"the value is {len(value)} characters long; the limit is {limits.max_label_value}",
        )
    if not value.isprintable():
        raise _bad(number, term, "the value contains control characters")
    return Requirement(key, op, value)


def _check_key(number: int, term: str, key: str, limits: Limits) -> None:
    if not key:
        raise _bad(number, term, "a label key is required")
    if len(key) > limits.max_label_key:
        raise _bad(
            number,
            term,
            f"the key is {len(key)} characters long; the limit is {limits.max_label_key}",
        )
    if not _LABEL_KEY.match(key):
        raise _bad(
            number,
            term,
            f"key {_quoted(key)} must match {_LABEL_KEY.pattern.strip('^$')} "
            "(forms: key=value, key!=value, key, !key)",
        )


def _bad(number: int, term: str, reason: str) -> InvalidArgument:
    return InvalidArgument(FIELD, f"requirement {number} {_quoted(term)}: {reason}")


def _quoted(text: str) -> str:
    """``text`` quoted for a message, cut short: a client's text is not echoed whole."""
    if len(text) > _QUOTED:
        return repr(text[:_QUOTED]) + "..."
    return repr(text)
