"""The auth policy file (SPEC §6 "The policy file"): what loads, what refuses to, and why."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import string

import pytest

from registry.model import Principal
from registry.trust.policy import (
    AuthPolicy,
    PolicyError,
    PolicyHolder,
    new_token,
    policy_entry,
    token_sha256,
)

TOKEN_A = "token-of-team-a"
TOKEN_B = "token-of-team-b"
HASH_A = hashlib.sha256(TOKEN_A.encode()).hexdigest()
HASH_B = hashlib.sha256(TOKEN_B.encode()).hexdigest()

VALID = f"""
[[principals]]
name = "team-a"
token_sha256 = "{HASH_A}"
certificate = "spiffe://prod/team-a"
scopes = ["register", "read"]
names = ["team-a-*"]
sources = ["k8s-*", "audit"]

[[principals]]
name = "gateway"
certificate = "gateway.prod.internal"
scopes = ["read"]
names = []

[[principals]]
name = "ops"
token_sha256 = "{HASH_B.upper()}"
scopes = ["admin"]
"""


def entry(**keys: object) -> str:
    """One [[principals]] table with the given keys, as TOML."""
    lines = ["[[principals]]"]
    for key, value in keys.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, list):
            items = ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value)
            lines.append(f"{key} = [{items}]")
        else:
            lines.append(f"{key} = {str(value).lower()}")
    return "\n".join(lines) + "\n"


def good(**overrides: object) -> dict[str, object]:
    keys: dict[str, object] = {
        "name": "team-a",
        "token_sha256": HASH_A,
        "scopes": ["register"],
        "names": ["team-a-*"],
    }
    keys.update(overrides)
    return {k: v for k, v in keys.items() if v is not None}


# -- loading ------------------------------------------------------------------


def test_a_valid_policy_loads_every_principal():
    policy = AuthPolicy.parse(VALID, source="policy.toml")
    assert policy.principals == (
        Principal(
            name="team-a",
            scopes=frozenset({"register", "read"}),
            names=("team-a-*",),
            sources=("k8s-*", "audit"),
        ),
        Principal(name="gateway", scopes=frozenset({"read"}), names=(), sources=None),
        Principal(name="ops", scopes=frozenset({"admin"}), names=(), sources=None),
    )
    team_a, gateway, ops = policy.entries
    assert team_a.token_sha256 == bytes.fromhex(HASH_A)
    assert team_a.certificate == "spiffe://prod/team-a"
    assert gateway.token_sha256 is None
    # Upper-case hex is the same hash.
    assert ops.token_sha256 == bytes.fromhex(HASH_B)
    assert ops.certificate is None


def test_load_reads_a_file_and_names_it_in_errors(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(VALID)
    assert len(AuthPolicy.load(path).entries) == 3
    path.write_text(entry(**good(scopes=["rgister"])))
    with pytest.raises(PolicyError, match=re.escape(str(path))):
        AuthPolicy.load(path)


def test_a_missing_file_is_a_policy_error(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(PolicyError, match=r"nope\.toml: cannot read the auth policy"):
        AuthPolicy.load(missing)


def test_two_loads_of_the_same_text_are_equal_whatever_the_source():
    assert AuthPolicy.parse(VALID, source="a") == AuthPolicy.parse(VALID, source="b")
    assert AuthPolicy.parse(VALID) != AuthPolicy.parse(entry(**good()))


# -- refusals -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "p.toml: no principals"),
        ("principals = []", "p.toml: no principals"),
        ("[principals]\nname = 'x'", "p.toml: principals: must be an array of tables"),
        ("principal = 1\n" + entry(**good()), "p.toml: unknown top-level key 'principal'"),
        ("[[principals]\n", "p.toml: not valid TOML"),
        ("principals = [1]", r"p.toml: principals\[0\]: must be a table"),
        (entry(token_sha256=HASH_A, scopes=["read"]), r"principals\[0\]: name: missing"),
        (entry(**good(name="has space")), r"principals\[0\]: name: must be"),
        (entry(**good(name=7)), r"principals\[0\]: name: must be"),
        (
            entry(**good(token_sha256=None)),
            "principal 'team-a': token_sha256: missing: give token_sha256 or certificate",
        ),
        (entry(**good(token_sha256="abc")), "token_sha256: must be 64 hex digits"),
        (entry(**good(token_sha256="g" * 64)), "token_sha256: must be 64 hex digits"),
        (entry(**good(token_sha256=HASH_A + "0")), r"token_sha256: must be 64 hex digits \(got 65"),
        (entry(**good(token_sha256=5)), "token_sha256: must be a string"),
        (entry(**good(certificate="")), "principal 'team-a': certificate: must be a non-empty"),
        (entry(**good(certificate=1)), "certificate: must be a non-empty string"),
        (entry(**good(scopes=None)), "principal 'team-a': scopes: missing"),
        (entry(**good(scopes=[])), "scopes: must name at least one of register, read, admin"),
        (entry(**good(scopes=["rgister"])), "scopes: unknown scope 'rgister'"),
        (entry(**good(scopes="read")), "scopes: must be a list of strings"),
        (entry(**good(names="team-a-*")), "principal 'team-a': names: must be a list of strings"),
        (entry(**good(names=[1])), "names: must be a list of strings"),
        (entry(**good(names=[""])), "names: entries must be non-empty strings"),
        (entry(**good(sources="k8s")), "principal 'team-a': sources: must be a list of strings"),
        (entry(**good(source=["k8s"])), "principal 'team-a': source: unknown key"),
        (entry(**good(scope=["read"])), "principal 'team-a': scope: unknown key"),
        (entry(**good(token_sha265=HASH_B)), "principal 'team-a': token_sha265: unknown key"),
        (
            entry(**good()) + entry(**good(token_sha256=HASH_B)),
            "principal 'team-a': name: appears twice",
        ),
        (
            entry(**good()) + entry(**good(name="team-b")),
            "principal 'team-b': token_sha256: principal 'team-a' has the same one",
        ),
        (
            entry(**good(certificate="c"))
            + entry(**good(name="b", token_sha256=HASH_B, certificate="c")),
            "principal 'b': certificate: principal 'team-a' has the same one, 'c'",
        ),
    ],
)
def test_a_bad_policy_refuses_to_load_and_says_where(text, message):
    with pytest.raises(PolicyError, match=message) as caught:
        AuthPolicy.parse(text, source="p.toml")
    reason = str(caught.value)
    assert "\n" not in reason
    assert reason.startswith("p.toml: ")


def test_a_token_pasted_as_its_hash_is_never_echoed():
    token = new_token()
    with pytest.raises(PolicyError) as caught:
        AuthPolicy.parse(entry(**good(token_sha256=token)))
    assert token not in str(caught.value)
    assert "token_sha256" in str(caught.value)


def test_policy_error_is_a_value_error():
    assert issubclass(PolicyError, ValueError)


# -- identification ------------------------------------------------------------


def test_identify_token_finds_the_right_principal_among_several():
    tokens = [f"token-{i}" for i in range(20)]
    text = "".join(
        entry(name=f"p{i}", token_sha256=token_sha256(t), scopes=["read"])
        for i, t in enumerate(tokens)
    )
    policy = AuthPolicy.parse(text)
    for i, token in enumerate(tokens):
        found = policy.identify_token(token)
        assert found is not None
        assert found.name == f"p{i}"
    assert policy.identify_token("token-20") is None
    assert policy.identify_token("") is None
    assert policy.identify_token(tokens[0] + " ") is None
    # A token that cannot be UTF-8 encoded is simply unknown.
    assert policy.identify_token("\udc80") is None


def test_identify_token_ignores_certificate_only_principals():
    policy = AuthPolicy.parse(VALID)
    assert policy.identify_token(TOKEN_A).name == "team-a"
    assert policy.identify_token(TOKEN_B).name == "ops"
    assert policy.identify_token("gateway.prod.internal") is None


def test_identify_certificate():
    policy = AuthPolicy.parse(VALID)
    assert policy.identify_certificate("spiffe://prod/team-a").name == "team-a"
    assert policy.identify_certificate("gateway.prod.internal").name == "gateway"
    assert policy.identify_certificate("spiffe://prod/team-b") is None
    assert policy.identify_certificate("ops") is None


# -- tokens and entries ---------------------------------------------------------


def test_new_token_is_256_random_bits_url_safe():
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    alphabet = set(string.ascii_letters + string.digits + "-_")
    for token in tokens:
        assert set(token) <= alphabet
        assert len(base64.urlsafe_b64decode(token + "=")) == 32


def test_token_sha256_is_the_hex_digest():
    assert token_sha256("test") == (
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    )


def test_policy_entry_parses_back_and_recognises_its_token():
    token = new_token()
    snippet = policy_entry("team-a", token)
    assert token not in snippet
    policy = AuthPolicy.parse(snippet, source="snippet")
    principal = policy.identify_token(token)
    assert principal == Principal(
        name="team-a", scopes=frozenset({"register", "read"}), names=("team-a-*",), sources=None
    )
    # Two entries for two principals go into one file together.
    both = AuthPolicy.parse(snippet + "\n" + policy_entry("team-b", new_token()))
    assert [p.name for p in both.principals] == ["team-a", "team-b"]


def test_policy_entry_refuses_a_name_the_policy_would_refuse():
    with pytest.raises(PolicyError, match="principal 'a\"b'"):
        policy_entry('a"b', new_token())


# -- the policy in force --------------------------------------------------------


async def test_reload_takes_a_good_file_and_keeps_the_old_policy_on_a_bad_one(tmp_path, caplog):
    path = tmp_path / "policy.toml"
    path.write_text(entry(**good()))
    holder = PolicyHolder.from_file(path)
    first = holder.current
    assert first is not None
    assert holder() is first
    assert first.identify_token(TOKEN_A).name == "team-a"

    assert await holder.reload() is False  # same file, same policy
    assert holder.current == first

    secret = new_token()
    path.write_text(entry(**good(token_sha256=secret)))
    with caplog.at_level(logging.WARNING, logger="registry.trust.policy"):
        assert await holder.reload() is False
    assert holder.current is first
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "previous one stays in force" in text
    assert "token_sha256" in text
    assert secret not in text
    assert warnings[0].exc_info is None
    assert "\n" not in text

    path.unlink()
    assert await holder.reload() is False
    assert holder.current is first

    path.write_text(entry(**good(token_sha256=HASH_B, name="team-b")))
    assert await holder.reload() is True
    assert holder.current is not first
    assert holder.current.identify_token(TOKEN_A) is None
    assert holder.current.identify_token(TOKEN_B).name == "team-b"


def test_from_file_refuses_a_bad_file(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text("principals = []")
    with pytest.raises(PolicyError, match="no principals"):
        PolicyHolder.from_file(path)
