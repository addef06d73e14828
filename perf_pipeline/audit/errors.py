"""The audit writer's exceptions."""

from __future__ import annotations


class AuditError(Exception):
    """Base class of the audit writer's errors."""


class AuditEventError(AuditError, ValueError):
    """The event cannot be stored in audit_log (the message names the field); raised by ``log()``."""


class AuditQueueFull(AuditError):
    """No spool and the queue stayed full for ``put_timeout`` seconds; the event was not accepted."""


class AuditWriterClosed(AuditError):
    """``log()`` after ``close()``."""


__all__: list[str] = ["AuditError", "AuditEventError", "AuditQueueFull", "AuditWriterClosed"]
