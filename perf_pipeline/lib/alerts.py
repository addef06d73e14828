"""Alerts: one ``alert_event`` row per failure (idempotent), a log line, and an optional webhook POST.

The Dagster sensors in ``perf_pipeline/defs/alerts`` call :func:`raise_alert` for each failed run and each
failed asset check. The row's ``alert_key`` names the failure (``run_failure:<run id>``,
``check_failure:<event storage id>``), so a sensor tick that runs twice records it once, and only the
tick that recorded it posts the webhook.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

log = logging.getLogger(__name__)

WEBHOOK_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Alert:
    key: str
    kind: str  # 'run_failure' | 'check_failure' | 'stale_asset'
    source: str
    message: str
    details: Mapping[str, Any]

    def payload(self) -> dict[str, Any]:
        return {
            "alert_key": self.key,
            "kind": self.kind,
            "source": self.source,
            "message": self.message,
            "details": dict(self.details),
        }


def post_webhook(url: str, payload: Mapping[str, Any], *, timeout_s: float = WEBHOOK_TIMEOUT_S) -> None:
    """POST ``payload`` as JSON; raises ``OSError``/``urllib.error.URLError`` on failure or a non-2xx
    answer. Cost: one HTTP request, at most ``timeout_s`` seconds."""
    body = json.dumps(payload, default=str).encode()
    req = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "perf_pipeline"},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (URL validated by settings)
        if not 200 <= resp.status < 300:
            raise urllib.error.URLError(f"webhook answered HTTP {resp.status}")


def raise_alert(conn: psycopg.Connection, alert: Alert, *, webhook_url: str | None = None) -> bool:
    """Record ``alert`` (once per ``alert.key``), log it, and POST it to ``webhook_url`` if given.

    Returns True when this call recorded it, False when it was already recorded (then nothing is logged
    or posted again). A webhook failure is recorded on the row (``webhook_status = 'failed'``), never
    raised: the alert row is the source of truth. Cost: one INSERT (plus one UPDATE and one HTTP request
    with a webhook); row locks only.
    """
    with conn.transaction():
        row = conn.execute(
            """
            INSERT INTO alert_event (alert_key, kind, source, message, details, webhook_status)
            VALUES (%s, %s, %s, %s, %s, %s)
            ON CONFLICT (alert_key) DO NOTHING
            RETURNING id
            """,
            (
                alert.key,
                alert.kind,
                alert.source[:500],
                alert.message,
                Jsonb(dict(alert.details)),
                "pending" if webhook_url else "disabled",
            ),
        ).fetchone()
    if row is None:
        return False
    log.warning("ALERT %s [%s] %s: %s", alert.key, alert.kind, alert.source, alert.message)
    if webhook_url:
        status, error = "sent", None
        try:
            post_webhook(webhook_url, alert.payload() | {"id": row[0]})
        except (OSError, urllib.error.URLError) as exc:
            status, error = "failed", str(exc)
            log.error("alert %s: webhook failed: %s", alert.key, exc)
        with conn.transaction():
            conn.execute(
                "UPDATE alert_event SET webhook_status = %s, webhook_error = %s WHERE id = %s",
                (status, error, row[0]),
            )
    return True
