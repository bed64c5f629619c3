"""When a failed attempt runs again: the job's retry policy turned into a wait."""

from __future__ import annotations

import random

from conveyor.v1 import job_pb2


def retry_delay_ms(policy: job_pb2.RetryPolicy, attempt: int, rand: random.Random | None = None) -> int:
    """How long to wait before the attempt after ``attempt`` (1 = the first run failed).

    Fixed: ``base`` every time. Exponential: ``base * 2^(attempt-1)``. Both at most ``cap``,
    then a random ``jitter`` fraction of the wait is added (spreads a burst of retries).
    """
    base = policy.base.ToMilliseconds()
    cap = policy.cap.ToMilliseconds() or base
    exponential = policy.backoff != job_pb2.BACKOFF_FIXED
    wait = base * 2 ** min(max(attempt - 1, 0), 40) if exponential else base
    wait = min(wait, cap) if cap else wait
    if policy.jitter > 0:
        wait += int(wait * policy.jitter * (rand or random).random())
    return int(wait)


def should_retry(policy: job_pb2.RetryPolicy, attempt: int, retryable: bool) -> bool:
    """Whether a failed ``attempt`` gets another one."""
    return retryable and attempt < max(policy.max_attempts, 1)
