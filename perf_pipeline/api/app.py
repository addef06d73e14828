"""Dashboard API: KPIs and usage trends for admins, served cache-aside from Redis, from SQL when Redis is
down; ``/healthz`` for load balancers.

Run it with ``perf-pipeline serve`` (uvicorn, several worker processes). The endpoints answer a hot
key from the process's one-second near cache on the event loop (no I/O); anything else runs the
synchronous read path (Redis, then PostgreSQL on a miss) in the thread pool, where it blocks only its
own thread. ``HEAD`` is answered wherever ``GET`` is, with the same status and headers and no body.
``/healthz`` answers within a second whatever the servers do: it probes them itself, one probe per
server at a time, and reports a probe that has not answered by then as down.

Auth: ``Authorization: Bearer <token>``. Tokens come from ``PERF_PIPELINE_ADMIN_TOKENS`` (200) and
``PERF_PIPELINE_USER_TOKENS`` (authenticated but not admin: 403); anything else is 401. Tokens are
compared with :func:`hmac.compare_digest` against every configured token, so the time taken does not
tell which prefix or which token matched.

Exports (``/api/v1/exports/{id}`` and ``…/file``): the status of an export request and its file, for the
user who asked (a user token given as ``<user-uuid>:<token>`` sees the requests whose ``requested_by`` is
that UUID) or any admin; anyone else's request, or an unknown id, is 404 alike (existence is not revealed);
a bare user token is 403. The file is streamed through the API from wherever it is (local folder or S3,
ranged reads of 2 MiB: bounded memory whatever its size) rather than by a presigned URL: pyarrow.fs,
the project's only storage client, cannot presign, and streaming keeps the bucket private, its
credentials on the server, and this API's auth on every byte. 409 while the export is not finished (or
failed), 410 when a finished export's file is gone or no longer the one produced, 503 when the database or
the storage cannot be reached — never a 500. ``HEAD`` of the file answers its headers without reading it.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_type_hints
from urllib.parse import parse_qsl

import anyio
import psycopg
import psycopg_pool
from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, create_model
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from perf_pipeline.lib import dashboard, rollups
from perf_pipeline.lib import exports as exports_lib
from perf_pipeline.lib.cache import KPIS_KEY, DashboardCache, serving_client, trends_key
from perf_pipeline.lib.dashboard import TrendRangeError, validate_trend_request
from perf_pipeline.lib.redact import redact_text, url_secrets
from perf_pipeline.lib.storage import ObjectInfo, StorageError, Store, describe_error, locate
from perf_pipeline.settings import Settings, SettingsError, get_settings

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/admin/dashboard"
KPIS_PATH = f"{API_PREFIX}/kpis"
TRENDS_PATH = f"{API_PREFIX}/usage-trends"
EXPORT_PATH = "/api/v1/exports/{request_id}"
EXPORT_FILE_PATH = "/api/v1/exports/{request_id}/file"
#: bytes read from the store per chunk of a download (one ranged GET on S3): the memory of one download
DOWNLOAD_BLOCK_BYTES = 2 << 20
#: set on the scope by HeadAsGetMiddleware: the GET being answered is a HEAD (no body will be sent)
HEAD_SCOPE_KEY = "perf_pipeline.head"
MEDIA_TYPES = {"csv.gz": "application/gzip", "parquet": "application/vnd.apache.parquet"}


# --------------------------------------------------------------------------------- response models


class RealTimeKpis(BaseModel):
    active_transcriptions: int
    transcriptions_last_hour: int
    active_users_24h: int
    failed_last_hour: int
    error_rate_percent: float
    daily_revenue_usd: float
    avg_duration_minutes: float


class KpisResponse(BaseModel):
    real_time: RealTimeKpis
    timestamp: str  # ISO instant the KPIs were computed at (database clock)


def _model_of(row: type, **types: Any) -> type[BaseModel]:
    """A pydantic model of the TypedDict ``row`` for the OpenAPI schema: its name, its fields in order with
    their types, except those given in ``types`` (a date served as an ISO string is declared a date; a
    nested row, by its model). Pure; called once per row type at import."""
    return create_model(  # type: ignore[call-overload]
        row.__name__, **{name: (types.get(name, hint), ...) for name, hint in get_type_hints(row).items()}
    )


# the usage-trends body: the rows the SQL layer makes and the cache stores (lib/dashboard.UsageTrends)
ProviderUsage = _model_of(rollups.ProviderUsage)
TrendPoint = _model_of(rollups.TrendPoint, period=dt.date, providers=list[ProviderUsage])
ProviderShare = _model_of(rollups.ProviderShare)
TrendPeriod = _model_of(dashboard.TrendPeriod, start_date=dt.date, end_date=dt.date)


class TrendsResponse(BaseModel):
    period: TrendPeriod
    transcription_trend: list[TrendPoint]
    provider_breakdown: list[ProviderShare]


class ComponentHealth(BaseModel):
    ok: bool
    latency_ms: float | None = None
    error: str | None = None  # why it is not ok: the server's error, or that it did not answer in time


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "down"]  # degraded: Redis is down, answers come from SQL
    failing: list[Literal["postgres", "redis"]]  # the parts that are not ok
    postgres: ComponentHealth
    redis: ComponentHealth
    cache_outcomes: dict[str, int]


class ErrorResponse(BaseModel):
    detail: str


class ExportStatus(BaseModel):
    id: int
    requested_by: str
    kind: str
    format: str
    filters: Any
    status: Literal["pending", "running", "succeeded", "failed"]
    requested_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    attempts: int
    rows: int | None  # rows in the file (succeeded)
    bytes: int | None  # the file's size
    sha256: str | None  # of the file, as downloaded
    error: str | None  # why it failed
    file_url: str | None  # where to download it, once succeeded


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationIssue]


#: an export request's id in a path: a positive bigint (anything else is a 422, never a database error)
RequestId = Annotated[int, PathParam(ge=1, le=2**63 - 1, description="the export request's id")]

# the error answers of the two admin endpoints, as they are sent (OpenAPI documents every one)
_ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorResponse,
        "description": "No bearer token, or one that is not configured",
        "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    },
    403: {"model": ErrorResponse, "description": "A valid token without the admin role"},
    503: {"model": ErrorResponse, "description": "The database is unavailable and the answer is not cached"},
}


# the error answers of the export endpoints, as they are sent
_EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _ADMIN_RESPONSES[401],
    403: {"model": ErrorResponse, "description": "A user token that is not linked to a user"},
    404: {"model": ErrorResponse, "description": "No such export request, or not one of this user's"},
    503: {"model": ErrorResponse, "description": "The database or the file storage is unavailable"},
}


# ------------------------------------------------------------------------------------------- auth

_bearer = HTTPBearer(
    auto_error=False,
    description="Bearer token: an admin's (PERF_PIPELINE_ADMIN_TOKENS) or, for exports, a user's "
    "(PERF_PIPELINE_USER_TOKENS)",
)


def _any_matches(token: bytes, candidates: tuple[bytes, ...]) -> bool:
    # no early exit: every candidate is compared, so timing does not reveal which one matched
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(token, candidate)
    return found


async def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    # async on purpose: no I/O here, and a sync dependency would cost a thread-pool hop per request
    unauthorized = HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "a valid bearer token is required",
        headers={"WWW-Authenticate": "Bearer"},
    )
    if credentials is None:
        raise unauthorized
    token = credentials.credentials.encode()
    admins: tuple[bytes, ...] = request.app.state.admin_tokens
    users: tuple[bytes, ...] = request.app.state.user_tokens
    is_admin, is_user = _any_matches(token, admins), _any_matches(token, users)
    if is_admin:
        return
    if is_user:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "admin role required")
    raise unauthorized


@dataclass(frozen=True)
class Caller:
    """Who is asking for an export: an admin (any request) or the user a token stands for."""

    admin: bool
    user_id: str | None

    def may_see(self, requested_by: object) -> bool:
        return self.admin or (self.user_id is not None and str(requested_by) == self.user_id)


async def export_caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """401 without a configured token, 403 for a user token not linked to a user; else the caller.
    Every token is compared (constant time each, no early exit)."""
    if credentials is not None:
        token = credentials.credentials.encode()
        is_admin = _any_matches(token, request.app.state.admin_tokens)
        owner: str | None = None
        is_user = False
        for candidate, user_id in request.app.state.user_token_owners:
            if hmac.compare_digest(token, candidate):
                is_user, owner = True, user_id
        if is_admin:
            return Caller(True, None)
        if is_user and owner is not None:
            return Caller(False, owner)
        if is_user:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, "this token is not linked to a user: no access to exports"
            )
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "a valid bearer token is required",
        headers={"WWW-Authenticate": "Bearer"},
    )


async def _cache(request: Request) -> DashboardCache:
    return request.app.state.cache


# ------------------------------------------------------------------------------------ hot path

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # ASCII digits only (str patterns' \d is Unicode)


class HotReadsMiddleware:
    """Pure-ASGI fast path for the two hot GETs: an admin's request whose answer is in the process's
    near cache is answered here, without FastAPI's routing, dependency and validation machinery (a few
    times less CPU per request, which is what bounds throughput and tail latency on a busy machine).

    It only ever *serves* what FastAPI would answer 200 with the same body: the token must equal an
    admin token (compared as :func:`require_admin` does), the query string is parsed as Starlette
    parses it, the dates must be plain ``YYYY-MM-DD`` and pass :func:`validate_trend_request`, no
    parameter may repeat. Anything else (no or bad token, a user token, odd parameters, a miss) goes
    to FastAPI, which gives the 401/403/422 or reads Redis. A ``HEAD`` reaches it as a ``GET``
    (:class:`HeadAsGetMiddleware`), so it is answered here exactly when the ``GET`` would be.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            try:
                body = self._cached_body(scope)
            except Exception:  # a fast path never turns a request into a 500: FastAPI answers it
                log.exception(
                    "the near-cache fast path failed on %s; answering through FastAPI", scope["path"]
                )
                body = None
            if body is not None:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _cached_body(scope: Scope) -> bytes | None:
        path = scope["path"]
        if path != KPIS_PATH and path != TRENDS_PATH:
            return None
        app = scope.get("app")
        cache: DashboardCache | None = getattr(getattr(app, "state", None), "cache", None)
        if cache is None or cache.local_ttl_s <= 0:
            return None
        auth = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(auth) != 1:
            return None
        scheme, _, credentials = auth[0].partition(b" ")
        credentials = credentials.strip()
        if (
            scheme.lower() != b"bearer"
            or not credentials
            or not _any_matches(credentials, app.state.admin_tokens)
        ):
            return None
        if path == KPIS_PATH:
            return cache.peek_local(KPIS_KEY)
        # as Starlette reads it (so both see the same parameters): latin-1 text, then percent-decoded as
        # UTF-8 with replacement; parsing the raw bytes instead raised on any %-escaped non-ASCII byte
        params = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
        values = dict(params)
        if len(values) != len(params) or not {"start_date", "end_date"} <= values.keys() <= _TREND_PARAMS:
            return None
        start, end = values["start_date"], values["end_date"]
        if not (_DATE.fullmatch(start) and _DATE.fullmatch(end)):
            return None
        try:
            request = validate_trend_request(
                dt.date.fromisoformat(start), dt.date.fromisoformat(end), values.get("granularity", "daily")
            )
        except ValueError:  # TrendRangeError or an impossible date: FastAPI words the 422
            return None
        return cache.peek_local(trends_key(request))


