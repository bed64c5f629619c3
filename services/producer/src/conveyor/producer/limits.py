"""Flow control for operators: rate limits, concurrency caps and back-offs, kept in Redis.

The claim script enforces them (lua/claim.lua); this module validates what an operator
asks for, stores it through lua/limits.lua and shows what is in force.
"""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from conveyor.common.errors import InvalidArgument
from conveyor.common.keys import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from conveyor.common.scripts import LimitsSnapshot, Scripts
from conveyor.common.validate import RATE_KEY_RE
from conveyor.producer.dead_letters import queue_of
from conveyor.v1 import limits_pb2

MAX_RATE = 100_000
MAX_CONCURRENCY = 1_000_000
MAX_PERIOD_MS = 24 * 3600 * 1000


#: Requests with the limit scope oneof (whole queue, each_key, or one key).
_Scoped = (
    limits_pb2.SetRateLimitRequest
    | limits_pb2.ClearRateLimitRequest
    | limits_pb2.SetConcurrencyLimitRequest
    | limits_pb2.ClearConcurrencyLimitRequest
)


def _field(kind: str, request: _Scoped) -> str:
    """The limits-hash field of the request's scope (``kind`` is "rate" or "conc")."""
    scope = request.WhichOneof("scope")
    if scope == "each_key":
        if not request.each_key:
            raise InvalidArgument({"each_key": "set it to true, or leave the scope unset for the whole queue"})
        return f"key_{kind}"
    if scope == "key":
        if not RATE_KEY_RE.match(request.key):
            raise InvalidArgument({"key": "must be 1-128 bytes of printable characters"})
        return f"{kind}:{request.key}"
    return kind


def _duration_ms(value: Duration, field: str, present: bool) -> int:
    ms = value.seconds * 1000 + value.nanos // 1_000_000
    if not present or ms < 1 or ms > MAX_PERIOD_MS:
        raise InvalidArgument({field: "must be between 1 ms and 1 day"})
    return ms


def _rate(spec: str) -> limits_pb2.RateLimit:
    n, period_ms = spec.split(":")
    rate = limits_pb2.RateLimit(limit=int(n))
    rate.period.FromMilliseconds(int(period_ms))
    return rate


def describe(queue: str, snap: LimitsSnapshot) -> limits_pb2.QueueLimits:
    """The QueueLimits message of a snapshot."""
    out = limits_pb2.QueueLimits(queue=queue, running=snap.running)
    s = snap.settings
    if "rate" in s:
        out.rate.CopyFrom(_rate(s["rate"]))
    if "key_rate" in s:
        out.rate_per_key.CopyFrom(_rate(s["key_rate"]))
    out.concurrency = int(s.get("conc", 0))
    out.default_priority = int(s.get("prio", DEFAULT_PRIORITY))
    out.concurrency_per_key = int(s.get("key_conc", 0))
    overrides: dict[str, limits_pb2.KeyLimits] = {}
    for name, value in s.items():
        kind, _, key = name.partition(":")
        if not key:
            continue
        entry = overrides.setdefault(key, limits_pb2.KeyLimits(key=key))
        if kind == "rate":
            entry.rate.CopyFrom(_rate(value))
        elif kind == "conc":
            entry.concurrency = int(value)
    out.keys.extend(overrides[k] for k in sorted(overrides))
    if "" in snap.backoffs:
        out.backed_off_until.FromMilliseconds(snap.backoffs[""])
    blocked = {key: (until, held) for key, until, held in snap.blocked}
    for key, until in snap.backoffs.items():
        if key:  # "" is the whole queue (backed_off_until above)
            blocked_until, held = blocked.get(key, (0, 0))
            blocked[key] = (max(until, blocked_until), held)
    for key, (until, held) in sorted(blocked.items(), key=lambda item: item[1][0])[:100]:
        b = out.blocked_keys.add(key=key, waiting=held)
        b.until.FromMilliseconds(until)
    return out


class FlowLimits:
    """Rate limits, concurrency caps and back-offs of queues."""

    def __init__(self, scripts: Scripts) -> None:
        self._scripts = scripts

    async def get(self, queue: str) -> limits_pb2.QueueLimits:
        return describe(queue, await self._scripts.limits(queue_of(queue)))

    async def set_rate(self, request: limits_pb2.SetRateLimitRequest) -> limits_pb2.QueueLimits:
        keys = queue_of(request.queue)
        field = _field("rate", request)
        if not 1 <= request.limit <= MAX_RATE:
            raise InvalidArgument({"limit": f"must be 1-{MAX_RATE} starts per period"})
        period_ms = _duration_ms(request.period, "period", request.HasField("period"))
        await self._scripts.set_limit(keys, field, f"{request.limit}:{period_ms}")
        return await self.get(request.queue)

    async def set_concurrency(self, request: limits_pb2.SetConcurrencyLimitRequest) -> limits_pb2.QueueLimits:
        keys = queue_of(request.queue)
        field = _field("conc", request)
        if not 1 <= request.limit <= MAX_CONCURRENCY:
            raise InvalidArgument({"limit": f"must be 1-{MAX_CONCURRENCY} jobs running at once"})
        await self._scripts.set_limit(keys, field, str(request.limit))
        return await self.get(request.queue)

    async def clear(
        self, kind: str, request: limits_pb2.ClearRateLimitRequest | limits_pb2.ClearConcurrencyLimitRequest
    ) -> tuple[bool, limits_pb2.QueueLimits]:
        keys = queue_of(request.queue)
        changed = await self._scripts.clear_limit(keys, _field(kind, request))
        return changed, await self.get(request.queue)

    async def set_default_priority(self, request: limits_pb2.SetDefaultPriorityRequest) -> limits_pb2.QueueLimits:
        keys = queue_of(request.queue)
        if not MIN_PRIORITY <= request.priority <= MAX_PRIORITY:
            raise InvalidArgument({"priority": f"must be {MIN_PRIORITY} (lowest) to {MAX_PRIORITY} (highest)"})
        await self._scripts.set_limit(keys, "prio", str(request.priority))
        return await self.get(request.queue)

    async def back_off(self, request: limits_pb2.BackOffRequest) -> int:
        keys = queue_of(request.queue)
        _check_key(request.key)
        duration_ms = _duration_ms(request.duration, "duration", request.HasField("duration"))
        return await self._scripts.back_off(keys, request.key, duration_ms)

    async def clear_back_off(self, request: limits_pb2.ClearBackOffRequest) -> tuple[bool, limits_pb2.QueueLimits]:
        """End a back-off early; changed is False when none of that scope was in force."""
        keys = queue_of(request.queue)
        _check_key(request.key)
        changed = await self._scripts.clear_back_off(keys, request.key)
        return changed, await self.get(request.queue)


def _check_key(key: str) -> None:
    """A back-off's rate key: empty (the whole queue) or a valid rate key."""
    if key and not RATE_KEY_RE.match(key):
        raise InvalidArgument({"key": "must be 1-128 bytes of printable characters, or empty for the whole queue"})
