"""Shared state for a fleet: the rate limits and budget spend counted in Redis.

With ``state: {url: redis://...}`` every replica charges the same buckets, so a
limit of 600 requests per minute is 600 for the fleet, not 600 per replica.

- :class:`RedisLimiter` runs the arithmetic of :mod:`sidecar.gateway.ratelimit` in
  one Lua script (``EVALSHA``, loaded again when Redis has forgotten it), which
  checks and charges every bucket of a call atomically, all or nothing. The script
  reads the clock with Redis's ``TIME``, so replicas with skewed clocks agree.
  Concurrency is a sorted set per scope whose members are grant ids scored by a
  lease deadline; expired members are dropped on every acquire, so the slots of a
  replica that crashed mid-call come back after the lease. Every key carries the
  configured prefix and expires once idle (a bucket when it would be full again).
  Budget spend is a float counter per key (``INCRBYFLOAT`` + ``EXPIREAT``).
- :class:`SharedLimiter` is what the proxy holds: it bounds every Redis operation
  by ``timeout`` and, when Redis fails, counts locally (``fail_open``, the default)
  or refuses with reason ``state_unavailable`` (``fail_closed``); either way the
  call is answered within ``timeout``. After a failure no call waits on Redis: a
  background prober pings it every ``retry_interval`` until it answers. Each up→down and
  down→up transition logs one line and calls ``on_state``; each failed operation
  calls ``on_error``.

Keys (``P`` is the prefix, default ``llm-sidecar:``)::

    P b:<kind>:<id>   hash   bucket levels and times: rl, rt (requests), tl, tt (tokens);
                             times in microseconds of Redis's clock
    P c:<kind>:<id>   zset   grant ids holding a concurrency slot, scored by lease deadline
    P spend:<key>     string budget spend (float)

One script run touches the keys of every scope of a call, and the client is a
plain (non-cluster) one: point it at a single primary (a managed or Sentinel-run
failover is fine; the lost counts of a failover only make limits briefly looser).
Redis Cluster is not supported. Redis 5 or later (the script writes after reading
``TIME``, which needs effect replication, the default since 5.0).

Config section (durations as in the rest of the config)::

    state.url                  required; redis://[user:password@]host[:port][/db],
                               rediss://... (TLS) or unix:///path/to/socket
    state.on_error = fail_open fail_open (count locally) | fail_closed (answer 503)
    state.prefix = llm-sidecar:  prefix of every key
    state.timeout = 250ms      most one Redis operation may take on a call's path; > 0
    state.retry_interval = 1s  how often Redis is probed while it is down; > 0

Adapter: imports redis-py's asyncio client; the decisions themselves come from the
pure :mod:`sidecar.gateway.ratelimit`. No password ever reaches a log line, an error
message or a repr (see :func:`redacted_url`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import re
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from yaml.nodes import Node

from sidecar.gateway.ratelimit import (
    Decision,
    Grant,
    LocalLimiter,
    RateSnapshot,
    Scope,
    ScopeLevels,
    evaluate,
)
from sidecar.yamlspec import Reader, join

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_PREFIX",
    "ON_ERROR_MODES",
    "RedisLimiter",
    "SharedLimiter",
    "StateConfig",
    "check_url",
    "parse_state",
    "redacted_url",
]

log = logging.getLogger("sidecar.gateway.sharedstate")

T = TypeVar("T")

DEFAULT_PREFIX = "llm-sidecar:"

#: How long a concurrency slot stays taken when its replica never releases it
#: (crashed): longer than any call should last (the default total timeout is 10 min).
DEFAULT_LEASE = 900.0

#: What happens to calls while Redis is unreachable.
ON_ERROR_MODES = ("fail_open", "fail_closed")

_SCHEMES = ("redis", "rediss", "unix")

#: Grant ids whose concurrency slot may still be held in Redis (a release or an
#: acquire that failed half-way); retried when Redis is back. Bounded: past it the
#: lease frees them.
_MAX_ORPHANS = 10_000


# -- config ------------------------------------------------------------------------------


def redacted_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (in the userinfo and in a ``password=`` query).

    Safe on any text: what cannot be parsed as a URL has everything between ``//``
    and the last ``@`` hidden.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = netloc.rpartition("@")[2]
            netloc = f"{user}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() == "password" for k, _ in pairs):
                query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
        if netloc == parts.netloc and query == parts.query:
            return url
        # Written out rather than urlunsplit, which drops the empty authority of unix:///path.
        text = f"{parts.scheme}://{netloc}{parts.path}"
        return text + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    except ValueError:
        return re.sub(r"//.*@", "//***@", url)


def check_url(url: str) -> None:
    """Raise :class:`ValueError` (with a message free of passwords) unless ``url`` names a Redis.

    Accepts ``redis://`` and ``rediss://`` with a host (port and ``/db`` optional)
    and ``unix://`` with a socket path. For the config and the ``--state`` flag.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("not a valid URL (check the port)") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"the scheme must be one of redis://, rediss://, unix://, got {scheme or 'none'}")
    if scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path: unix:///run/redis.sock")
        return
    if not parts.hostname:
        raise ValueError(f"a {scheme}:// URL needs a host: {scheme}://host:6379")
    if port == 0:
        raise ValueError("the port must be between 1 and 65535")
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"the path must be a database number (/0), got /{db}")


