"""Cluster URLs (redis+cluster://) and grouping keys per hash slot, without a server."""

from __future__ import annotations

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from conveyor.common import faults
from conveyor.common.keys import LEGACY_QUEUES_TOUCHED, QUEUES, QUEUES_TOUCHED, queue_keys
from conveyor.common.redis import RedisConfigError, by_slot, cluster_config, is_cluster_url, make_redis, redacted


def test_cluster_url_names_its_seed_nodes_and_credentials() -> None:
    nodes, options = cluster_config("redis+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001")
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert options == {"username": "app", "password": "s@cret"}
    nodes, options = cluster_config("rediss+cluster://:pw@[::1]:7000/0?ssl_ca_certs=/ca.pem")
    assert nodes == [("::1", 7000)]
    assert options == {"password": "pw", "ssl": True, "ssl_ca_certs": "/ca.pem"}
    assert is_cluster_url("REDIS+CLUSTER://h:1") and not is_cluster_url("redis://h:1/0")


@pytest.mark.parametrize(
    "url", ["redis+cluster://h:7000/3", "redis+cluster://h", "redis+cluster://h:x", "redis+cluster://"]
)
def test_bad_cluster_urls_are_refused_with_the_reason(url: str) -> None:
    with pytest.raises(RedisConfigError, match=r"database|host:port"):
        cluster_config(url)


def test_cluster_url_password_is_redacted() -> None:
    assert redacted("redis+cluster://app:secret@h1:7000,h2:7000") == "redis+cluster://app:***@h1:7000,h2:7000"
    assert "secret" not in redacted("redis+cluster://secret@h1:7000")


async def test_cluster_url_makes_a_cluster_client_and_keys_group_per_slot() -> None:
    client = make_redis("redis+cluster://127.0.0.1:1,127.0.0.1:2")
    assert isinstance(client, RedisCluster)
    a, b = queue_keys("a"), queue_keys("b")
    groups = by_slot(client, [a.events, b.events, a.signal])
    assert groups == [[a.events, a.signal], [b.events]]
    single = make_redis("redis://127.0.0.1:1/0")
    assert by_slot(single, [a.events, b.events]) == [[a.events, b.events]]
    await single.aclose()


def test_registry_keys_share_one_slot() -> None:
    # The touched zset's tag hashes as the untagged registry set does: one script can write both.
    assert key_slot(QUEUES.encode()) == key_slot(QUEUES_TOUCHED.encode())
    assert LEGACY_QUEUES_TOUCHED != QUEUES_TOUCHED


def test_cluster_client_faults_are_transient() -> None:
    from redis.exceptions import RedisClusterException, SlotNotCoveredError

    assert faults.redis_fault(SlotNotCoveredError("Slot 1 is not covered")) is faults.CLUSTERDOWN
    assert faults.redis_fault(RedisClusterException("Redis Cluster cannot be connected. ...")) is faults.CONNECTION
    assert faults.redis_fault(RedisClusterException("all keys must map to the same key slot")) is None


def test_errors_raised_inside_redis_connection_code_are_connection_faults() -> None:
    # What a command in flight meets when redis-py's cluster client closes its connections.
    namespace: dict[str, object] = {}
    code = compile(
        "def send():\n    raise RuntimeError('the handler is closed')\n", "/x/redis/asyncio/connection.py", "exec"
    )
    exec(code, namespace)
    try:
        namespace["send"]()  # type: ignore[operator]
    except RuntimeError as exc:
        assert faults.redis_fault(exc) is faults.CONNECTION
    assert faults.redis_fault(RuntimeError("a bug of ours")) is None