_TREND_PARAMS = {"start_date", "end_date", "granularity"}


class HeadAsGetMiddleware:
    """``HEAD`` wherever ``GET`` is allowed (RFC 9110): the request goes through the app as a ``GET``
    (routes, auth, validation and the fast path alike) and only the body is dropped, so the status and
    headers, ``Content-Length`` included, are the ``GET``'s. A 405 lists ``HEAD`` next to ``GET``.
    A ``GET`` passes through untouched (no wrapper on the hot path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "GET":
            await self.app(scope, receive, send)
        elif scope["method"] == "HEAD":

            async def send_without_body(message: Message) -> None:
                if message["type"] == "http.response.body":
                    if message.get("more_body", False):
                        return
                    message = {"type": "http.response.body", "body": b"", "more_body": False}
                await send(message)

            # HEAD_SCOPE_KEY lets an endpoint whose body is costly (a file download) skip producing it
            await self.app({**scope, "method": "GET", HEAD_SCOPE_KEY: True}, receive, send_without_body)
        else:

            async def send_allow_head(message: Message) -> None:
                if message["type"] == "http.response.start" and message["status"] == 405:
                    message = {**message, "headers": [_allow_head(k, v) for k, v in message["headers"]]}
                await send(message)

            await self.app(scope, receive, send_allow_head)


def _allow_head(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    methods = {m.strip() for m in value.split(b",")}
    if name.lower() == b"allow" and b"GET" in methods and b"HEAD" not in methods:
        return name, value + b", HEAD"
    return name, value


# ------------------------------------------------------------------------------------------- app


def _served_urls(settings: Settings) -> tuple[str, str]:
    """(database URL, Redis URL) the served app uses: the configured ones. Pure; raises SettingsError
    naming the unset variable (``perf-pipeline serve`` sets both, to the embedded servers when none is
    configured, before it builds the app)."""
    missing = [
        var
        for var, url in (
            ("PERF_PIPELINE_DATABASE_URL", settings.database_url),
            ("PERF_PIPELINE_REDIS_URL", settings.redis_url),
        )
        if not url
    ]
    if missing:
        raise SettingsError(
            f"{' and '.join(missing)} must be set to serve the dashboard API "
            "(`perf-pipeline serve` sets them, to the embedded servers when none is configured)"
        )
    return settings.database_url, settings.redis_url  # type: ignore[return-value]


def _default_services(settings: Settings) -> tuple[DashboardCache, psycopg_pool.ConnectionPool, HealthProbes]:
    """What the served app runs on: the cache over its own small pool, and the probes of /healthz.
    Starts opening the pool in the background; no other I/O."""
    database_url, redis_url = _served_urls(settings)
    # a small pool per worker process bounds the SQL fallback's load on PostgreSQL when Redis is down:
    # 1,000 concurrent requests queue for 4 connections instead of opening 1,000
    # check=: an idle connection killed by a PostgreSQL restart is replaced, not handed out (a 503 in the soak)
    pool = psycopg_pool.ConnectionPool(
        database_url,
        min_size=1,
        max_size=4,
        timeout=5,
        open=True,
        check=psycopg_pool.ConnectionPool.check_connection,
        kwargs={"autocommit": True, "application_name": "perf_pipeline.api"},
        name="dashboard",
    )
    client = serving_client(redis_url, settings.redis_socket_timeout_ms)
    # hit/miss counters are flushed to Redis once a second per worker, not once per request; fresh bodies
    # are kept one second in process memory (an invalidation reaches each worker within a second)
    cache = DashboardCache(
        client,
        pool.connection,
        kpi_ttl_s=settings.kpi_ttl_seconds,
        trends_ttl_s=settings.trends_ttl_seconds,
        stats_flush_s=1.0,
        local_ttl_s=1.0,
    )
    # /healthz opens its own short connection: the pool's 5 s wait is for requests, not for a health check
    health = HealthProbes(
        postgres=_connect_and_select_1(database_url),
        redis=client.ping,
        secrets=url_secrets(database_url, redis_url),
    )
    return cache, pool, health


def create_app(settings: Settings | None = None, cache: DashboardCache | None = None) -> FastAPI:
    """The ASGI app. Without ``cache``, one is built at startup from the settings'
    ``PERF_PIPELINE_DATABASE_URL`` / ``PERF_PIPELINE_REDIS_URL`` (both required: SettingsError naming the
    unset one, raised here) with its own connection pool, closed at shutdown, and ``/healthz`` probes
    PostgreSQL with its own short connection to that URL. With ``cache`` (tests, benchmarks), ``/healthz``
    probes through the cache's connection source and Redis client."""
    settings = settings or get_settings()
    if cache is None:
        _served_urls(settings)  # fail now, not at the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = None
        if cache is None:
            app.state.cache, pool, app.state.health = _default_services(settings)
        # the last batch of hit/miss counts reaches Redis within a second even when traffic stops
        stop = threading.Event()
        flusher = threading.Thread(
            target=_flush_every_second,
            args=(app.state.cache, stop),
            daemon=True,
            name="dashboard-stats-flush",
        )
        flusher.start()
        try:
            yield
        finally:
            stop.set()
            flusher.join(timeout=5)
            app.state.cache.flush_stats()
            if pool is not None:
                pool.close()

    app = FastAPI(
        title="perf_pipeline dashboard API",
        version="1.0",
        description="Admin dashboard KPIs and usage trends, cached in Redis (cache-aside, single-flight "
        "refresh, SQL fallback when Redis is unavailable).",
        lifespan=lifespan,
    )
    app.state.admin_tokens = tuple(t.encode() for t in settings.admin_tokens)
    app.state.user_tokens = tuple(t.token.encode() for t in settings.user_tokens)
    app.state.user_token_owners = tuple((t.token.encode(), t.user_id) for t in settings.user_tokens)
    if cache is not None:
        app.state.cache = cache
        app.state.health = HealthProbes(
            postgres=_select_1_through(cache.connection), redis=cache.redis_client.ping
        )
    app.add_middleware(HotReadsMiddleware)
    app.add_middleware(HeadAsGetMiddleware)  # outermost: the fast path sees a HEAD as the GET it is

    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(psycopg_pool.PoolTimeout)
    async def database_unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.error("database unavailable: %s", exc)
        return JSONResponse({"detail": "the database is unavailable"}, status_code=503)

    @app.get(
        KPIS_PATH,
        response_model=KpisResponse,
        dependencies=[Depends(require_admin)],
        summary="Real-time KPIs (cached up to the KPI TTL)",
        responses=_ADMIN_RESPONSES,
    )
    async def kpis(cache: Annotated[DashboardCache, Depends(_cache)]) -> Response:
        # the cached body is sent as stored: no parse, validation or re-serialization on a hit
        body = cache.peek_local(KPIS_KEY) or await run_in_threadpool(cache.kpis_json)
        return Response(body, media_type="application/json")

    @app.get(
        TRENDS_PATH,
        response_model=TrendsResponse,
        dependencies=[Depends(require_admin)],
        summary="Usage trends per day, ISO week or month, with provider breakdown",
        responses={
            **_ADMIN_RESPONSES,
            422: {
                "model": ValidationErrorResponse,
                "description": "Bad dates, an inverted or over-long range, an unknown granularity",
            },
        },
    )
    async def usage_trends(
        cache: Annotated[DashboardCache, Depends(_cache)],
        start_date: Annotated[dt.date, Query(description="first day (UTC), YYYY-MM-DD")],
        end_date: Annotated[dt.date, Query(description="last day (UTC, inclusive), YYYY-MM-DD")],
        granularity: Annotated[Literal["daily", "weekly", "monthly"], Query()] = "daily",
    ) -> Response:
        try:
            trend_request = validate_trend_request(start_date, end_date, granularity)
        except TrendRangeError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                [{"loc": ["query", "end_date"], "msg": str(exc), "type": "value_error"}],
            ) from None
        body = cache.peek_local(trends_key(trend_request)) or await run_in_threadpool(
            cache.usage_trends_json, trend_request
        )
        return Response(body, media_type="application/json")

    @app.get(
        EXPORT_PATH,
        response_model=ExportStatus,
        summary="An export request's status (the user's own, or any for an admin)",
        responses=_EXPORT_RESPONSES,
    )
    async def export_status(
        request: Request,
        caller: Annotated[Caller, Depends(export_caller)],
        request_id: RequestId,
    ) -> JSONResponse:
        req = await _visible_request(request, caller, request_id)
        body = ExportStatus(
            **{k: req.get(k) for k in ExportStatus.model_fields if k not in ("requested_by", "file_url")},
            requested_by=str(req["requested_by"]),
            file_url=EXPORT_FILE_PATH.format(request_id=request_id) if req["status"] == "succeeded" else None,
        )
        return JSONResponse(body.model_dump(mode="json"))

    @app.get(
        EXPORT_FILE_PATH,
        # no media type of its own: the 200 is documented by `content` below, the errors as JSON
        response_class=Response,
        summary="Download a finished export's file (streamed; HEAD gives its headers only)",
        responses={
            200: {
                "description": "The file, streamed (Content-Length, ETag = its sha256, attachment name)",
                "content": {
                    t: {"schema": {"type": "string", "format": "binary"}} for t in MEDIA_TYPES.values()
                },
            },
            **_EXPORT_RESPONSES,
            409: {
                "model": ErrorResponse,
                "description": "The export is not finished yet (pending or running: try again later; "
                "Retry-After says when), or it failed (no file)",
            },
            410: {
                "model": ErrorResponse,
                "description": "The export finished but its file is gone or was changed",
            },
        },
    )
    async def export_file(
        request: Request,
        caller: Annotated[Caller, Depends(export_caller)],
        request_id: RequestId,
    ) -> Response:
        req = await _visible_request(request, caller, request_id)
        if req["status"] in ("pending", "running"):
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"the export is not finished yet (status {req['status']}); try again later",
                headers={"Retry-After": "15"},
            )
        if req["status"] != "succeeded":
            raise HTTPException(
                status.HTTP_409_CONFLICT, "the export failed: it has no file (see its status)"
            )
        store, key, info = await run_in_threadpool(_export_object, req)
        headers = {
            "Content-Length": str(info.size),
            "Content-Disposition": f'attachment; filename="{_download_name(req)}"',
            "ETag": f'"{req["sha256"]}"',
            "Cache-Control": "private, no-store",
        }
        media_type = MEDIA_TYPES.get(req["format"], "application/octet-stream")
        if request.scope.get(HEAD_SCOPE_KEY):  # a HEAD: the headers, without reading the file
            return Response(status_code=200, headers=headers, media_type=media_type)
        return StreamingResponse(
            _stream_object(store, key, info.size), headers=headers, media_type=media_type
        )

    @app.get(
        "/healthz",
        response_model=HealthResponse,
        summary="PostgreSQL and Redis status, within a second",
        responses={
            503: {"model": HealthResponse, "description": "PostgreSQL is down or did not answer in time"}
        },
    )
    async def healthz(request: Request) -> JSONResponse:
        # async: the probes run in their own threads, this only waits for them (never a pool thread)
        probes: HealthProbes = request.app.state.health
        pg, rd = await probes.check(HEALTH_TIMEOUT_S)
        failing: list[Literal["postgres", "redis"]] = [
            name for name, part in (("postgres", pg), ("redis", rd)) if not part.ok
        ]
        state = "ok" if not failing else ("degraded" if pg.ok else "down")
        cache: DashboardCache = request.app.state.cache
        body = HealthResponse(
            status=state, failing=failing, postgres=pg, redis=rd, cache_outcomes=dict(cache.counts)
        )
        return JSONResponse(body.model_dump(), status_code=200 if pg.ok else 503)

    return app


