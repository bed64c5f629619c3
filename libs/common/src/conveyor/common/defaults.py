"""The retry policy of a job that names none.

It lives here rather than in the producer because Redis stores a job's policy only when it
differs from this one (ADR 0010): every service that reads a stored Job (the worker's retry
decision, the producer's GetJob, Watch and dead letters, the results projection) fills it in.
It is therefore part of the stored format: changing a value here changes the policy of every
job already stored without one, so a release that changes it must keep the old value for them.
"""

from __future__ import annotations

from conveyor.v1 import job_pb2

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BACKOFF_BASE_MS = 1000
DEFAULT_BACKOFF_CAP_MS = 300_000
DEFAULT_JITTER = 0.1


def fill_retry_defaults(retry: job_pb2.RetryPolicy) -> job_pb2.RetryPolicy:
    """``retry`` with max_attempts, backoff, base and cap filled in where zero (a jitter of 0 is kept: no jitter)."""
    if not retry.max_attempts:
        retry.max_attempts = DEFAULT_MAX_ATTEMPTS
    if not retry.backoff:
        retry.backoff = job_pb2.BACKOFF_EXPONENTIAL
    if not retry.HasField("base") or not (retry.base.seconds or retry.base.nanos):
        retry.base.FromMilliseconds(DEFAULT_BACKOFF_BASE_MS)
    if not retry.HasField("cap") or not (retry.cap.seconds or retry.cap.nanos):
        retry.cap.FromMilliseconds(DEFAULT_BACKOFF_CAP_MS)
    return retry


#: The policy of a job that names none (shared: never modify it).
DEFAULT_RETRY = fill_retry_defaults(job_pb2.RetryPolicy(jitter=DEFAULT_JITTER))


def retry_policy(job: job_pb2.Job) -> job_pb2.RetryPolicy:
    """The policy in force for a stored ``job`` (DEFAULT_RETRY itself when it has none: read it, never modify it)."""
    return job.retry if job.HasField("retry") else DEFAULT_RETRY