def _url_secrets(url: str) -> tuple[str, ...]:
    """The passwords a URL carries (userinfo and ``password=`` query), to mask them in messages."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
        found += [v for k, v in parse_qsl(parts.query) if k.lower() == "password"]
    except ValueError:
        return ()
    return tuple(f for f in found if f)


@dataclass(frozen=True, repr=False)
class StateConfig:
    """The ``state`` section (durations in seconds); its repr never shows the password."""

    url: str
    on_error: str = "fail_open"
    prefix: str = DEFAULT_PREFIX
    timeout: float = 0.25
    retry_interval: float = 1.0

    def redacted_url(self) -> str:
        """The URL as it may be logged."""
        return redacted_url(self.url)

    def __repr__(self) -> str:
        return (
            f"StateConfig(url={self.redacted_url()!r}, on_error={self.on_error!r}, prefix={self.prefix!r}, "
            f"timeout={self.timeout!r}, retry_interval={self.retry_interval!r})"
        )


_KEYS = ("url", "on_error", "prefix", "timeout", "retry_interval")


def parse_state(r: Reader, node: Node, path: str, ctx: object = None) -> StateConfig:
    """Parse the ``state`` section; every problem is recorded on ``r`` with its location.

    A missing or invalid ``url`` is recorded and left empty (the load fails on the
    recorded problems anyway). Problems about the URL show it redacted: it often
    comes from ``${REDIS_URL}`` with a password in it. ``ctx`` is accepted for the
    config loader's section signature.
    """
    d = StateConfig(url="")
    m = r.mapping(node, path, _KEYS, required=("url",))
    if m is None:
        return d

    def at(key: str) -> tuple[Node | None, str]:
        return m.get(key), join(path, key)

    url = r.string(*at("url"))
    if url is not None:
        try:
            check_url(url)
        except ValueError as exc:
            r.problem(m.get("url"), join(path, "url"), f'invalid URL "{redacted_url(url)}": {exc}')
            url = None
    return StateConfig(
        url=url or "",
        on_error=r.string(*at("on_error"), d.on_error, choices=ON_ERROR_MODES),
        prefix=r.string(*at("prefix"), d.prefix),
        timeout=r.duration(*at("timeout"), d.timeout, positive=True),
        retry_interval=r.duration(*at("retry_interval"), d.retry_interval, positive=True),
    )


# -- the Lua script ----------------------------------------------------------------------

# One script for the three operations, so a fleet runs one piece of arithmetic.
# Numbers cross into Redis and back as "%.17g" strings: Redis would otherwise
# truncate a Lua number to an integer in a reply and write it with 14 digits.
#
# acquire: KEYS = bucket, conc for each scope; ARGV = "acquire", tokens, grant id,
#   lease (us), then rpm, tpm, concurrency per scope (0: no such limit).
#   Returns {allowed 0/1, denial "kind:index" or "", now (us), then per scope
#   rpm level, tpm level (refilled to now, before the charge), slots in use}.
# correct: KEYS = buckets; ARGV = "correct", extra tokens (negative: refund), tpm per scope.
# release: KEYS = conc sets; ARGV = "release", grant id.
_LUA = r"""
local op = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local MINUTE = 60000000
local EPS = 1e-6

