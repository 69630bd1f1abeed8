"""How the ``polku-registry`` process logs (SPEC §9 "Logs"): only the CLI calls this.

    configure_logging("info", "json")

Two formats on stderr: ``text`` (``2026-03-04 05:06:07,089 INFO registry.server:
registry serving on …``) and ``json``, one object per line::

    {"time": "2026-03-04T05:06:07.089Z", "level": "INFO", "logger": "registry.transitions",
     "message": "plugin registered id=… name=lines …", "event": "registered", "plugin_id": …}

A JSON line carries ``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``,
then every field the call attached with ``extra=`` (the plugin lines of
:mod:`registry.transitions`, the start line), then ``exception`` when there was one.

Dependencies' chatter stays out of the way at every level: the loggers of
:data:`DEPENDENCIES` (driver debug, Alembic's plugin setup, gRPC's loop notes) log
WARNING and above, or what the chosen level lets through if it is stricter. Python
warnings go through logging too, so a JSON stream stays one object per line.
Library code never calls this (STYLE: library code configures no handlers).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

__all__ = ["DEPENDENCIES", "FORMATS", "TEXT_FORMAT", "JsonFormatter", "configure_logging"]

Format = Literal["text", "json"]
FORMATS: tuple[Format, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers of what the registry runs on; never below WARNING, whatever the chosen level.
DEPENDENCIES = ("aiosqlite", "alembic", "asyncio", "asyncpg", "grpc", "sqlalchemy")

# What every LogRecord holds by itself: anything else on a record came by ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",  # Python 3.12+
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC), level, logger, message, extras."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, object] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that JSON cannot hold is shown, never a failed line.
        return json.dumps(line, ensure_ascii=False, default=str)


class _Handler(logging.StreamHandler[TextIO]):
    """The one handler :func:`configure_logging` installs (found again by its class)."""


def configure_logging(level: str, fmt: Format, *, stream: TextIO | None = None) -> None:
    """Log records at ``level`` and above to stderr (or ``stream``) in format ``fmt``.

    ``level`` is a level name, any case (``debug``, ``info``, ``warning``, ``error``).
    Idempotent: a second call replaces what the first installed (one handler, never
    two); handlers that others added to the root logger (pytest's) stay.

    Raises:
        ValueError: an unknown level or format.
    """
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (text or json)")
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()  # a StreamHandler leaves its stream open
    root.addHandler(handler)
    root.setLevel(number)
    for name in DEPENDENCIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, number))
    logging.captureWarnings(True)
