from pathlib import Path

import pytest

from conveyor.common.settings import ProducerSettings, SettingsError, WorkerSettings


def test_defaults_match_make_up() -> None:
    s = ProducerSettings.from_env({})
    assert s.redis_url == "redis://127.0.0.1:56379/0"
    assert s.grpc_addr == "127.0.0.1:50051"


def test_worker_reads_lists_and_numbers() -> None:
    s = WorkerSettings.from_env({"CONVEYOR_QUEUES": "a, b", "CONVEYOR_CONCURRENCY": "7", "REDIS_URL": "redis://x:1/0"})
    assert s.queues == ("a", "b")
    assert s.concurrency == 7
    assert s.redis_url == "redis://x:1/0"


def test_visibility_timeouts_can_differ_per_queue() -> None:
    s = WorkerSettings.from_env({"CONVEYOR_VISIBILITY_TIMEOUTS": "reports=600, emails=45.5"})
    assert s.visibility_for("reports") == 600 and s.visibility_for("emails") == 45.5
    assert s.visibility_for("default") == 30.0


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"CONVEYOR_CONCURRENCY": "many"}, "CONVEYOR_CONCURRENCY"),
        ({"CONVEYOR_CONCURRENCY": "0"}, "CONVEYOR_CONCURRENCY"),
        ({"CONVEYOR_LOG_FORMAT": "xml"}, "CONVEYOR_LOG_FORMAT"),
        ({"CONVEYOR_VISIBILITY_TIMEOUTS": "reports"}, "CONVEYOR_VISIBILITY_TIMEOUTS"),
        ({"CONVEYOR_VISIBILITY_TIMEOUTS": "reports=0"}, "CONVEYOR_VISIBILITY_TIMEOUTS"),
        ({"CONVEYOR_VISIBILITY_TIMEOUTS": "..=60"}, "CONVEYOR_VISIBILITY_TIMEOUTS"),
        ({"CONVEYOR_QUEUES": "default,.."}, "CONVEYOR_QUEUES"),
        ({"CONVEYOR_QUEUES": "."}, "CONVEYOR_QUEUES"),
        ({"CONVEYOR_QUEUES": "bad queue"}, "CONVEYOR_QUEUES"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        WorkerSettings.from_env(env)


def test_the_worker_registry_ttl() -> None:
    assert WorkerSettings.from_env({}).worker_ttl_s == 10.0
    assert WorkerSettings.from_env({"CONVEYOR_WORKER_TTL_SECONDS": "2.5"}).worker_ttl_s == 2.5
    with pytest.raises(SettingsError, match="CONVEYOR_WORKER_TTL_SECONDS"):
        WorkerSettings.from_env({"CONVEYOR_WORKER_TTL_SECONDS": "0.1"})


def test_the_scheduler_loop_is_on_by_default_and_can_be_switched_off() -> None:
    assert WorkerSettings.from_env({}).scheduler
    assert not WorkerSettings.from_env({"CONVEYOR_SCHEDULER": "0"}).scheduler
    assert not WorkerSettings.from_env({"CONVEYOR_SCHEDULER": "off"}).scheduler
    assert WorkerSettings.from_env({"CONVEYOR_SCHEDULER": "true"}).scheduler
    with pytest.raises(SettingsError, match="CONVEYOR_SCHEDULER"):
        WorkerSettings.from_env({"CONVEYOR_SCHEDULER": "maybe"})


def test_the_presented_token_may_come_from_a_mounted_file(tmp_path: Path) -> None:
    mounted = tmp_path / "services.token"
    mounted.write_text("cvy_mounted\n")
    assert ProducerSettings.from_env({"CONVEYOR_TOKEN_FILE": str(mounted)}).token == "cvy_mounted"
    with pytest.raises(SettingsError, match="CONVEYOR_TOKEN_FILE"):
        ProducerSettings.from_env({"CONVEYOR_TOKEN_FILE": str(tmp_path / "missing")})


def test_members_of_a_producer_group_share_the_grpc_port_but_not_the_metrics_port() -> None:
    alone = ProducerSettings.from_env({"CONVEYOR_GRPC_ADDR": "0.0.0.0:50051", "CONVEYOR_PRODUCER_PROCESSES": "2"})
    assert (alone.processes, alone.process_index, alone.metrics_addr) == (2, -1, "0.0.0.0:51051")
    member = ProducerSettings.from_env({"CONVEYOR_GRPC_ADDR": "0.0.0.0:50051", "CONVEYOR_PROCESS_INDEX": "2"})
    assert (member.grpc_addr, member.metrics_addr) == ("0.0.0.0:50051", "0.0.0.0:51251")
    off = ProducerSettings.from_env({"CONVEYOR_METRICS_ADDR": "off", "CONVEYOR_PROCESS_INDEX": "1"})
    assert off.metrics_addr == "off"
    with pytest.raises(SettingsError, match="CONVEYOR_PRODUCER_PROCESSES"):
        ProducerSettings.from_env({"CONVEYOR_PRODUCER_PROCESSES": "0"})