local function num(x) return string.format('%.17g', x) end

-- A bucket's level at `now`: full when absent, refilled by limit per minute, capped.
local function level(key, f, limit)
  local v = redis.call('HMGET', key, f .. 'l', f .. 't')
  local l, at = tonumber(v[1]), tonumber(v[2])
  if l == nil or at == nil then return limit, now end
  if now > at then
    l = l + (now - at) * limit / MINUTE
    at = now
  end
  if l > limit then l = limit end
  return l, at
end

-- Keep a key until its bucket would be full again (never shorten an expiry).
local function keep(key, ms)
  ms = math.ceil(ms) + 1000
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end

local function store(key, f, l, at, limit)
  redis.call('HSET', key, f .. 'l', num(l), f .. 't', num(at))
  keep(key, (limit - l) * MINUTE / limit / 1000)
end

if op == 'acquire' then
  local tokens = tonumber(ARGV[2])
  local member = ARGV[3]
  local lease = tonumber(ARGV[4])
  local n = #KEYS / 2
  local ok, denial = 1, ''
  local out, state = {}, {}
  for i = 1, n do
    local rpm, tpm, conc = tonumber(ARGV[2 + 3 * i]), tonumber(ARGV[3 + 3 * i]), tonumber(ARGV[4 + 3 * i])
    local bucket, slots = KEYS[2 * i - 1], KEYS[2 * i]
    local rl, rt, tl, tt, used = 0, now, 0, now, 0
    if rpm > 0 then
      rl, rt = level(bucket, 'r', rpm)
      if ok == 1 and rl + EPS < 1 then ok, denial = 0, 'rpm:' .. i end
    end
    if tpm > 0 then
      tl, tt = level(bucket, 't', tpm)
      if ok == 1 and (tokens > tpm or tl + EPS < tokens) then ok, denial = 0, 'tpm:' .. i end
    end
    if conc > 0 then
      redis.call('ZREMRANGEBYSCORE', slots, '-inf', num(now))
      used = redis.call('ZCARD', slots)
      if ok == 1 and used >= conc then ok, denial = 0, 'concurrency:' .. i end
    end
    state[i] = {rpm, tpm, conc, rl, rt, tl, tt}
    out[#out + 1] = num(rl)
    out[#out + 1] = num(tl)
    out[#out + 1] = used
  end
  if ok == 1 then
    for i = 1, n do
      local s = state[i]
      local bucket, slots = KEYS[2 * i - 1], KEYS[2 * i]
      if s[1] > 0 then store(bucket, 'r', s[4] - 1, s[5], s[1]) end
      if s[2] > 0 then store(bucket, 't', s[6] - tokens, s[7], s[2]) end
      if s[3] > 0 then
        redis.call('ZADD', slots, num(now + lease), member)
        keep(slots, lease / 1000)
      end
    end
  end
  local reply = {ok, denial, num(now)}
  for i = 1, #out do reply[#reply + 1] = out[i] end
  return reply
elseif op == 'correct' then
  local extra = tonumber(ARGV[2])
  for i = 1, #KEYS do
    local tpm = tonumber(ARGV[2 + i])
    if tpm > 0 then
      local l, at = level(KEYS[i], 't', tpm)
      l = l - extra
      if l > tpm then l = tpm end
      store(KEYS[i], 't', l, at, tpm)
    end
  end
  return 1
elseif op == 'release' then
  local removed = 0
  for i = 1, #KEYS do removed = removed + redis.call('ZREM', KEYS[i], ARGV[2]) end
  return removed
end
return redis.error_reply('unknown operation ' .. tostring(op))
"""


# Without this redis-py reads its own package metadata from disk when it makes its first
# connection (on the event loop) and sends CLIENT SETINFO on every connect, which Redis
# before 7.2 rejects: a wasted round trip. redis-py 7+ spells it driver_info, older lib_*.
_NO_DRIVER_INFO: dict[str, Any] = (
    {"driver_info": None}
    if "driver_info" in inspect.signature(aioredis.Redis.__init__).parameters
    else {"lib_name": None, "lib_version": None}
)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _limit_arg(value: int | None) -> int:
    return 0 if value is None else value


class RedisLimiter:
    """The limiter of :mod:`sidecar.gateway.ratelimit`, counted in Redis for every replica.

    Errors (connection, timeout, script) propagate: :class:`SharedLimiter` decides
    what a failure means. ``now`` is accepted for the same signature as
    :class:`~sidecar.gateway.ratelimit.LocalLimiter` and ignored: the script uses
    Redis's clock. ``lease`` (seconds) bounds how long a concurrency slot outlives
    a replica that never released it.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease: float = DEFAULT_LEASE,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.lease = lease
        self._script = client.register_script(_LUA)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = DEFAULT_PREFIX, lease: float = DEFAULT_LEASE, timeout: float = 0.05
    ) -> RedisLimiter:
        """A limiter with its own connection pool to ``url``.

        No retries with backoff: one immediate reconnect covers a pooled connection
        that a Redis restart closed; anything slower is the front's business.
        """
        io_timeout = max(1.0, 10 * timeout)  # a backstop; the front's own timeout is the bound
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=io_timeout,
            socket_timeout=io_timeout,
            retry=Retry(NoBackoff(), 1),
            client_name="llm-sidecar",
            **_NO_DRIVER_INFO,
        )
        return cls(client, prefix=prefix, lease=lease)

    def _bucket_key(self, scope: Scope) -> str:
        return f"{self.prefix}b:{scope.kind}:{scope.id}"

    def _slots_key(self, scope: Scope) -> str:
        return f"{self.prefix}c:{scope.kind}:{scope.id}"

    def spend_key(self, key: str) -> str:
        """The Redis key of a budget spend counter."""
        return f"{self.prefix}spend:{key}"

    async def load_script(self) -> None:
        """Load the Lua script into Redis's script cache (EVALSHA then needs no reload)."""
        await self.client.script_load(_LUA)

    async def _run(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        return await self._script(keys=list(keys), args=list(args))

    async def try_acquire(
        self, scopes: Sequence[Scope], tokens: int, now: float, *, grant_id: str | None = None
    ) -> Decision:
        """Check and charge every scope in one script run; nothing is charged on a refusal.

        ``grant_id`` (default: a fresh UUID) is the member the concurrency sets hold.
        """
        grant_id = grant_id or uuid.uuid4().hex
        if not scopes:
            return Decision(allowed=True, grant=Grant(grant_id, (), tokens, origin="redis"))
        keys: list[str] = []
        args: list[str | int | float] = ["acquire", tokens, grant_id, math.ceil(self.lease * 1_000_000)]
        for scope in scopes:
            keys += [self._bucket_key(scope), self._slots_key(scope)]
            lim = scope.limits
            args += [_limit_arg(lim.rpm), _limit_arg(lim.tpm), _limit_arg(lim.concurrency)]
        reply = await self._run(keys, args)
        ok = int(reply[0]) == 1
        denial = _text(reply[1])
        values = reply[3:]
        levels = [
            ScopeLevels(
                rpm=float(_text(values[3 * i])) if scope.limits.rpm is not None else None,
                tpm=float(_text(values[3 * i + 1])) if scope.limits.tpm is not None else None,
                in_flight=int(values[3 * i + 2]),
            )
            for i, scope in enumerate(scopes)
        ]
        decision = evaluate(scopes, levels, tokens)
        if ok:
            if not decision.allowed:  # pragma: no cover - same doubles, same comparisons
                decision = Decision(allowed=True, snapshot=RateSnapshot())
            return Decision(
                allowed=True,
                snapshot=decision.snapshot,
                grant=Grant(grant_id, tuple(scopes), tokens, origin="redis"),
            )
        if decision.allowed:  # pragma: no cover - the script is the authority; keep its reason
            reason, _, index = denial.partition(":")
            denied = scopes[int(index) - 1] if index.isdigit() else None
            return Decision(allowed=False, reason=reason or None, scope=denied, retry_after=1.0)
        return decision

    async def correct(self, grant: Grant, actual_tokens: int, now: float) -> None:
        """Refund or debit the difference between the tokens charged and used; once per grant."""
        if grant.corrected:
            return
        grant.corrected = True
        extra = max(0, actual_tokens) - grant.tokens
        charged = [s for s in grant.scopes if s.limits.tpm is not None]
        if extra == 0 or not charged:
            return
        keys = [self._bucket_key(s) for s in charged]
        await self._run(keys, ["correct", extra, *(_limit_arg(s.limits.tpm) for s in charged)])

    async def release(self, grant: Grant) -> None:
        """Give back the grant's concurrency slots; once per grant."""
        if grant.released:
            return
        grant.released = True
        await self.release_slots(grant.id, grant.scopes)

    async def release_slots(self, grant_id: str, scopes: Sequence[Scope]) -> int:
        """Remove ``grant_id`` from the concurrency sets of ``scopes``; how many held it."""
        keys = [self._slots_key(s) for s in scopes if s.limits.concurrency is not None]
        if not keys:
            return 0
        return int(await self._run(keys, ["release", grant_id]))

    async def add_spend(self, key: str, amount: float, expire_at: float) -> float:
        """Add ``amount`` to a budget's spend and return the new total; the counter ends at ``expire_at``.

        ``expire_at`` is wall-clock epoch seconds (the end of the budget's period).
        """
        name = self.spend_key(key)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incrbyfloat(name, amount)
            pipe.expireat(name, math.ceil(expire_at))
            total, _ = await pipe.execute()
        return float(total)

    async def spend(self, key: str) -> float:
        """A budget's spend so far (0 when nothing was added or the period ended)."""
        value = await self.client.get(self.spend_key(key))
        return 0.0 if value is None else float(_text(value))

    async def ping(self) -> None:
        """Raise unless Redis answers."""
        await self.client.ping()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()


# -- the front: timeouts, fallback, backoff ----------------------------------------------


class _Outcome(Enum):
    OK = "ok"
    FAILED = "failed"  # tried, and Redis failed or was too slow
    SKIPPED = "skipped"  # not tried: Redis is down and the prober is on it


_OPEN_ERRORS = "counting locally (fail_open): limits hold per replica until Redis is back"
_CLOSED_ERRORS = "refusing rate-limited calls (fail_closed) until Redis is back"


#: Failed operations in a row (timeouts) before Redis is marked down.
_DOWN_AFTER = 3
#: Pooled connections opened at start.
_WARM_CONNECTIONS = 8


class SharedLimiter:
    """Rate limits in Redis with a bounded cost per call and a defined outage behaviour.

    Every operation is bounded by ``timeout``. On a failure the call is served by
    ``fallback`` (``fail_open``) or refused with reason ``state_unavailable``
    (``fail_closed``), and Redis is marked down: from then on no call waits on it.
    A background prober pings it every ``retry_interval`` with the more generous
    ``probe_timeout`` (default ``max(timeout, 1s)``, so a reconnect or a TLS
    handshake that does not fit in ``timeout`` still succeeds), and the first
    answer marks it up again. So a hung Redis costs each call at most ``timeout``,
    and only the calls already in flight when it hung.

    A grant keeps its ``origin``, so one taken locally during an outage is
    corrected and released locally. Slots whose release failed (or whose acquire
    timed out after the script may have run) are released again once Redis is
    back; the lease frees them in any case.

    ``on_state(up)`` is called on each transition (and by :meth:`start`) for the
    ``llm_state_backend_up`` gauge; ``on_error(operation)`` on each failed
    operation (``acquire``, ``correct``, ``release``, ``add_spend``, ``spend``,
    ``ping``; a failed probe is a ``ping``) for ``llm_state_backend_errors_total``.
    """

    def __init__(
        self,
        backend: RedisLimiter,
        fallback: LocalLimiter,
        *,
        mode: str = "fail_open",
        timeout: float = 0.05,
        retry_interval: float = 1.0,
        probe_timeout: float | None = None,
        on_state: Callable[[bool], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        url: str = "",
    ) -> None:
        if mode not in ON_ERROR_MODES:
            raise ValueError(f"mode must be one of {', '.join(ON_ERROR_MODES)}, got {mode!r}")
        self.backend = backend
        self.fallback = fallback
        self.mode = mode
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.probe_timeout = max(timeout, 1.0) if probe_timeout is None else probe_timeout
        self._on_state = on_state
        self._on_error = on_error
        self._name = redacted_url(url) if url else "redis"
        self._secrets = _url_secrets(url)
        self._up: bool | None = None
        self._failures = 0  # failed operations in a row
        self._releasing = False
        self._prober: asyncio.Task[None] | None = None
        self._orphans: deque[tuple[str, tuple[Scope, ...]]] = deque(maxlen=_MAX_ORPHANS)
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_config(
        cls,
        config: StateConfig,
        fallback: LocalLimiter,
        *,
        lease: float = DEFAULT_LEASE,
        probe_timeout: float | None = None,
        on_state: Callable[[bool], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> SharedLimiter:
        """The front and its Redis client as the ``state`` section describes them."""
        backend = RedisLimiter.from_url(config.url, prefix=config.prefix, lease=lease, timeout=config.timeout)
        return cls(
            backend,
            fallback,
            mode=config.on_error,
            timeout=config.timeout,
            retry_interval=config.retry_interval,
            probe_timeout=probe_timeout,
            on_state=on_state,
            on_error=on_error,
            url=config.url,
        )

    @property
    def up(self) -> bool | None:
        """Whether Redis answered last time (``None``: not asked yet)."""
        return self._up

    # -- state ------------------------------------------------------------------

    def _notify(self, callback: Callable[[T], None] | None, value: T) -> None:
        if callback is None:
            return
        try:
            callback(value)
        except Exception:  # a metrics callback must never break a call
            log.exception("state backend callback failed")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _failed(self, operation: str, exc: BaseException) -> None:
        self._notify(self._on_error, operation)
        self._failures += 1
        # A refused connection is an outage; a lone timeout under a burst (the loop busy, a
        # pooled connection being opened) is not: only that call falls back, and Redis is
        # marked down after _DOWN_AFTER failures in a row (a hung Redis reaches it at once,
        # as every call in flight times out).
        if isinstance(exc, TimeoutError) and self._failures < _DOWN_AFTER:
            return
        if self._up is not False:
            self._up = False
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed ({self._scrub(exc)})"
            log.warning(
                "state backend %s unreachable: %s %s; %s; retrying every %gs",
                self._name,
                operation,
                what,
                _OPEN_ERRORS if self.mode == "fail_open" else _CLOSED_ERRORS,
                self.retry_interval,
            )
            self._notify(self._on_state, False)
        if self._prober is None or self._prober.done():
            self._prober = self._spawn(self._probe())

    def _scrub(self, exc: BaseException) -> str:
        """The error as it may be logged: its type and message, with any password masked."""
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _succeeded(self) -> None:
        self._failures = 0
        if self._up is not True:
            was = self._up
            self._up = True
            if was is False:
                log.info("state backend %s reachable again; limits are shared across replicas", self._name)
            self._notify(self._on_state, True)
        # Slots left by failed releases (a lone timeout does not mark Redis down): free them
        # as soon as Redis answers again.
        if self._orphans and not self._releasing:
            self._releasing = True
            self._spawn(self._release_orphans_now())

    async def _probe(self) -> None:
        """Ping every ``retry_interval`` until Redis answers; calls keep to the fallback meanwhile."""
        while self._up is False:
            await asyncio.sleep(self.retry_interval)
            if self._up is not False:
                return
            try:
                async with asyncio.timeout(self.probe_timeout):
                    await self.backend.ping()
            except Exception:
                self._notify(self._on_error, "ping")
                continue
            self._succeeded()

    async def _call(self, operation: str, run: Callable[[], Awaitable[T]]) -> tuple[_Outcome, T | None]:
        if self._up is False:
            return _Outcome.SKIPPED, None
        try:
            async with asyncio.timeout(self.timeout):
                result = await run()
        except Exception as exc:  # any failure of the backend means "unavailable", never a 500
            self._failed(operation, exc)
            return _Outcome.FAILED, None
        self._succeeded()
        return _Outcome.OK, result

    async def _release_orphans(self) -> bool:
        """Free the slots that failed releases (or timed-out acquires) may have left in Redis.

        True when none is left.
        """
        while self._orphans and self._up is not False:
            grant_id, scopes = self._orphans.popleft()
            outcome, _ = await self._call("release", partial(self.backend.release_slots, grant_id, scopes))
            if outcome is not _Outcome.OK:
                self._orphans.appendleft((grant_id, scopes))
                return False
        return not self._orphans

    async def _release_orphans_now(self) -> None:
        try:
            await self._release_orphans()
        finally:
            self._releasing = False
        if self._orphans and self._up is True:
            self._schedule_orphans()

    def _schedule_orphans(self) -> None:
        if not self._releasing:
            self._releasing = True
            self._spawn(self._release_orphans_later())

    async def _release_orphans_later(self) -> None:
        """Retry every ``retry_interval`` while Redis is not marked down (a lone timeout does not
        mark it down, and no other call may come along to find it answering); once it is
        down, the prober's success releases them."""
        try:
            while self._orphans:
                await asyncio.sleep(self.retry_interval)
                if self._up is False or await self._release_orphans():
                    return
        finally:
            self._releasing = False

    def _orphan(self, grant_id: str, scopes: tuple[Scope, ...]) -> None:
        if any(s.limits.concurrency is not None for s in scopes):
            self._orphans.append((grant_id, scopes))
            self._schedule_orphans()

    # -- operations -------------------------------------------------------------

    async def start(self) -> bool:
        """Connect and ping once (within ``probe_timeout``): the gauge and log are right from the start."""
        try:
            async with asyncio.timeout(self.probe_timeout):
                await self.backend.ping()
                # Open a few pooled connections and load the script now, so that the first
                # burst of calls does not pay for them inside the per-call timeout.
                await asyncio.gather(*(self.backend.ping() for _ in range(_WARM_CONNECTIONS)))
                await self.backend.load_script()
        except Exception as exc:
            self._failures = _DOWN_AFTER - 1  # unreachable at start: down at once
            self._failed("ping", exc)
            return False
        self._succeeded()
        return True

    async def try_acquire(self, scopes: Sequence[Scope], tokens: int, now: float) -> Decision:
        """Check and charge in Redis; while it is down, per ``mode``.

        ``now`` (monotonic seconds) is only used by the local fallback.
        """
        if not scopes:
            return self.fallback.try_acquire(scopes, tokens, now)
        scopes = tuple(scopes)
        grant_id = uuid.uuid4().hex
        outcome, decision = await self._call(
            "acquire", lambda: self.backend.try_acquire(scopes, tokens, now, grant_id=grant_id)
        )
        if outcome is _Outcome.OK and decision is not None:
            return decision
        if outcome is _Outcome.FAILED:
            # A timed-out script may still have run and taken slots under this id.
            self._orphan(grant_id, scopes)
        if self.mode == "fail_closed":
            return Decision(allowed=False, reason="state_unavailable", retry_after=self.retry_interval)
        return self.fallback.try_acquire(scopes, tokens, now)

    async def correct(self, grant: Grant, actual_tokens: int, now: float) -> None:
        """Settle the token charge where it was taken; lost (and counted) if Redis fails."""
        if grant.origin != "redis":
            self.fallback.correct(grant, actual_tokens, now)
            return
        if grant.corrected:
            return
        # A failed correction is dropped (and counted by on_error): the bucket refills on its own.
        await self._call("correct", lambda: self.backend.correct(grant, actual_tokens, now))
        grant.corrected = True

    async def release(self, grant: Grant) -> None:
        """Free the grant's slots where they were taken; retried on recovery if Redis fails."""
        if grant.origin != "redis":
            self.fallback.release(grant)
            return
        if grant.released:
            return
        grant.released = True
        if not grant.holds_slots:
            return
        outcome, _ = await self._call("release", lambda: self.backend.release_slots(grant.id, grant.scopes))
        if outcome is not _Outcome.OK:
            self._orphan(grant.id, grant.scopes)

    async def add_spend(self, key: str, amount: float, expire_at: float) -> float | None:
        """Add to a shared budget; the new total, or ``None`` when Redis is unavailable."""
        _, total = await self._call("add_spend", lambda: self.backend.add_spend(key, amount, expire_at))
        return total

    async def spend(self, key: str) -> float | None:
        """A shared budget's spend, or ``None`` when Redis is unavailable."""
        _, total = await self._call("spend", lambda: self.backend.spend(key))
        return total

    async def aclose(self) -> None:
        """Stop the prober and the background releases, and close the connection pool."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.backend.aclose()
