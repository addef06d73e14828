"""Every environment variable the project reads, with its default and validation, in one place.

`Settings.from_env()` is the only reader of ``os.environ`` for ``PERF_PIPELINE_*`` values. A bad value
raises :class:`SettingsError` naming the variable, so a misconfigured deployment fails at load time
instead of half-way through a run.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


def _int_in(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _float_in(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, got {raw!r}") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{name} must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _url(*schemes: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes:
            raise SettingsError(f"{name} must be a URL with scheme {' or '.join(schemes)}, got {raw!r}")
        if parts.scheme.startswith("postgres") and not parts.path.strip("/"):
            raise SettingsError(f"{name} must name a database (…/dbname), got {raw!r}")
        return raw

    return parse


def _path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise SettingsError(f"{name} must be a folder path, got an empty value")
    path = Path(raw).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_S3_KEY = re.compile(r"[A-Za-z0-9!_.*'()/=+@,;:-]*")  # S3's "safe" key characters (no spaces, no %)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")


def split_s3_url(raw: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → (bucket, prefix without slashes at its ends). Pure; raises ValueError
    saying what is wrong. Credentials, region and endpoint are not part of the URL: they come from the
    standard AWS_* variables."""
    from perf_pipeline.lib.redact import redact_url

    parts = urlsplit(raw)
    if parts.scheme != "s3" or not raw.startswith("s3://") or not parts.netloc:
        raise ValueError(f"expected an s3://bucket/prefix URL, got {redact_url(raw)!r}")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            "an s3:// URL holds only the bucket and prefix: give credentials, region and endpoint in "
            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and AWS_ENDPOINT_URL"
        )
    if not _S3_BUCKET.fullmatch(parts.netloc):
        raise ValueError(
            f"{parts.netloc!r} is not a bucket name (3-63 characters: lowercase letters, digits, dots, hyphens)"
        )
    prefix = parts.path.strip("/")
    if not _S3_KEY.fullmatch(prefix) or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
        raise ValueError(f"the prefix {prefix!r} must be plain path segments (letters, digits, ./_-)")
    return parts.netloc, prefix


def _location(name: str, raw: str) -> Path | str:
    """A folder (relative to the project root unless absolute), or an s3://bucket/prefix URL (kept as text)."""
    text = raw.strip()
    if text.lower().startswith("s3:"):
        try:
            split_s3_url(text)
        except ValueError as exc:
            raise SettingsError(f"{name}: {exc}") from None
        return text.rstrip("/")
    if _SCHEME.match(text) and not Path(text).exists():
        from perf_pipeline.lib.redact import redact_url

        raise SettingsError(
            f"{name} must be a folder path or an s3://bucket/prefix URL, got {redact_url(raw)!r} "
            "(only s3:// object storage is supported)"
        )
    return _path(name, raw)


def _tokens(name: str, raw: str) -> tuple[str, ...]:
    tokens = tuple(t.strip() for t in raw.split(",") if t.strip())
    for token in tokens:
        if len(token) < 16:
            raise SettingsError(f"{name}: every token must be at least 16 characters long")
    return tokens


@dataclass(frozen=True)
class UserToken:
    """A non-admin bearer token and the user it stands for (None: a bare token, which reaches no export)."""

    token: str
    user_id: str | None = None

    def __repr__(self) -> str:  # never the token itself
        return f"UserToken(user_id={self.user_id!r}, token=***)"


def _user_token(name: str, entry: str | UserToken, position: int) -> UserToken:
    if isinstance(entry, UserToken):
        return entry
    user, sep, token = entry.strip().partition(":")
    if not sep:
        user, token = "", user
    elif not user:
        raise SettingsError(f"{name}: entry {position} has ':' but no user UUID before it")
    if user:
        try:
            user = str(uuid.UUID(user))
        except ValueError:
            raise SettingsError(
                f"{name}: entry {position} must be <user-uuid>:<token> or a bare token; the part before "
                "':' is not a UUID"
            ) from None
    if len(token) < 16:
        raise SettingsError(f"{name}: every token must be at least 16 characters long (entry {position})")
    return UserToken(token, user or None)


def _user_tokens(name: str, raw: str) -> tuple[UserToken, ...]:
    entries = [e for e in raw.split(",") if e.strip()]
    return tuple(_user_token(name, e, i) for i, e in enumerate(entries, 1))


def _str(name: str, raw: str) -> str:
    return raw


