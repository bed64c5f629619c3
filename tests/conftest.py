"""Session fixtures: one private Redis and one private PostgreSQL for the whole run, and clients on them.

Heavy fixtures are never autouse: a test that names none of them opens no server.
Tests marked `slow` are skipped unless CONVEYOR_SLOW=1.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio

from conveyor.common import logs
from conveyor.common.devstack.servers import PostgresServer, RedisServer

# Durability is not under test against the shared server, so trade it for speed.
FAST_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def pytest_configure(config: pytest.Config) -> None:
    # In-process services log as the real ones do (plain tracebacks), not through structlog's
    # default, which renders each traceback with rich at about 0.2 s apiece.
    logs.configure("tests", level="info", fmt="console", cache=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("CONVEYOR_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set CONVEYOR_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(appendonly=True) as server:
        yield server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    with PostgresServer(settings=FAST_PG) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture(scope="session")
def database_url(pg_server: PostgresServer) -> str:
    return pg_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A client on the session Redis, which is emptied (FLUSHALL) before the test."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=False)
    await client.flushall()
    yield client
    await client.aclose()
