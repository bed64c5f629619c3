"""Redis over TLS (rediss://, ACL user and password, client certificate) and PostgreSQL with
sslmode=verify-full, through the URLs the services read, against private servers serving TLS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
import redis as sync_redis
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor.common.devstack.servers import PostgresServer
from conveyor.common.redis import connect_redis, redacted
from conveyor.results.store import Store, open_pool
from tests.support.certs import CertificateAuthority
from tests.support.tls_servers import REDIS_PASSWORD, TlsFiles, TlsRedis, tls_postgres


@pytest.fixture(scope="module")
def tls_redis() -> Iterator[TlsRedis]:
    with TlsRedis(TlsFiles.make()) as server:
        yield server


async def test_a_rediss_url_with_acl_user_password_and_client_certificate_works(tls_redis: TlsRedis) -> None:
    url = tls_redis.url()
    client = await connect_redis(url)  # the services' own start-up check (INFO: eviction policy, version)
    try:
        assert await client.execute_command("ACL", "WHOAMI") == b"conveyor"
        await client.xadd("{q}:tls", {"f": "v"})
        assert await client.xlen("{q}:tls") == 1
    finally:
        await client.aclose()
    # The synchronous clients (heartbeat thread, metrics collector) read the same URL.
    sync = sync_redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
    try:
        assert sync.xlen("{q}:tls") == 1
    finally:
        sync.close()
    assert REDIS_PASSWORD not in redacted(url) and quote(REDIS_PASSWORD, safe="") not in redacted(url)


async def test_tls_redis_refuses_a_wrong_password(tls_redis: TlsRedis) -> None:
    with pytest.raises(AuthenticationError):
        await connect_redis(tls_redis.url(password="wrong"))


async def test_tls_redis_refuses_a_client_without_a_certificate(tls_redis: TlsRedis) -> None:
    with pytest.raises((RedisConnectionError, OSError)):
        await connect_redis(tls_redis.url(client_cert=False))


async def test_tls_redis_refuses_plaintext(tls_redis: TlsRedis) -> None:
    plain = tls_redis.url().replace("rediss://", "redis://", 1).split("?", 1)[0]
    with pytest.raises((RedisConnectionError, OSError)):
        await connect_redis(plain)


async def test_a_client_trusting_another_ca_refuses_tls_redis(tls_redis: TlsRedis, tmp_path: Path) -> None:
    other = CertificateAuthority("other CA").write(tmp_path)
    url = tls_redis.url().replace(
        f"ssl_ca_certs={quote(str(tls_redis.files.ca_file), safe='')}", f"ssl_ca_certs={other}"
    )
    assert str(other) in url
    with pytest.raises((RedisConnectionError, OSError)):
        await connect_redis(url)


@pytest.fixture(scope="module")
def tls_pg() -> Iterator[tuple[PostgresServer, TlsFiles]]:
    with tls_postgres() as server_and_files:
        yield server_and_files


def _verify_full(server: PostgresServer, ca_file: Path, host: str = "127.0.0.1") -> str:
    return f"postgresql://conveyor@{host}:{server.port}/conveyor?sslmode=verify-full&sslrootcert={ca_file}"


async def test_postgres_sslmode_verify_full_works_for_the_results_store(
    tls_pg: tuple[PostgresServer, TlsFiles],
) -> None:
    server, files = tls_pg
    url = _verify_full(server, files.ca_file)
    pool = await open_pool(url, 2)
    try:
        await Store(pool).migrate()
        async with pool.connection() as conn:
            row = await (await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).fetchone()
            assert row == (True,)
    finally:
        await pool.close()
    # By name too: the certificate carries localhost as well as 127.0.0.1.
    with psycopg.connect(_verify_full(server, files.ca_file, "localhost")) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


def test_postgres_verify_full_refuses_a_server_signed_by_another_ca(
    tls_pg: tuple[PostgresServer, TlsFiles], tmp_path: Path
) -> None:
    server, _ = tls_pg
    other = CertificateAuthority("other CA").write(tmp_path)
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(_verify_full(server, other), connect_timeout=5)
