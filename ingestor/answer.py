"""A plugin's Ingest answer, decoded within bounds (SPEC §7).

    limits = AnswerLimits(max_response_bytes=16 * 1024 * 1024, max_events=100_000)
    response = decode_answer(raw, limits)   # raises AnswerRefused

gRPC hands the answer over as bytes, at most ``max_response_bytes`` of them (the
channel's receive limit). Protobuf decodes a message whole, and a repeated field of
empty messages costs two bytes on the wire but a hundred in memory, and twice that
again as Python objects: 4 MiB of empty events would be 2 M events. So the answer's
top-level fields are counted first, on the wire bytes, and only an answer within
``max_events`` is decoded. Counting is a walk over the tags in Python (about 0.2 µs
per field, stopping at the first field over the limit), needed only when the bytes
could hold more elements than the limit: an answer under ``2 * max_events`` bytes is
decoded at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from registry.wire import pb

DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_EVENTS = 100_000
# gRPC takes its receive limit as a C int.
_MAX_GRPC_LIMIT = 2**31 - 1

_EVENTS = 1  # IngestResponse.events
_ERRORS = 2  # IngestResponse.errors
_EVENT_TAG = _EVENTS << 3 | 2  # field 1, length-delimited: one event
_ELEMENT_MIN_BYTES = 2  # a one-byte tag and a zero length


@dataclass(frozen=True, slots=True)
class AnswerLimits:
    """How large an Ingest answer may be: in bytes, and in events (and, alike, errors).

    Raises:
        ValueError: a limit is out of range (the message names it).
    """

    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_events: int = DEFAULT_MAX_EVENTS

    def __post_init__(self) -> None:
        if not 1024 <= self.max_response_bytes <= _MAX_GRPC_LIMIT:
            raise ValueError(
                f"max_response_bytes: {self.max_response_bytes!r} is out of range "
                f"(1024 to {_MAX_GRPC_LIMIT})"
            )
        if self.max_events < 1:
            raise ValueError(f"max_events: {self.max_events!r} must be at least 1")


class AnswerRefused(Exception):
    """The answer is not one to hand to a caller; the message says why, in fixed words."""


class _Malformed(Exception):
    pass


def decode_answer(data: bytes, limits: AnswerLimits) -> pb.IngestResponse:
    """The ``IngestResponse`` in ``data``, once it is known to be within ``limits``.

    Raises:
        AnswerRefused: more than ``max_events`` events or errors (nothing is decoded),
            or bytes that are not an ``IngestResponse`` (bad wire format, bad UTF-8).
    """
    if len(data) // _ELEMENT_MIN_BYTES > limits.max_events:
        try:
            events, errors = _count_elements(data, limits.max_events)
        except _Malformed as exc:
            raise AnswerRefused(f"an undecodable IngestResponse ({exc})") from exc
        if events > limits.max_events:
            raise AnswerRefused(f"more than max_events={limits.max_events} events")
        if errors > limits.max_events:
            raise AnswerRefused(f"more than max_events={limits.max_events} errors")
    try:
        response = pb.IngestResponse.FromString(data)
    except DecodeError as exc:
        raise AnswerRefused(f"an undecodable IngestResponse ({exc})") from exc
    # The count above is exact; this only guards small answers that skipped it.
    if len(response.events) > limits.max_events or len(response.errors) > limits.max_events:
        raise AnswerRefused(f"more than max_events={limits.max_events} events or errors")
    return response


def _count_elements(data: bytes, limit: int) -> tuple[int, int]:
    """How many events and errors the encoded ``IngestResponse`` holds.

    Stops as soon as either count passes ``limit`` (the rest is not read then). Fields
    other than events and errors are skipped, as protobuf keeps them as unknown.

    Raises:
        _Malformed: the bytes are not protobuf wire format.
    """
    end = len(data)
    pos = events = errors = depth = 0
    while pos < end:
        tag = data[pos]
        if tag == _EVENT_TAG and depth == 0:
            # The common case, inline: an event with a length of one or two bytes.
            length = data[pos + 1] if pos + 1 < end else 0x80
            if length < 0x80:
                pos += 2 + length
            elif pos + 2 < end and data[pos + 2] < 0x80:
                pos += 3 + ((length & 0x7F) | data[pos + 2] << 7)
            else:
                length, pos = _varint(data, pos + 1, end)
                pos += length
            events += 1
            if events > limit:
                return events, errors
            continue
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(data, pos, end)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise _Malformed("field number 0")
        if wire == 2:
            length, pos = _varint(data, pos, end)
            pos += length
            if depth == 0 and field == _EVENTS:
                events += 1
                if events > limit:
                    return events, errors
            elif depth == 0 and field == _ERRORS:
                errors += 1
                if errors > limit:
                    return events, errors
        elif wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 3:  # a group (unknown here): its fields are skipped, not counted
            depth += 1
        elif wire == 4:
            if depth == 0:
                raise _Malformed("an end-group tag outside a group")
            depth -= 1
        else:
            raise _Malformed(f"wire type {wire}")
    if pos != end or depth:
        raise _Malformed("truncated")
    return events, errors


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it.

    Raises:
        _Malformed: it runs past the end, or past 10 bytes.
    """
    result = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("a varint longer than 10 bytes")
    raise _Malformed("truncated")
