"""The producer's bounds as settings: defaults, the derived gRPC message limit, bad values."""

import pytest

from conveyor.common.settings import GRPC_MAX_MESSAGE_BYTES, ProducerSettings, SettingsError, message_limit_for


def test_defaults() -> None:
    s = ProducerSettings.from_env({})
    assert (s.max_watches, s.redis_pool_size, s.watch_redis_pool_size, s.admin_redis_pool_size) == (10_000, 64, 32, 16)
    assert s.max_message_bytes == 0
    # Derived: 1000 jobs of twice a 1 MiB payload plus 16 KiB each, and 1 MiB of slack.
    assert s.message_limit == (2 * (1 << 20) + (16 << 10)) * 1000 + (1 << 20) <= GRPC_MAX_MESSAGE_BYTES


def test_the_message_limit_follows_the_payload_limit_and_batch_size() -> None:
    s = ProducerSettings.from_env({"CONVEYOR_MAX_PAYLOAD_BYTES": "65536", "CONVEYOR_MAX_BATCH": "100"})
    assert s.message_limit == message_limit_for(65536, 100) == (2 * 65536 + 16384) * 100 + (1 << 20)
    assert message_limit_for(1 << 30, 1000) == GRPC_MAX_MESSAGE_BYTES  # never past gRPC's ceiling
    explicit = ProducerSettings.from_env({"CONVEYOR_MAX_MESSAGE_BYTES": "8388608"})
    assert explicit.message_limit == 8 << 20


def test_settings_are_read() -> None:
    s = ProducerSettings.from_env(
        {
            "CONVEYOR_MAX_WATCHES": "5",
            "CONVEYOR_REDIS_POOL_SIZE": "10",
            "CONVEYOR_WATCH_REDIS_POOL_SIZE": "4",
            "CONVEYOR_ADMIN_REDIS_POOL_SIZE": "2",
        }
    )
    assert (s.max_watches, s.redis_pool_size, s.watch_redis_pool_size, s.admin_redis_pool_size) == (5, 10, 4, 2)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"CONVEYOR_MAX_WATCHES": "0"}, "CONVEYOR_MAX_WATCHES"),
        ({"CONVEYOR_MAX_MESSAGE_BYTES": "100"}, "CONVEYOR_MAX_MESSAGE_BYTES"),
        ({"CONVEYOR_MAX_MESSAGE_BYTES": str(1 << 31)}, "CONVEYOR_MAX_MESSAGE_BYTES"),
        ({"CONVEYOR_REDIS_POOL_SIZE": "0"}, "CONVEYOR_REDIS_POOL_SIZE"),
        ({"CONVEYOR_WATCH_REDIS_POOL_SIZE": "x"}, "CONVEYOR_WATCH_REDIS_POOL_SIZE"),
        ({"CONVEYOR_ADMIN_REDIS_POOL_SIZE": "-1"}, "CONVEYOR_ADMIN_REDIS_POOL_SIZE"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        ProducerSettings.from_env(env)