def _month(name: str, raw: str) -> dt.date:
    value = raw.strip()
    try:
        parsed = dt.date.fromisoformat(value if len(value) > 7 else f"{value}-01")
    except ValueError:
        raise SettingsError(f"{name} must be a month YYYY-MM (or YYYY-MM-01), got {raw!r}") from None
    if parsed.day != 1 or not 2000 <= parsed.year <= 2100:
        raise SettingsError(f"{name} must be a month YYYY-MM between 2000 and 2100, got {raw!r}")
    return parsed


_PG = _url("postgresql", "postgres")
_REDIS = _url("redis", "rediss", "unix")


def _setting(
    var: str, default: Any, parse: Callable[[str, str], Any], doc: str, *, secret: str | None = None
) -> Any:
    """``secret``: how the value is shown when printed — ``url`` (password and query values masked) or
    ``tokens`` (only how many); None: as is."""
    return field(default=default, metadata={"var": var, "parse": parse, "doc": doc, "secret": secret})


def shown(var: str, raw: str) -> str:
    """The raw value of setting ``var`` as it may be printed or logged: secrets masked."""
    from perf_pipeline.lib.redact import redact_url

    kind = next((f.metadata["secret"] for f in fields(Settings) if f.metadata["var"] == var), None)
    if kind == "url":
        return redact_url(raw) or ""
    if kind == "tokens":
        count = len([t for t in raw.split(",") if t.strip()])
        return f"({count} token{'s' if count != 1 else ''}, not shown)"
    return raw


