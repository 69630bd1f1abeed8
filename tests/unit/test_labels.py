"""Label selectors (SPEC §1.3): parsing, matching and refusals, without a server."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from registry.catalog import Catalog
from registry.errors import InvalidArgument
from registry.labels import (
    EVERYTHING,
    MAX_REQUIREMENTS,
    Op,
    Requirement,
    Selector,
    parse_selector,
)
from registry.model import PluginType, Registration
from registry.validation import Limits

PROD = {"env": "prod", "zone": "a", "tier": ""}
STAGING = {"env": "staging", "zone": "b"}
BARE: dict[str, str] = {}

# (selector, matches PROD, matches STAGING, matches BARE)
MATCHING = [
    # the empty selector
    ("", True, True, True),
    ("   ", True, True, True),
    # key=value
    ("env=prod", True, False, False),
    ("env==prod", True, False, False),
    ("env=", False, False, False),
    ("tier=", True, False, False),
    ("env=Prod", False, False, False),  # values are case-sensitive
    # key!=value: absent counts as "another value", as in Kubernetes
    ("env!=prod", False, True, True),
    ("tier!=", False, True, True),
    # key
    ("zone", True, True, False),
    ("tier", True, False, False),
    ("Zone", False, False, False),  # keys are case-sensitive
    # !key
    ("!zone", False, False, True),
    ("!tier", False, True, True),
    ("!missing", True, True, True),
    # combinations: all must hold
    ("env=prod,zone=a", True, False, False),
    ("env=prod,zone=b", False, False, False),
    ("zone,!tier", False, True, False),
    ("env!=prod,!zone", False, False, True),
    ("env=prod,env=staging", False, False, False),
    ("zone,zone!=a", False, True, False),
    # whitespace around requirements, operators, keys and values
    (" env = prod , zone ", True, False, False),
    ("\tenv!=prod\n", False, True, True),
    ("! zone", False, False, True),
    ("env= prod", True, False, False),
]


@pytest.mark.parametrize(("text", "prod", "staging", "bare"), MATCHING)
def test_matching(text, prod, staging, bare):
    selector = parse_selector(text)
    assert selector.matches(PROD) is prod
    assert selector.matches(STAGING) is staging
    assert selector.matches(BARE) is bare


PARSED = [
    ("a=b", [Requirement("a", Op.EQUAL, "b")]),
    ("a==b", [Requirement("a", Op.EQUAL, "b")]),
    ("a!=b", [Requirement("a", Op.NOT_EQUAL, "b")]),
    ("a", [Requirement("a", Op.PRESENT)]),
    ("!a", [Requirement("a", Op.ABSENT)]),
    ("a=", [Requirement("a", Op.EQUAL, "")]),
    # values may hold "=", "!" and inner spaces; keys may hold . _ / -
    ("a=b=c", [Requirement("a", Op.EQUAL, "b=c")]),
    ("a!=b!c", [Requirement("a", Op.NOT_EQUAL, "b!c")]),
    ("a= =b", [Requirement("a", Op.EQUAL, "=b")]),
    ("a=two words", [Requirement("a", Op.EQUAL, "two words")]),
    ("example.com/team_x-y=ops", [Requirement("example.com/team_x-y", Op.EQUAL, "ops")]),
    (
        "a=1, b!=2, c, !d",
        [
            Requirement("a", Op.EQUAL, "1"),
            Requirement("b", Op.NOT_EQUAL, "2"),
            Requirement("c", Op.PRESENT),
            Requirement("d", Op.ABSENT),
        ],
    ),
]


@pytest.mark.parametrize(("text", "requirements"), PARSED)
def test_parsing(text, requirements):
    selector = parse_selector(text)
    assert list(selector.requirements) == requirements
    # The canonical text parses back to the same selector.
    assert parse_selector(str(selector)) == selector


def test_the_empty_selector_is_everything_and_false():
    assert parse_selector("") == EVERYTHING == Selector()
    assert parse_selector(" \t\n") == EVERYTHING
    assert not EVERYTHING
    assert parse_selector("a")
    assert str(parse_selector(" a = 1 ,!b ")) == "a=1,!b"


BAD = [
    # (selector, words the reason must hold)
    (",", "requirement 1 '': is empty"),
    ("a=1,", "requirement 2 '': is empty"),
    ("a=1,,b", "requirement 2 '': is empty"),
    (" , a", "requirement 1 '': is empty"),
    ("=1", "a label key is required"),
    ("!=1", "a label key is required"),
    ("!", "a label key is required"),
    ("! ", "a label key is required"),
    ("a b=1", "key 'a b' must match"),
    ("-a=1", "key '-a' must match"),
    ("a-=1", "key 'a-' must match"),
    ("ä=1", "key 'ä' must match"),
    ("env in (a,b)", "key 'env in (a' must match"),
    ("a!b", "'!' must start the requirement"),
    ("a!", "'!' must start the requirement"),
    ("!a=1", "'!key' takes no operator or value"),
    ("!a!=1", "'!key' takes no operator or value"),
    ("!!a", "'!key' takes no operator or value"),
    ("a=b\x00c", "the value contains control characters"),
    ("a=b\tc", "the value contains control characters"),
    ("k" * 64, "the key is 64 characters long; the limit is 63"),
    ("a=" + "v" * 257, "the value is 257 characters long; the limit is 256"),
    (",".join(["a"] * (MAX_REQUIREMENTS + 1)), f"the limit is {MAX_REQUIREMENTS}"),
]


@pytest.mark.parametrize(("text", "reason"), BAD)
def test_bad_syntax_is_invalid_argument_naming_label_selector(text, reason):
    with pytest.raises(InvalidArgument) as caught:
        parse_selector(text)
    assert caught.value.field == "label_selector"
    assert str(caught.value).startswith("label_selector: ")
    assert reason in caught.value.reason


def test_a_long_bad_requirement_is_not_echoed_whole():
    text = "a b" + "x" * 10_000
    with pytest.raises(InvalidArgument) as caught:
        parse_selector(text)
    assert len(str(caught.value)) < 400


def test_as_many_requirements_as_the_limit_are_accepted():
    text = ",".join(f"k{i}" for i in range(MAX_REQUIREMENTS))
    assert len(parse_selector(text).requirements) == MAX_REQUIREMENTS


def test_the_registry_limits_apply():
    small = Limits(max_label_key=3, max_label_value=2)
    assert parse_selector("abc=xy", small).matches({"abc": "xy"})
    with pytest.raises(InvalidArgument, match="the limit is 3"):
        parse_selector("abcd=x", small)
    with pytest.raises(InvalidArgument, match="the limit is 2"):
        parse_selector("a=xyz", small)


def test_catalog_select_filters_by_labels():
    catalog = Catalog()
    now = datetime.now(UTC)
    ids = {}
    for port, (name, labels) in enumerate((("p", PROD), ("s", STAGING), ("b", BARE))):
        registration = Registration(
            name=name,
            type=PluginType.INGESTOR,
            address=f"127.0.0.1:{7000 + port}",
            sources=(name,),
            labels=labels,
        )
        ids[name] = catalog.register(registration, now).plugin.plugin_id

    def selected(text: str, source: str = "", name: str = "", after: str = "") -> list[str]:
        plugins = catalog.select(labels=parse_selector(text), source=source, name=name, after=after)
        return [p.name for p in plugins]

    assert sorted(selected("")) == ["b", "p", "s"]
    assert sorted(selected("zone")) == ["p", "s"]
    assert sorted(selected("env!=prod")) == ["b", "s"]
    assert selected("!zone") == ["b"]
    assert selected("zone", source="s") == ["s"]
    assert selected("zone", name="b") == []
    # Paging: the walk starts after the given id, the selector still applied.
    in_order = selected("zone")
    assert selected("zone", after=ids[in_order[0]]) == in_order[1:]