# ------------------------------------------------------------------------------------------ exports


def _read_request(connection: Callable[[], Any], request_id: int) -> dict[str, Any] | None:
    with connection() as conn:
        return exports_lib.get_request(conn, request_id)


async def _visible_request(request: Request, caller: Caller, request_id: int) -> dict[str, Any]:
    """The request row if ``caller`` may see it; 404 alike for an unknown id and another user's request."""
    cache: DashboardCache = request.app.state.cache
    req = await run_in_threadpool(_read_request, cache.connection, request_id)
    if req is None or not caller.may_see(req["requested_by"]):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no such export request")
    return req


def _download_name(req: dict[str, Any]) -> str:
    fmt = req["format"] if req["format"] in MEDIA_TYPES else "bin"
    return f"export-{int(req['id'])}-{req['kind'] if req['kind'] in exports_lib.KINDS else 'data'}.{fmt}"


def _export_object(req: dict[str, Any]) -> tuple[Store, str, ObjectInfo]:
    """The finished export's object as the store has it now (one HEAD or stat): 410 when it is gone, or its
    size or ETag is not what the export recorded; 503 when the storage cannot be reached."""
    gone = HTTPException(
        status.HTTP_410_GONE, "the export's file is no longer available; request a new export"
    )
    try:
        store, key = locate(req["file_path"] or "", exports_lib.SETTING)
        info = store.info(key)
    except (OSError, StorageError) as exc:
        log.error("export %s: cannot look up %s: %s", req["id"], req["file_path"], describe_error(exc))
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the file storage is unavailable") from None
    if info is None:
        raise gone
    if info.size != req["bytes"] or (req.get("etag") and info.etag != req["etag"]):
        log.warning(
            "export %s: %s is not the file the export wrote (size or ETag differs)", req["id"], info.uri
        )
        raise gone
    return store, key, info


