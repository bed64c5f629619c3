import random
import time

from google.protobuf import duration_pb2

from conveyor.common.defaults import DEFAULT_RETRY
from conveyor.v1 import job_pb2
from conveyor.worker.execute import Attempt, run_attempt
from conveyor.worker.handlers import Handlers, JobContext
from conveyor.worker.retry import retry_delay_ms, should_retry


def policy(**kw: object) -> job_pb2.RetryPolicy:
    p = job_pb2.RetryPolicy(
        max_attempts=5,
        backoff=job_pb2.BACKOFF_EXPONENTIAL,
        base=duration_pb2.Duration(seconds=1),
        cap=duration_pb2.Duration(seconds=10),
    )
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def test_exponential_backoff_doubles_up_to_the_cap() -> None:
    assert [retry_delay_ms(policy(), n) for n in range(1, 7)] == [1000, 2000, 4000, 8000, 10000, 10000]


def test_fixed_backoff_waits_the_base_every_time() -> None:
    assert {retry_delay_ms(policy(backoff=job_pb2.BACKOFF_FIXED), n) for n in range(1, 5)} == {1000}


def test_jitter_adds_at_most_its_fraction() -> None:
    rand = random.Random(7)
    waits = [retry_delay_ms(policy(jitter=0.5), 2, rand) for _ in range(200)]
    assert all(2000 <= w <= 3000 for w in waits)
    assert len(set(waits)) > 50


def test_retries_stop_at_max_attempts_or_when_not_retryable() -> None:
    assert should_retry(policy(), 4, True)
    assert not should_retry(policy(), 5, True)
    assert not should_retry(policy(), 1, False)


async def _fail(job: job_pb2.Job, attempt_no: int) -> tuple[int, int]:
    """(new state, wait in ms) after attempt ``attempt_no`` of ``job`` raised a retryable error."""
    handlers = Handlers()

    @handlers.register("t")
    async def boom(payload: dict[str, object], ctx: JobContext) -> None:
        raise RuntimeError("boom")

    async def report(percent: float, message: str) -> None:
        pass

    now_ms = time.time_ns() // 1_000_000
    attempt = Attempt(job=job, job_bytes=job.SerializeToString(), attempt=attempt_no)
    state, _, due_ms = await run_attempt(attempt, handlers, "w1", report)
    return state, due_ms - now_ms if due_ms else 0


async def test_a_job_stored_without_a_policy_is_retried_by_the_default_one() -> None:
    job = job_pb2.Job(id="q/01ARZ3NDEKTSV4RRFFQ69G5FAV", queue="q", type="t", payload_json=b"{}")
    assert not job.HasField("retry")  # how the producer stores the default policy (ADR 0010)
    state, wait_ms = await _fail(job, 1)
    assert state == job_pb2.JOB_STATE_RETRY_SCHEDULED
    assert 1000 <= wait_ms <= 1000 * (1 + DEFAULT_RETRY.jitter) + 50  # base 1 s, jitter 0.1
    state, wait_ms = await _fail(job, 2)
    assert state == job_pb2.JOB_STATE_RETRY_SCHEDULED and 2000 <= wait_ms <= 2250
    assert (await _fail(job, DEFAULT_RETRY.max_attempts))[0] == job_pb2.JOB_STATE_FAILED


async def test_a_job_stored_with_its_own_policy_is_retried_by_it() -> None:
    job = job_pb2.Job(id="q/01ARZ3NDEKTSV4RRFFQ69G5FAV", queue="q", type="t", retry=policy(max_attempts=1))
    assert (await _fail(job, 1))[0] == job_pb2.JOB_STATE_FAILED
    job.retry.CopyFrom(policy(backoff=job_pb2.BACKOFF_FIXED))
    job.retry.base.FromSeconds(7)
    state, wait_ms = await _fail(job, 4)
    assert state == job_pb2.JOB_STATE_RETRY_SCHEDULED and 7000 <= wait_ms <= 7050
