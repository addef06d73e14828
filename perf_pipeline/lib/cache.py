"""The dashboard cache: Redis layout, the cache-aside read path, warming, invalidation and hit counters.

Layout (all keys under ``dash:``; nothing is ever found by pattern, so no ``KEYS``/``SCAN``):

* ``dash:gen`` — the cache generation (an integer). Every entry records the generation it was computed
  under; an entry older than the current generation is *stale*. Invalidation is ``INCR dash:gen``:
  O(1), whatever the number of cached ranges, and atomic with the warm write (same ``MULTI``).
* ``dash:kpis``, ``dash:trends:<granularity>:<start>:<end>`` — entries: one line of JSON metadata
  ``{"gen", "computed_at", "expires_at", "compute_ms"}``, a newline, then the response body (JSON) as
  the API sends it, so a hit is served without parsing or re-serializing the payload. ``expires_at``
  (computed_at + TTL, 1–5 min from settings) is the freshness bound; Redis keeps the key
  ``STALE_GRACE_S`` longer so that a stale copy exists to serve while one reader recomputes.
* ``dash:lock:<key>`` — the single-flight lock of a key's recomputation (``SET NX PX``, token-checked
  release).
* ``dash:stats:<unix minute>`` — hash of outcome counters (hit, stale, waited, miss, fallback) per
  minute, expiring after two hours: the hit rate over any recent window is a few ``HGETALL``.
  Each process batches its increments and flushes them at most every ``stats_flush_s`` (1 s in the
  API), so a hit costs one Redis round trip (``MGET dash:gen <key>``), not two. The API also keeps fresh
  bodies for one second in process memory (``local_ttl_s``): a hot key costs one Redis read per
  second per process, whatever the request rate, and an invalidation reaches each process within
  ``local_ttl_s`` (the first request after it refreshes the copy, the others meanwhile get the local one).

Stampede protection: **single-flight lock + stale-while-revalidate**, chosen over XFetch (probabilistic
early recomputation) because XFetch only helps while a copy still exists and every reader must run
the same computation at random; it cannot stop N readers of a key that is gone (cold start, eviction,
an invalidated range) from all hitting PostgreSQL. With the lock, exactly one reader (across every API
process: the lock is in Redis) recomputes an expired key; the others serve the stale copy (expired, or
of an older generation) for the few milliseconds the recomputation takes, or, when no copy exists,
wait for it (bounded by ``wait_s``) instead of querying PostgreSQL themselves.

Redis down or slow: the serving client has a short socket timeout (``redis_socket_timeout_ms``) and no
retries; any Redis error opens a breaker for ``retry_after_s``, during which reads go straight to SQL
(correct answers, same payloads) without paying the timeout again; after it, Redis is tried again and
the cache refills on the next misses.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from perf_pipeline.lib.dashboard import (
    TrendRequest,
    UsageTrends,
    compute_kpis,
    compute_usage_trends,
    standard_trend_requests,
)

log = logging.getLogger(__name__)

PREFIX = "dash:"
GEN_KEY = PREFIX + "gen"
KPIS_KEY = PREFIX + "kpis"
STATS_PREFIX = PREFIX + "stats:"
LOCK_PREFIX = PREFIX + "lock:"
STALE_GRACE_S = 900  # one warm interval: a stale copy survives until the next scheduled warm at worst
STATS_KEEP_S = 7200
LOCAL_STALE_S = 5.0  # a process serves its local copy at most this long past local_ttl_s while refreshing
OUTCOMES = ("hit", "stale", "waited", "miss", "fallback")
SERVED_FROM_CACHE = ("hit", "stale", "waited")

# Lua: delete the lock only if we still own it (a lock that expired and was re-taken is not ours)
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"

ConnectionSource = Callable[[], AbstractContextManager[psycopg.Connection]]


def trends_key(request: TrendRequest) -> str:
    return f"{PREFIX}trends:{request.cache_suffix}"


def serving_client(url: str, socket_timeout_ms: int) -> redis.Redis:
    """A Redis client for the read path: short connect/read timeouts and no retries, so a dead or hung
    Redis costs one timeout, after which the breaker sends reads to SQL."""
    timeout = socket_timeout_ms / 1000
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


def dump_json(payload: dict[str, Any]) -> bytes:
    """The one serialization of payloads (compact), used for Redis and for the SQL fallback alike."""
    return json.dumps(payload, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Entry:
    gen: int
    computed_at: float
    expires_at: float
    compute_ms: float
    body: bytes  # the payload as JSON, exactly as served

    @classmethod
    def of(
        cls, gen: int, computed_at: float, expires_at: float, compute_ms: float, payload: dict[str, Any]
    ) -> Entry:
        return cls(gen, computed_at, expires_at, compute_ms, dump_json(payload))

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)

    def encode(self) -> bytes:
        head = {
            "gen": self.gen,
            "computed_at": self.computed_at,
            "expires_at": self.expires_at,
            "compute_ms": self.compute_ms,
        }
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + self.body

    @staticmethod
    def decode(raw: bytes | None) -> Entry | None:
        if raw is None:
            return None
        head, sep, body = raw.partition(b"\n")
        try:
            d = json.loads(head)
            if not sep or not body:
                return None
            return Entry(
                int(d["gen"]), float(d["computed_at"]), float(d["expires_at"]), float(d["compute_ms"]), body
            )
        except (ValueError, KeyError, TypeError):
            return None  # a corrupt entry is a miss, never an error page


def _minute(ts: float) -> int:
    return int(ts // 60)


@dataclass
class DashboardCache:
    """Cache-aside reads of the dashboard payloads, shared by the API and the tests.

    ``redis_client`` should come from :func:`serving_client`; ``connection`` opens a psycopg connection
    (a pool's ``.connection`` in the API). Thread-safe: the API calls it from its worker threads.
    """

    redis_client: redis.Redis
    connection: ConnectionSource
    kpi_ttl_s: int = 60
    trends_ttl_s: int = 300
    lock_ms: int = 10_000
    wait_s: float = 2.0
    retry_after_s: float = 1.0
    stats_flush_s: float = 0.0  # 0: every outcome is written at once (tests); the API batches for 1 s
    counts: Counter[str] = field(default_factory=Counter)  # this process's outcomes, Redis up or down
    recomputations: Counter[str] = field(default_factory=Counter)  # SQL computations per key
    local_ttl_s: float = 0.0  # > 0: keep fresh bodies in process memory that long (the API: 1 s)
    _local: dict[str, tuple[float, float, bytes]] = field(default_factory=dict)
    _refreshing: set[str] = field(default_factory=set)
    _down_until: float = 0.0
    _in_outage: bool = False
    _pending: Counter[str] = field(default_factory=Counter)
    _last_flush: float = float("-inf")  # monotonic clock: 0.0 is recent on a machine booted < 1 h ago
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ public reads

    def kpis_json(self) -> bytes:
        """Real-time KPIs as the JSON body served: one Redis round trip on a hit, the KPI SQL on a miss
        (see :func:`compute_kpis`)."""
        return self.get_raw(KPIS_KEY, self.kpi_ttl_s, lambda conn: compute_kpis(conn))

    def usage_trends_json(self, request: TrendRequest) -> bytes:
        """Usage trends for a validated request as the JSON body served; the rollup SQL on a miss."""
        return self.get_raw(
            trends_key(request), self.trends_ttl_s, lambda conn: compute_usage_trends(conn, request)
        )

    def kpis(self) -> dict[str, Any]:
        return json.loads(self.kpis_json())

    def usage_trends(self, request: TrendRequest) -> UsageTrends:
        return json.loads(self.usage_trends_json(request))

    def peek_local(self, key: str) -> bytes | None:
        """The body of ``key`` from this process's memory if it was fresh in Redis less than
        ``local_ttl_s`` ago (and is still within its TTL); no I/O, so the API calls it on its event loop.

        Why: under load most requests ask for the same few keys; a one-second near cache turns thousands
        of identical Redis round trips a second into one per key and process. The cost: an invalidation
        (new generation) reaches a process up to ``local_ttl_s`` later.

        Past ``local_ttl_s`` it returns ``None`` (the caller reads through :meth:`get_raw`, which
        refreshes the copy), except while a refresh of the key is already running in this process: then
        the local copy is served (while within its Redis TTL and at most ``LOCAL_STALE_S`` past its local
        one), so the refresh of a hot key is single-flight inside the process too. Peeking claims
        nothing: the claim is taken by the read that refreshes (:meth:`get_raw`) and released when it
        returns, so a caller may peek any number of times and a peek not followed by a read cannot
        hold up the refresh. When Redis is down, SQL answers are kept the same way, which bounds the
        fallback's load on PostgreSQL to about one query per key, second and process.
        """
        if self.local_ttl_s <= 0:
            return None
        item = self._local.get(key)
        if item is None:
            return None
        valid_until, serve_until, body = item
        now = time.time()
        if now < valid_until:
            self._record("hit", flush=False)
            return body
        if now < serve_until and key in self._refreshing:
            self._record("stale", flush=False)
            return body
        return None

    def _remember(self, key: str, body: bytes, expires_at: float) -> None:
        if self.local_ttl_s <= 0:
            return
        if len(self._local) >= 1024:  # arbitrary trend ranges: bound the memory, keep it simple
            self._local.clear()
        valid_until = min(expires_at, time.time() + self.local_ttl_s)
        self._local[key] = (valid_until, min(expires_at, valid_until + LOCAL_STALE_S), body)

    def redis_available(self) -> bool:
        return time.monotonic() >= self._down_until

    # ------------------------------------------------------------------ the read path

    def get(
        self, key: str, ttl_s: int, compute: Callable[[psycopg.Connection], dict[str, Any]]
    ) -> dict[str, Any]:
        return json.loads(self.get_raw(key, ttl_s, compute))

    def get_raw(self, key: str, ttl_s: int, compute: Callable[[psycopg.Connection], dict[str, Any]]) -> bytes:
        """The JSON body of ``key``: from Redis if fresh; otherwise single-flight recompute (module doc).

        With the near cache on, the first reader of a key in this process claims its refresh for the
        duration of the read; a reader arriving meanwhile gets the local copy (no I/O) if one is still
        servable (see :meth:`peek_local`), else reads Redis as usual.
        """
        if self.local_ttl_s <= 0:
            return self._get_raw(key, ttl_s, compute)
        with self._lock:
            claimed = key not in self._refreshing
            self._refreshing.add(key)
        if not claimed:  # another thread is refreshing this key
            item = self._local.get(key)
            now = time.time()
            if item is not None and now < item[1]:
                self._record("hit" if now < item[0] else "stale", flush=False)
                return item[2]
            return self._get_raw(key, ttl_s, compute)
        try:
            return self._get_raw(key, ttl_s, compute)
        finally:
            with self._lock:
                self._refreshing.discard(key)

    def _get_raw(
        self, key: str, ttl_s: int, compute: Callable[[psycopg.Connection], dict[str, Any]]
    ) -> bytes:
        if not self.redis_available():
            return self._fallback(key, compute)
        try:
            gen_raw, raw = self.redis_client.mget(GEN_KEY, key)
        except redis.RedisError as exc:
            self._trip(exc)
            return self._fallback(key, compute)
        if self._in_outage:
            self._in_outage = False
            log.warning("Redis is back: serving from the cache again")
        gen = int(gen_raw or 0)
        entry = Entry.decode(raw)
        now = time.time()
        if entry is not None and entry.gen >= gen and now < entry.expires_at:
            self._remember(key, entry.body, entry.expires_at)
            self._record("hit")
            return entry.body

        token = self._try_lock(key)
        if token is not None:
            try:
                return self._recompute(key, ttl_s, gen, compute)
            except Exception:
                if entry is None:
                    raise
                # PostgreSQL failed: an old answer beats an error page; the next reader retries
                log.exception("recomputing %s failed; serving the stale copy", key)
                self._record("stale")
                return entry.body
            finally:
                self._unlock(key, token)
        if entry is not None:
            self._record("stale")  # someone else is recomputing: stale-while-revalidate
            return entry.body
        if not self.redis_available():  # _try_lock hit a Redis error
            return self._fallback(key, compute)
        waited = self._wait_for(key, gen)
        if waited is not None:
            self._record("waited")
            return waited.body
        # the lock holder is slow or died: answer from SQL rather than keep the reader waiting
        return self._recompute(key, ttl_s, gen, compute)

    def _recompute(
        self, key: str, ttl_s: int, gen: int, compute: Callable[[psycopg.Connection], dict[str, Any]]
    ) -> bytes:
        started = time.perf_counter()
        with self.connection() as conn:
            body = dump_json(compute(conn))
        elapsed_ms = (time.perf_counter() - started) * 1000
        with self._lock:
            self.recomputations[key] += 1
        now = time.time()
        # stamped with the generation read *before* computing: if an invalidation happened meanwhile,
        # this entry is already stale and the next reader recomputes
        entry = Entry(gen, now, now + ttl_s, elapsed_ms, body)
        self._remember(key, body, entry.expires_at)
        if self.redis_available():
            try:
                self.redis_client.set(key, entry.encode(), ex=ttl_s + STALE_GRACE_S)
            except redis.RedisError as exc:
                self._trip(exc)
        self._record("miss" if self.redis_available() else "fallback")
        return body

    def _fallback(self, key: str, compute: Callable[[psycopg.Connection], dict[str, Any]]) -> bytes:
        with self.connection() as conn:
            body = dump_json(compute(conn))
        self._remember(key, body, time.time() + self.local_ttl_s)
        with self._lock:
            self.recomputations[key] += 1
            self.counts["fallback"] += 1
        return body

    def _wait_for(self, key: str, gen: int) -> Entry | None:
        deadline = time.monotonic() + self.wait_s
        delay = 0.005
        while time.monotonic() < deadline:
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
            try:
                entry = Entry.decode(self.redis_client.get(key))
            except redis.RedisError as exc:
                self._trip(exc)
                return None
            if entry is not None and entry.gen >= gen:
                return entry
        return None

    def _try_lock(self, key: str) -> str | None:
        token = uuid.uuid4().hex
        try:
            ok = self.redis_client.set(LOCK_PREFIX + key, token, nx=True, px=self.lock_ms)
        except redis.RedisError as exc:
            self._trip(exc)
            return token  # Redis is gone: nobody can coordinate, so this reader computes
        return token if ok else None

    def _unlock(self, key: str, token: str) -> None:
        if not self.redis_available():
            return
        try:
            self.redis_client.eval(_RELEASE, 1, LOCK_PREFIX + key, token)
        except redis.RedisError as exc:
            self._trip(exc)

    def _trip(self, exc: Exception) -> None:
        # log the start of an outage, not every retry of it (one per retry_after_s per process)
        if not self._in_outage:
            self._in_outage = True
            log.warning(
                "Redis unavailable (%s): serving from SQL, retrying every %.1f s", exc, self.retry_after_s
            )
        self._down_until = time.monotonic() + self.retry_after_s

    def _record(self, outcome: str, *, flush: bool = True) -> None:
        now = time.monotonic()
        with self._lock:
            self.counts[outcome] += 1
            self._pending[outcome] += 1
            if not flush or now - self._last_flush < self.stats_flush_s:
                return
        self.flush_stats()

    def flush_stats(self) -> None:
        """Write this process's pending outcome counts to the current minute's hash (one pipelined round
        trip). Counts of an outage are dropped: Redis cannot take them and they are all ``fallback``."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
            self._last_flush = time.monotonic()
        if not pending or not self.redis_available():
            return
        stats_key = f"{STATS_PREFIX}{_minute(time.time())}"
        try:
            pipe = self.redis_client.pipeline(transaction=False)
            for outcome, n in pending.items():
                pipe.hincrby(stats_key, outcome, n)
            pipe.expire(stats_key, STATS_KEEP_S)
            pipe.execute()
        except redis.RedisError as exc:
            self._trip(exc)


# ---------------------------------------------------------------------------------------- warming


@dataclass(frozen=True)
class WarmResult:
    generation: int
    keys: dict[str, Entry]
    bytes: int
    duration_ms: float


def warm_dashboard_cache(
    conn: psycopg.Connection, client: redis.Redis, *, today: dt.date, kpi_ttl_s: int, trends_ttl_s: int
) -> WarmResult:
    """Compute the KPIs and the standard trend ranges from SQL, then write them to Redis together with a
    new generation in one ``MULTI``/``EXEC`` pipeline: readers see either the old cache or the new one,
    and every other cached range (other dates) becomes stale at the same instant (invalidation).

    Cost: the KPI statement plus five trend reads over the rollups (tens of ms), then two Redis round
    trips (``GET dash:gen`` and the pipeline). No locks in Redis; ACCESS SHARE in PostgreSQL.
    """
    started = time.perf_counter()
    computed: list[tuple[str, int, float, dict[str, Any]]] = []
    t0 = time.perf_counter()
    computed.append((KPIS_KEY, kpi_ttl_s, 0.0, compute_kpis(conn)))
    computed[-1] = (KPIS_KEY, kpi_ttl_s, (time.perf_counter() - t0) * 1000, computed[-1][3])
    for request in standard_trend_requests(today):
        t0 = time.perf_counter()
        payload = compute_usage_trends(conn, request)
        computed.append((trends_key(request), trends_ttl_s, (time.perf_counter() - t0) * 1000, payload))

    generation = int(client.get(GEN_KEY) or 0) + 1
    now = time.time()
    entries = {key: Entry.of(generation, now, now + ttl, ms, payload) for key, ttl, ms, payload in computed}
    size = 0
    pipe = client.pipeline(transaction=True)
    for key, entry in entries.items():
        data = entry.encode()
        size += len(data)
        ttl = kpi_ttl_s if key == KPIS_KEY else trends_ttl_s
        pipe.set(key, data, ex=ttl + STALE_GRACE_S)
    pipe.set(GEN_KEY, generation)
    pipe.execute()
    return WarmResult(generation, entries, size, (time.perf_counter() - started) * 1000)


def invalidate(client: redis.Redis) -> int:
    """Make every cached entry stale at once (``INCR dash:gen``, O(1)); returns the new generation.
    Stale entries are still served to concurrent readers while one of them recomputes."""
    return int(client.incr(GEN_KEY))


def current_generation(client: redis.Redis) -> int:
    return int(client.get(GEN_KEY) or 0)


def read_entry(client: redis.Redis, key: str) -> Entry | None:
    return Entry.decode(client.get(key))


# ---------------------------------------------------------------------------------------- hit rate


@dataclass(frozen=True)
class HitRate:
    counts: dict[str, int]
    window_minutes: int

    @property
    def requests(self) -> int:
        return sum(self.counts.values())

    @property
    def served_from_cache(self) -> int:
        return sum(self.counts.get(k, 0) for k in SERVED_FROM_CACHE)

    @property
    def rate(self) -> float:
        """Share of requests answered from Redis (fresh, stale-while-revalidate or after waiting for
        the single flight); NaN without requests."""
        return self.served_from_cache / self.requests if self.requests else math.nan


def hit_rate(client: redis.Redis, *, window_minutes: int = 15, now: float | None = None) -> HitRate:
    """Outcome counts of the last ``window_minutes`` minutes (the current minute included), from the
    per-minute hashes: one pipelined round trip of ``window_minutes`` HGETALLs."""
    current = _minute(time.time() if now is None else now)
    pipe = client.pipeline(transaction=False)
    for m in range(current - window_minutes + 1, current + 1):
        pipe.hgetall(f"{STATS_PREFIX}{m}")
    totals: Counter[str] = Counter()
    for h in pipe.execute():
        for k, v in h.items():
            totals[k.decode() if isinstance(k, bytes) else k] += int(v)
    return HitRate({k: totals.get(k, 0) for k in OUTCOMES}, window_minutes)


def iter_entries(client: redis.Redis, keys: list[str]) -> Iterator[tuple[str, Entry | None]]:
    """Entries of the given keys in one MGET."""
    for key, raw in zip(keys, client.mget(keys), strict=True):
        yield key, Entry.decode(raw)