async def _stream_object(store: Store, key: str, size: int) -> AsyncIterator[bytes]:
    """The object's first ``size`` bytes, DOWNLOAD_BLOCK_BYTES at a time, each read in a worker thread (the
    event loop never blocks on the store). A read error ends the response early (the client sees a short
    body against Content-Length); it is logged."""
    f = await run_in_threadpool(store.open_input, key)
    try:
        left = size
        while left > 0:
            block = await run_in_threadpool(f.read, min(DOWNLOAD_BLOCK_BYTES, left))
            if not block:
                break
            left -= len(block)
            yield bytes(block)
    except Exception as exc:
        log.error("download of %s stopped: %s", store.uri(key), describe_error(exc))
        raise
    finally:
        await run_in_threadpool(f.close)


def _flush_every_second(cache: DashboardCache, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        cache.flush_stats()


# ---------------------------------------------------------------------------------------- health

HEALTH_TIMEOUT_S = 0.8  # /healthz answers within a second; a probe slower than this counts as down
_PG_CONNECT_TIMEOUT_S = 2  # libpq's smallest; bounds how long a probe thread waits for a silent server


class _ProbeRun:
    """One check of one server: its outcome once ``done`` is set."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.result: ComponentHealth | None = None

    def outcome(self) -> ComponentHealth:
        if not self.done.is_set():
            return ComponentHealth(ok=False, error=f"no answer after {time.monotonic() - self.started:.1f} s")
        return self.result or ComponentHealth(ok=False, error="the check failed")


class _Probe:
    """Checks one server in a daemon thread of its own (``healthz-<name>``), at most one at a time: a
    request that finds the previous check still running waits for that one instead of starting
    another, so a hung server holds one thread, however often /healthz is asked."""

    def __init__(self, name: str, check: Callable[[], object], secrets: tuple[str, ...]) -> None:
        self.name = name
        self._check = check
        self._secrets = secrets
        self._lock = threading.Lock()
        self._run: _ProbeRun | None = None

    def start(self) -> _ProbeRun:
        with self._lock:
            run = self._run
            if run is None or run.done.is_set():
                run = self._run = _ProbeRun()
                threading.Thread(
                    target=self._check_into, args=(run,), name=f"healthz-{self.name}", daemon=True
                ).start()
        return run

    def _check_into(self, run: _ProbeRun) -> None:
        try:
            self._check()
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            run.result = ComponentHealth(ok=False, error=redact_text(message, self._secrets))
        else:
            run.result = ComponentHealth(ok=True, latency_ms=(time.monotonic() - run.started) * 1000)
        finally:
            run.done.set()


class HealthProbes:
    """The checks behind /healthz: ``postgres`` and ``redis`` are callables that raise when their
    server is not usable (the served app: a new connection and ``SELECT 1``, and ``PING``; the
    latency reported is the whole check's). Errors are reported by their first line, with ``secrets``
    (and anything that looks like a URL's password) masked."""

    def __init__(
        self, *, postgres: Callable[[], object], redis: Callable[[], object], secrets: tuple[str, ...] = ()
    ) -> None:
        self.postgres = _Probe("postgres", postgres, secrets)
        self.redis = _Probe("redis", redis, secrets)

    async def check(self, timeout_s: float) -> tuple[ComponentHealth, ComponentHealth]:
        """Both servers' health, checked concurrently, in at most ``timeout_s`` (plus a few ms): a
        check not finished by then is reported as "no answer" and left to finish in its thread.

        Cost: per server, one thread and one check (the served app: a new PostgreSQL connection, a
        Redis PING), or none while the previous check is still running. No locks in either server.
        """
        runs = (self.postgres.start(), self.redis.start())
        deadline = time.monotonic() + timeout_s
        # a short poll rather than a wake-up from the probe thread: it needs no event loop reference,
        # so a check outliving its request (or the loop) has nothing to call back
        while not all(run.done.is_set() for run in runs) and time.monotonic() < deadline:
            await anyio.sleep(0.005)
        return runs[0].outcome(), runs[1].outcome()


def _connect_and_select_1(url: str) -> Callable[[], object]:
    def check() -> None:
        with psycopg.connect(
            url,
            connect_timeout=_PG_CONNECT_TIMEOUT_S,
            autocommit=True,
            application_name="perf_pipeline.api.healthz",
        ) as conn:
            conn.execute("SELECT 1")

    return check


def _select_1_through(connection: Callable[[], Any]) -> Callable[[], object]:
    def check() -> None:
        with connection() as conn:
            conn.execute("SELECT 1")

    return check
