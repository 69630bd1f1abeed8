"""parse_duration: the forms operators write, and everything it must refuse."""

from __future__ import annotations

import pytest

from registry.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("10", 10.0),
        ("0.25", 0.25),
        (".5", 0.5),
        ("5.", 5.0),
        ("250ms", 0.25),
        ("0ms", 0.0),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1.5h", 5400.0),
        (" 30s ", 30.0),
        # Compound, largest unit first, each at most once.
        ("1m30s", 90.0),
        ("1h2m", 3720.0),
        ("1h2m3s", 3723.0),
        ("2s500ms", 2.5),
        ("1h0m", 3600.0),
        ("1.5m30s", 120.0),
        ("1h30s", 3630.0),
        ("1m250ms", 60.25),
    ],
)
def test_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "-1",
        "-5s",
        "+5s",
        "banana",
        "5 s",
        "5sec",
        "5d",
        "s",
        "1e3",
        "nan",
        "inf",
        "infs",
        "1.2.3",
        "0x10",
        "9" * 400,  # finite digits, infinite float
        "9" * 400 + "h1s",
        # Compound forms that are likely typos or truncated.
        "30s1m",  # smaller unit first
        "1m1m",  # a unit twice
        "1m30",  # a trailing number without its unit
        "1m 30s",
        "1m-30s",
        "1ms5s",
        "m30s",
        "1h2",
    ],
)
def test_refuses_with_the_input_and_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a duration|too large") as caught:
        parse_duration(text)
    message = str(caught.value)
    assert repr(text) in message
    assert "250ms" in message
    assert "5m" in message
    assert "1m30s" in message


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.25, "250ms"), (1, "1s"), (5, "5s"), (90, "90s"), (300, "5m"), (7200, "2h")],
)
def test_format_reads_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds)
