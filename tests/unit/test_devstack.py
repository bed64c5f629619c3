"""The private servers behind the fixtures and `make up`: they start, answer, and keep data across restarts."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest
import redis
import redis.asyncio

from conveyor.common.devstack.servers import PostgresServer, RedisServer


def test_redis_server_answers_ping() -> None:
    with RedisServer() as server, redis.Redis.from_url(server.url) as client:
        assert client.ping()
        assert server.url == f"redis://127.0.0.1:{server.port}/0"


def test_redis_restart_keeps_aof_written_key() -> None:
    with RedisServer() as server:
        with redis.Redis.from_url(server.url) as client:
            client.xadd(b"stream", {b"k": b"v"})
        server.restart()
        with redis.Redis.from_url(server.url) as client:
            assert client.xlen(b"stream") == 1
        assert (server.data_dir / "appendonlydir").is_dir()


def test_redis_kill_and_restart_keeps_data() -> None:
    with RedisServer() as server:
        with redis.Redis.from_url(server.url) as client:
            client.set(b"key", b"value")
        server.kill()
        assert not server.running
        server.restart()
        with redis.Redis.from_url(server.url) as client:
            assert client.get(b"key") == b"value"


def test_redis_start_on_a_busy_port_fails_clearly(redis_server: RedisServer) -> None:
    with pytest.raises(RuntimeError, match="already in use"), RedisServer(port=redis_server.port):
        pass


def test_postgres_server_accepts_psycopg_connection() -> None:
    with PostgresServer(settings={"fsync": "off"}) as server, psycopg.connect(server.url) as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
        assert row == ("conveyor", "conveyor")


def _create_table(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY)")
        conn.execute("INSERT INTO kept VALUES (1)")


def _kept(url: str) -> list[tuple[int]]:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT id FROM kept").fetchall()


def test_postgres_restart_keeps_table() -> None:
    with PostgresServer() as server:
        _create_table(server.url)
        server.restart()
        assert _kept(server.url) == [(1,)]


def test_postgres_kill_and_restart_keeps_committed_rows() -> None:
    with PostgresServer() as server:
        _create_table(server.url)
        server.kill()
        server.restart()  # crash recovery replays the WAL
        assert _kept(server.url) == [(1,)]


def test_postgres_reuses_an_initialised_data_dir() -> None:
    # `make up` keeps its data between runs by giving a new server the same data_dir.
    with PostgresServer() as first:
        _create_table(first.url)
        first.stop()
        with PostgresServer(data_dir=first.data_dir) as second:
            assert _kept(second.url) == [(1,)]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_postgres_data_dir_the_postgres_user_cannot_reach_fails_clearly(tmp_path: Path) -> None:
    # pytest's tmp_path lives in a root-only (0700) directory.
    with pytest.raises(RuntimeError, match="cannot reach"), PostgresServer(data_dir=tmp_path / "pg"):
        pass


async def test_redis_client_fixture_starts_empty(redis_client: redis.asyncio.Redis) -> None:
    assert await redis_client.dbsize() == 0
    await redis_client.set(b"left", b"behind")  # the next test using the fixture must not see it


async def test_redis_client_fixture_flushes_between_tests(redis_client: redis.asyncio.Redis) -> None:
    assert await redis_client.get(b"left") is None


def test_database_url_fixture_connects(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
