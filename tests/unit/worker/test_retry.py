import random

from google.protobuf import duration_pb2

from conveyor.v1 import job_pb2
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
