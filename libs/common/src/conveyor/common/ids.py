"""Job ids and Redis stream ids.

A job id is ``<queue>/<ULID>``: the ULID is time-ordered (48-bit milliseconds,
then 80 random bits, Crockford base 32) and the queue prefix lets every service
find the job's keys without a global index (ADR 0002).
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())
_ULID_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
#: A queue name: 1-64 of A-Z a-z 0-9 _ . - and not only dots, so that no job id looks like a
#: path ("./01M...", "../01M..."). validate.queue_problem says why a name is refused.
QUEUE_RE = re.compile(r"^(?!\.+$)[A-Za-z0-9_.\-]{1,64}$")
_STREAM_ID_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")


class _UlidGenerator:
    """Monotonic ULIDs: within one millisecond the random part counts up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = -1
        self._last_rand = 0

    def new(self) -> str:
        return self.many(1)[0]

    def many(self, n: int) -> list[str]:
        """``n`` ULIDs in increasing order: one clock read, one lock and one encoding for all."""
        with self._lock:
            ms = time.time_ns() // 1_000_000
            if ms <= self._last_ms:
                ms = self._last_ms
                rand = self._last_rand + 1
            else:
                # One bit short of 80, so counting up within a millisecond cannot overflow in practice.
                rand = int.from_bytes(os.urandom(10), "big") >> 1
            if rand + n > 1 << 80:  # 2^80 ids in one millisecond: borrow the next one
                ms, rand = ms + 1, int.from_bytes(os.urandom(10), "big") >> 1
            self._last_ms, self._last_rand = ms, rand + n - 1
        base = (ms << 80) | rand
        low = base & _LOW_MASK
        if low + n <= _LOW_MASK + 1:
            # Counting up within the last four characters (20 bits): every id shares the first
            # 22, so they are encoded once and each id is two lookups of a 10-bit pair.
            # base64.b32encode is pure Python here and cost 1.6 µs per id (issue 13).
            head = _encode(base)[:22]
            return [head + _PAIRS[(v := low + i) >> 10] + _PAIRS[v & 1023] for i in range(n)]
        return [_encode(base + i) for i in range(n)]


def _encode(value: int) -> str:
    """A 130-bit value as 26 Crockford characters: the last 26 of 20 bytes' (32 characters') base 32."""
    return base64.b32encode(value.to_bytes(20, "big")).translate(_TO_CROCKFORD).decode()[6:]


_LOW_MASK = (1 << 20) - 1
#: Every 10-bit value as its two Crockford characters.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


_generator = _UlidGenerator()


def new_ulid() -> str:
    """A new time-ordered ULID."""
    return _generator.new()


def new_ulids(n: int) -> list[str]:
    """``n`` new time-ordered ULIDs, in order (a batch's ids: per batch, not per job)."""
    return _generator.many(n) if n else []


def make_job_id(queue: str, ulid: str) -> str:
    """The public id of a job."""
    return f"{queue}/{ulid}"


def parse_job_id(job_id: str) -> tuple[str, str] | None:
    """Split a job id into (queue, ulid), or None when it is not one of ours."""
    queue, sep, ulid = job_id.rpartition("/")
    if not sep or not QUEUE_RE.match(queue) or not _ULID_RE.match(ulid):
        return None
    return queue, ulid


# Crockford digits to the digits int(..., 32) reads; anything else to a character it refuses.
_TO_BASE32 = {c: "!" for c in range(128)}
_TO_BASE32.update({ord(c): "0123456789abcdefghijklmnopqrstuv"[i] for i, c in enumerate(_ALPHABET)})


def ulid_time_ms(ulid: str) -> int:
    """Milliseconds since the epoch encoded in a ULID (ValueError when it is not one)."""
    head = ulid[:10]
    if len(head) != 10 or not head.isascii():  # int() would read other scripts' digits
        raise ValueError(f"not a ULID: {ulid!r}")
    # One translation and one C parse: the results service derives this for every job row.
    return int(head.translate(_TO_BASE32), 32)


def parse_stream_id(value: str) -> tuple[int, int] | None:
    """``"<ms>-<seq>"`` as a comparable tuple, or None if malformed."""
    m = _STREAM_ID_RE.match(value)
    if not m:
        return None
    ms, seq = int(m.group(1)), int(m.group(2))
    if ms >= 1 << 64 or seq >= 1 << 64:
        return None
    return ms, seq


def stream_id_key(value: str | bytes) -> tuple[int, int]:
    """Sort key of a stream id that Redis produced (trusted input)."""
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
