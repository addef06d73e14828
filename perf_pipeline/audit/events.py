"""An audit event: its validation against ``audit_log``'s constraints and its ``COPY`` text encoding.

:class:`AuditEvent` is one row as the platform gives it; :meth:`AuditEvent.encode` validates it (raising
:class:`AuditEventError` naming the field) and renders every column after ``id`` and ``timestamp`` as one
tab-separated ``COPY`` text fragment. :class:`UUIDv7` makes the ids the writer gives events. Pure Python,
no I/O: a few µs per event, most of it ``json.dumps`` of ``details``.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import random
import re
import uuid
from dataclasses import dataclass
from typing import Any

from perf_pipeline.audit.errors import AuditEventError

#: the column order of every COPY line (and of spool segments)
COLUMNS: tuple[str, ...] = (
    "id",
    "timestamp",
    "user_id",
    "entity_type",
    "entity_id",
    "event_type",
    "operation",
    "severity",
    "description",
    "details",
    "ip",
)
SEVERITIES: frozenset[str] = frozenset({"low", "medium", "high", "critical"})
# (field, min chars, max chars) — mirrors the CHECK constraints of audit_log in 0001_core_schema.sql
LIMITS: dict[str, tuple[int, int]] = {
    "event_type": (1, 64),
    "operation": (1, 32),
    "entity_type": (0, 64),
    "entity_id": (0, 128),
    "description": (0, 2000),
}
MAX_DETAILS_BYTES = 1 << 20  # UTF-8 bytes of the JSON; a larger audit payload is a caller's bug, not an event
# bytes of a queued line before its encoded fields: "<uuid 36>\t<YYYY-MM-DD HH:MM:SS.ffffff+00>\t"
LINE_PREFIX_BYTES = 36 + 1 + 29 + 1

_NEEDS_ESCAPE = re.compile(r"[\\\t\n\r]")
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# one encoder object: json.dumps() with options builds a new JSONEncoder per call (~1 µs more)
_JSON = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class UUIDv7:
    """Monotonic UUIDv7 ids (RFC 9562 §5.7; method 1 of §6.2: a 12-bit counter in ``rand_a``).

    48-bit Unix milliseconds, version 7, a counter seeded randomly in [0, 2048) every new millisecond and
    incremented within it (when it would pass 4095, the millisecond is advanced by one, as §6.2 allows),
    variant ``10``, then 62 random bits. Ids from one generator therefore sort in generation order, even
    when the clock steps back. Not thread-safe by itself: the writer calls it under its lock.
    """

    def __init__(self) -> None:
        self._rng = random.Random(os.urandom(32))
        self._ms = -1
        self._counter = 0

    def next(self, now_ns: int) -> str:
        ms = now_ns // 1_000_000
        if ms > self._ms:
            self._ms, self._counter = ms, self._rng.getrandbits(11)
        else:
            self._counter += 1
            if self._counter > 0xFFF:
                self._ms, self._counter = self._ms + 1, self._rng.getrandbits(11)
        value = (
            (self._ms << 80) | (0x7 << 76) | (self._counter << 64) | (0b10 << 62) | self._rng.getrandbits(62)
        )
        h = f"{value:032x}"
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def uuid7_time_ms(value: str | uuid.UUID) -> int:
    """The Unix millisecond timestamp inside a UUIDv7."""
    return uuid.UUID(str(value)).int >> 80


def _text(name: str, value: object, *, required: bool) -> str:
    """Validate one text field and return it escaped for COPY text format (``\\N`` for NULL)."""
    if value is None:
        if required:
            raise AuditEventError(f"{name} is required")
        return "\\N"
    if not isinstance(value, str):
        if isinstance(value, (int, uuid.UUID)) and not isinstance(value, bool) and name == "entity_id":
            value = str(value)
        else:
            raise AuditEventError(f"{name} must be a string, got {type(value).__name__}")
    lo, hi = LIMITS[name]
    if not lo <= len(value) <= hi:
        raise AuditEventError(f"{name} must be {lo}–{hi} characters, got {len(value)}")
    if "\x00" in value:
        raise AuditEventError(f"{name} contains a NUL character (PostgreSQL text cannot store it)")
    return value.translate(_ESCAPES) if _NEEDS_ESCAPE.search(value) else value


def _user_id(value: object) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        if _CANONICAL_UUID.fullmatch(value):  # the common case, ~0.2 µs instead of ~1.5 µs for uuid.UUID()
            return value
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise AuditEventError(f"user_id must be a UUID, got {value!r:.80}")


def _details(value: object) -> str:
    if value is None:
        return "\\N"
    try:
        text = _JSON.encode(value)
    except RecursionError:
        # the encoder recurses once per level: nesting deeper than the interpreter's recursion limit
        # (~1000 levels, fewer when log() is itself called deep in a stack) cannot be encoded
        raise AuditEventError(
            "details is nested too deeply to encode as JSON (keep it to a few levels of lists/objects)"
        ) from None
    except (TypeError, ValueError) as exc:
        raise AuditEventError(f"details must be JSON-serializable (no NaN/Infinity): {exc}") from None
    if len(text) * 4 > MAX_DETAILS_BYTES:  # a UTF-8 character is ≤ 4 bytes: only a large text can be over
        size = len(text.encode("utf-8", "surrogatepass"))  # ~0.1 ms per MB, paid by large payloads only
        if size > MAX_DETAILS_BYTES:
            raise AuditEventError(
                f"details is {size} bytes as UTF-8 JSON; the limit is {MAX_DETAILS_BYTES} bytes"
            )
    if "\\u0000" in text and _JSON_NUL.search(text):
        raise AuditEventError("details contains a NUL character (\\u0000), which jsonb cannot store")
    return text.translate(_ESCAPES) if _NEEDS_ESCAPE.search(text) else text


def _ip(value: object) -> str:
    if value is None:
        return "\\N"
    if isinstance(
        value,
        (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Interface, ipaddress.IPv6Interface),
    ):
        return str(value)
    if isinstance(value, str):
        normalized = _parse_ip(value)
        if normalized is not None:
            return normalized
    raise AuditEventError(f"ip must be an IPv4/IPv6 address (optionally /prefix), got {value!r:.80}")


@functools.lru_cache(maxsize=8192)  # client addresses repeat; parsing one costs ~2 µs, a cache hit ~0.1 µs
def _parse_ip(value: str) -> str | None:
    if "%" in value:  # PostgreSQL's inet has no IPv6 zone ids
        return None
    try:
        return str(ipaddress.ip_interface(value) if "/" in value else ipaddress.ip_address(value))
    except ValueError:
        return None


@dataclass(slots=True)
class AuditEvent:
    """One audit event as the platform gives it: the columns of ``audit_log`` after ``id`` and
    ``timestamp`` (the writer assigns those when it accepts the event). Not validated until encoded."""

    event_type: str
    entity_type: str | None
    entity_id: str | None
    operation: str
    description: str | None
    user_id: str | uuid.UUID | None = None
    severity: str = "low"
    details: Any = None
    ip: str | None = None

    def encode(self) -> str:
        """Validate the event and render every column after ``id`` and ``timestamp`` as COPY text.

        Costs a few µs (most of it ``json.dumps`` of ``details``). Raises :class:`AuditEventError`.
        """
        if self.severity not in SEVERITIES:
            raise AuditEventError(f"severity must be one of {sorted(SEVERITIES)}, got {self.severity!r:.80}")
        return "\t".join(
            (
                _user_id(self.user_id),
                _text("entity_type", self.entity_type, required=False),
                _text("entity_id", self.entity_id, required=False),
                _text("event_type", self.event_type, required=True),
                _text("operation", self.operation, required=True),
                self.severity,
                _text("description", self.description, required=False),
                _details(self.details),
                _ip(self.ip),
            )
        )

    def encode_line_tail(self) -> bytes:
        """:meth:`encode` plus the line's newline, as UTF-8: what follows ``<id>\\t<timestamp>\\t`` in a
        queued COPY line. Raises :class:`AuditEventError` (also for text that is not valid Unicode)."""
        try:
            return f"{self.encode()}\n".encode()
        except UnicodeEncodeError as exc:
            raise AuditEventError(f"event text is not valid Unicode (lone surrogate?): {exc}") from None


def encode_fields(*args: Any, **kwargs: Any) -> str:
    """``AuditEvent(*args, **kwargs).encode()``: validate an event given as :class:`AuditEvent`'s fields
    (same order and defaults as :meth:`AuditWriter.log`) and render it as COPY text. A few µs."""
    return AuditEvent(*args, **kwargs).encode()


__all__: list[str] = [
    "COLUMNS",
    "LIMITS",
    "LINE_PREFIX_BYTES",
    "MAX_DETAILS_BYTES",
    "SEVERITIES",
    "AuditEvent",
    "UUIDv7",
    "encode_fields",
    "uuid7_time_ms",
]