@dataclass(frozen=True)
class Settings:
    """The project's configuration. Defaults serve the embedded setup."""

    database_url: str | None = _setting(
        "PERF_PIPELINE_DATABASE_URL",
        None,
        _PG,
        "Platform database (postgresql://…). Unset: the embedded PostgreSQL is started and used.",
        secret="url",
    )
    redis_url: str | None = _setting(
        "PERF_PIPELINE_REDIS_URL",
        None,
        _REDIS,
        "Dashboard cache (redis://…/N). Unset: the embedded Redis is started and used.",
        secret="url",
    )
    dagster_database_url: str | None = _setting(
        "PERF_PIPELINE_DAGSTER_DATABASE_URL",
        None,
        _PG,
        "Dagster run/event/schedule storage. Unset: database `dagster` on the platform's server.",
        secret="url",
    )
    state_dir: Path = _setting(
        "PERF_PIPELINE_STATE_DIR",
        PROJECT_ROOT / ".perf_pipeline",
        _path,
        "Folder for the embedded servers' data, logs and Dagster's local artifacts (git-ignored).",
    )
    archive_dir: Path | str = _setting(
        "PERF_PIPELINE_ARCHIVE_DIR",
        PROJECT_ROOT / ".perf_pipeline" / "archive",
        _location,
        "Where archived partitions are written as Parquet files: a folder, or s3://bucket/prefix "
        "(credentials and endpoint from the standard AWS_* variables).",
        secret="url",
    )
    export_dir: Path | str = _setting(
        "PERF_PIPELINE_EXPORT_DIR",
        PROJECT_ROOT / ".perf_pipeline" / "exports",
        _location,
        "Where finished exports are written: a folder, or s3://bucket/prefix (as the archive).",
        secret="url",
    )
    audit_spool_dir: Path = _setting(
        "PERF_PIPELINE_AUDIT_SPOOL_DIR",
        PROJECT_ROOT / ".perf_pipeline" / "audit_spool",
        _path,
        "AuditWriter's local spool: batches not yet acknowledged by PostgreSQL, replayed in order.",
    )
    data_start: dt.date | None = _setting(
        "PERF_PIPELINE_DATA_START",
        None,
        _month,
        "First month of data (YYYY-MM): where the Dagster partitions of the tables, rollups and archives start. "
        "Unset: the oldest month the database holds (attached or archived), read when the code location loads.",
    )
    premake_months: int = _setting(
        "PERF_PIPELINE_PREMAKE_MONTHS",
        3,
        _int_in(1, 36),
        "Future monthly partitions kept created ahead of time.",
    )
    audit_retention_months: int = _setting(
        "PERF_PIPELINE_AUDIT_RETENTION_MONTHS",
        12,
        _int_in(1, 600),
        "Months of audit_log kept online; older months are archived to files, then dropped.",
    )
    usage_retention_months: int = _setting(
        "PERF_PIPELINE_USAGE_RETENTION_MONTHS",
        24,
        _int_in(4, 600),
        "Months of usage_log kept online (at least 4: the rollups recompute the last 90 days).",
    )
    kpi_ttl_seconds: int = _setting(
        "PERF_PIPELINE_KPI_TTL_SECONDS",
        60,
        _int_in(60, 300),
        "TTL of cached real-time KPIs (1–5 minutes).",
    )
    trends_ttl_seconds: int = _setting(
        "PERF_PIPELINE_TRENDS_TTL_SECONDS", 300, _int_in(60, 300), "TTL of cached usage trends (1–5 minutes)."
    )
    redis_socket_timeout_ms: int = _setting(
        "PERF_PIPELINE_REDIS_SOCKET_TIMEOUT_MS",
        50,
        _int_in(5, 5000),
        "Socket timeout of the serving path's Redis client; past it the read falls back to SQL.",
    )
    admin_tokens: tuple[str, ...] = _setting(
        "PERF_PIPELINE_ADMIN_TOKENS",
        (),
        _tokens,
        "Comma-separated bearer tokens accepted as admins by the dashboard API.",
        secret="tokens",
    )
    user_tokens: tuple[UserToken, ...] = _setting(
        "PERF_PIPELINE_USER_TOKENS",
        (),
        _user_tokens,
        "Comma-separated bearer tokens of non-admin users, each <user-uuid>:<token> (that user's exports "
        "through the API) or a bare token (authenticated, no export access); the dashboard answers both 403.",
        secret="tokens",
    )
    export_concurrency: int = _setting(
        "PERF_PIPELINE_EXPORT_CONCURRENCY",
        2,
        _int_in(1, 64),
        "Exports running at once (Dagster pool `exports`).",
    )
    export_max_mb_s: float = _setting(
        "PERF_PIPELINE_EXPORT_MAX_MB_S",
        15.0,
        _float_in(0, 100000),
        "Cap on one export's speed in MB/s of CSV (0: none), so an export leaves CPU to the platform's queries.",
    )
    export_statement_timeout_s: int = _setting(
        "PERF_PIPELINE_EXPORT_STATEMENT_TIMEOUT_S",
        600,
        _int_in(1, 86400),
        "statement_timeout of one export's COPY, in seconds.",
    )
    audit_budget_ms: float = _setting(
        "PERF_PIPELINE_AUDIT_BUDGET_MS",
        50.0,
        _float_in(0.1, 60000),
        "Latency budget (p95) of the audit lookups.",
    )
    analytics_budget_ms: float = _setting(
        "PERF_PIPELINE_ANALYTICS_BUDGET_MS",
        200.0,
        _float_in(0.1, 60000),
        "Latency budget (p95) of the analytics queries (KPIs, trends, usage by user).",
    )
    run_history_days: int = _setting(
        "PERF_PIPELINE_RUN_HISTORY_DAYS",
        30,
        _int_in(1, 3650),
        "Days of Dagster run history kept; older runs are deleted by a schedule.",
    )
    alert_webhook_url: str | None = _setting(
        "PERF_PIPELINE_ALERT_WEBHOOK_URL",
        None,
        _url("http", "https"),
        "Optional: alerts are also POSTed here as JSON.",
        secret="url",
    )

    def __post_init__(self) -> None:
        # Settings(user_tokens=("bare-token…",)) in code and tests: entries given as text are parsed too
        users = tuple(
            _user_token("PERF_PIPELINE_USER_TOKENS", e, i) for i, e in enumerate(self.user_tokens, 1)
        )
        object.__setattr__(self, "user_tokens", users)

    def secret_tokens(self) -> tuple[str, ...]:
        """Every configured bearer token (for masking in messages)."""
        return self.admin_tokens + tuple(t.token for t in self.user_tokens)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f.metadata["var"])
            if raw is None or raw == "":
                continue
            values[f.name] = f.metadata["parse"](f.metadata["var"], raw)
        return cls(**values)

    @classmethod
    def documented(cls) -> list[tuple[str, str, str]]:
        """(variable, default, description) for every setting, for `perf-pipeline settings` and docs."""
        out = []
        for f in fields(cls):
            default = f.default
            if isinstance(default, Path):
                default = os.path.relpath(default, PROJECT_ROOT)
            out.append((f.metadata["var"], "" if default in (None, ()) else str(default), f.metadata["doc"]))
        return out


def get_settings() -> Settings:
    """Settings of this process, read from the environment (cheap; re-read on every call)."""
    return Settings.from_env()
