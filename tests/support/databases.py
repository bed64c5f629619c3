"""A fresh PostgreSQL database on the session's server, for a module's stack of its own."""

from __future__ import annotations

import uuid

import psycopg

from conveyor.common.devstack.servers import PostgresServer


def fresh_database(pg_server: PostgresServer, prefix: str) -> str:
    """Create an empty database named ``<prefix>_<random>`` and return its URL."""
    database = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    return pg_server.url.rsplit("/", 1)[0] + f"/{database}"
