"""Token files, roles and the queues a request names (conveyor.common.auth), without a server."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from conveyor.common import auth
from conveyor.common.auth import ACCESS, Authorizer, Role, TokenFile, TokenFileError, parse_tokens, queues_named
from conveyor.common.errors import PermissionDenied, Unauthenticated
from conveyor.common.ids import new_ulid
from conveyor.v1 import (
    admin_service_pb2,
    limits_pb2,
    producer_service_pb2,
    results_service_pb2,
    schedule_service_pb2,
)

SERVICES = (
    producer_service_pb2.DESCRIPTOR.services_by_name["ProducerService"],
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
    results_service_pb2.DESCRIPTOR.services_by_name["ResultsService"],
    schedule_service_pb2.DESCRIPTOR.services_by_name["ScheduleService"],
)

ULID = new_ulid()


def _file(tmp_path: Path, *entries: str) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text("".join(entries))
    return path


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Authorizer, dict[str, str]]:
    secrets = {name: auth.new_token() for name in ("admin", "producer", "reader", "billing")}
    path = _file(
        tmp_path,
        auth.entry_for(secrets["admin"], "ops", Role.ADMIN),
        auth.entry_for(secrets["producer"], "svc", Role.PRODUCER),
        auth.entry_for(secrets["reader"], "viewer", Role.READER),
        auth.entry_for(secrets["billing"], "billing", Role.PRODUCER, ["invoices", "receipts"]),
    )
    authorizer = Authorizer.from_path(str(path))
    assert authorizer is not None
    return authorizer, secrets


def test_every_rpc_has_a_decided_access_rule() -> None:
    # A method missing from ACCESS is admin-only; this makes adding an RPC a decision about who may call it.
    methods = {f"/{service.full_name}/{method.name}" for service in SERVICES for method in service.methods}
    assert methods - set(ACCESS) == set(), "add the new RPCs to conveyor.common.auth.ACCESS"
    assert set(ACCESS) - methods == set(), "ACCESS names RPCs that no longer exist"


def test_roles_allow_what_the_readme_says(tokens: tuple[Authorizer, dict[str, str]]) -> None:
    authorizer, secrets = tokens
    enqueue = "/conveyor.v1.ProducerService/Enqueue"
    request = producer_service_pb2.EnqueueRequest(queue="q", type="t")
    assert authorizer.check(enqueue, request, _bearer(secrets["producer"])).name == "svc"  # type: ignore[union-attr]
    assert authorizer.check(enqueue, request, _bearer(secrets["admin"])).name == "ops"  # type: ignore[union-attr]
    with pytest.raises(PermissionDenied, match=r"token 'viewer' has role reader; Enqueue needs admin or producer"):
        authorizer.check(enqueue, request, _bearer(secrets["reader"]))

    list_jobs = "/conveyor.v1.ResultsService/ListJobs"
    assert authorizer.check(list_jobs, results_service_pb2.ListJobsRequest(), _bearer(secrets["reader"]))
    with pytest.raises(PermissionDenied, match="ListJobs needs admin or reader"):
        authorizer.check(list_jobs, results_service_pb2.ListJobsRequest(), _bearer(secrets["producer"]))

    pause = "/conveyor.v1.AdminService/PauseQueue"
    for holder in ("producer", "reader"):
        with pytest.raises(PermissionDenied, match=r"PauseQueue needs admin$") as caught:
            authorizer.check(pause, admin_service_pb2.PauseQueueRequest(queue="q"), _bearer(secrets[holder]))
        (info,) = caught.value.details()
        assert info.reason == "ROLE" and info.metadata["needs"] == "admin"  # type: ignore[attr-defined]


def test_missing_malformed_and_unknown_tokens_are_unauthenticated(tokens: tuple[Authorizer, dict[str, str]]) -> None:
    authorizer, secrets = tokens
    method = "/conveyor.v1.ProducerService/GetJob"
    request = producer_service_pb2.GetJobRequest(job_id="q/" + ULID)
    with pytest.raises(Unauthenticated, match="missing credentials"):
        authorizer.check(method, request, [("x-request-id", "1")])
    with pytest.raises(Unauthenticated, match="expected `Bearer <token>`"):
        authorizer.check(method, request, [("authorization", f"Basic {secrets['admin']}")])
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        authorizer.check(method, request, _bearer(secrets["admin"] + "x"))
    assert Unauthenticated.code is grpc.StatusCode.UNAUTHENTICATED
    assert PermissionDenied.code is grpc.StatusCode.PERMISSION_DENIED


def test_health_and_reflection_need_no_token(tokens: tuple[Authorizer, dict[str, str]]) -> None:
    authorizer, _ = tokens
    assert authorizer.check("/grpc.health.v1.Health/Check", None, []) is None
    assert authorizer.check("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, None) is None


def test_a_method_nobody_listed_is_for_admins_only(tokens: tuple[Authorizer, dict[str, str]]) -> None:
    authorizer, secrets = tokens
    method = "/conveyor.v1.ProducerService/SomethingNew"
    assert authorizer.check(method, None, _bearer(secrets["admin"])) is not None
    with pytest.raises(PermissionDenied, match=r"SomethingNew needs admin$"):
        authorizer.check(method, None, _bearer(secrets["reader"]))


def test_queue_limited_tokens_reach_only_their_queues(tokens: tuple[Authorizer, dict[str, str]]) -> None:
    authorizer, secrets = tokens
    billing = _bearer(secrets["billing"])
    enqueue = "/conveyor.v1.ProducerService/Enqueue"
    assert authorizer.check(enqueue, producer_service_pb2.EnqueueRequest(queue="invoices", type="t"), billing)
    with pytest.raises(
        PermissionDenied, match=r"limited to queues \['invoices', 'receipts'\]; not allowed: \['mail'\]"
    ):
        authorizer.check(enqueue, producer_service_pb2.EnqueueRequest(queue="mail", type="t"), billing)
    # A batch is allowed only if every job in it is.
    batch = producer_service_pb2.EnqueueBatchRequest(
        jobs=[producer_service_pb2.EnqueueRequest(queue="invoices"), producer_service_pb2.EnqueueRequest(queue="mail")]
    )
    with pytest.raises(PermissionDenied, match="not allowed: \\['mail'\\]"):
        authorizer.check("/conveyor.v1.ProducerService/EnqueueBatch", batch, billing)
    # Job ids carry their queue.
    watch = "/conveyor.v1.ProducerService/Watch"
    assert authorizer.check(watch, producer_service_pb2.WatchRequest(job_id="receipts/" + ULID), billing)
    with pytest.raises(PermissionDenied):
        authorizer.check(watch, producer_service_pb2.WatchRequest(job_id="mail/" + ULID), billing)
    # A call that names no queue would cover all of them.
    with pytest.raises(PermissionDenied, match="names no queue"):
        authorizer.check(enqueue, producer_service_pb2.EnqueueRequest(type="t"), billing)


def test_queues_named_reads_queue_fields_and_job_ids_at_any_depth() -> None:
    assert queues_named(limits_pb2.SetRateLimitRequest(queue="a")) == {"a"}
    batch = producer_service_pb2.EnqueueBatchRequest(
        jobs=[
            producer_service_pb2.EnqueueRequest(queue="a", labels={"queue": "x"}),
            producer_service_pb2.EnqueueRequest(queue="b"),
        ]
    )
    assert queues_named(batch) == {"a", "b"}  # labels are a map: "queue" there is user data
    assert queues_named(producer_service_pb2.CancelJobRequest(job_id="c/" + ULID)) == {"c"}
    assert queues_named(admin_service_pb2.ListQueuesRequest()) == set()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("tokens = 3", "array of tables"),
        ("[[tokens]]\nrole = 'admin'\nsha256 = '" + "0" * 64 + "'", "`name` must be"),
        ("[[tokens]]\nname = 'a'\nrole = 'root'\nsha256 = '" + "0" * 64 + "'", "`role` must be one of"),
        ("[[tokens]]\nname = 'a'\nrole = 'admin'\nsha256 = 'abc'", "64 hex digits"),
        ("[[tokens]]\nname = 'a'\nrole = 'admin'\ntoken = 'plain'", "unknown key(s) ['token']"),
        ("[[tokens]]\nname = 'a'\nrole = 'admin'\nsha256 = '" + "0" * 64 + "'\nqueues = 'q'", "`queues` must be"),
        ("[[tokens]\n", "not valid TOML"),
    ],
)
def test_a_wrong_token_file_is_refused_naming_the_entry(text: str, error: str) -> None:
    with pytest.raises(
        TokenFileError, match=error.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")
    ):
        parse_tokens(text, "tokens.toml")


def test_a_duplicate_name_is_refused() -> None:
    entry = auth.entry_for(auth.new_token(), "twice", Role.READER)
    with pytest.raises(TokenFileError, match="'twice' is used twice"):
        parse_tokens(entry + entry)


def test_the_file_holds_digests_only() -> None:
    secret = auth.new_token()
    entry = auth.entry_for(secret, "ci", Role.PRODUCER, ["q"])
    assert secret not in entry
    (token,) = parse_tokens(entry)
    assert token == auth.Token(name="ci", role=Role.PRODUCER, digest=auth.digest_of(secret), queues=frozenset({"q"}))


def test_tokens_are_reloaded_when_the_file_changes_and_a_broken_edit_keeps_the_old_ones(tmp_path: Path) -> None:
    first, second = auth.new_token(), auth.new_token()
    path = _file(tmp_path, auth.entry_for(first, "first", Role.ADMIN))
    authorizer = Authorizer(TokenFile(path, check_every_s=0.0))
    method = "/conveyor.v1.AdminService/ListQueues"
    assert authorizer.check(method, None, _bearer(first))

    path.write_text(auth.entry_for(second, "second", Role.ADMIN))  # first revoked, second added
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert authorizer.check(method, None, _bearer(second)).name == "second"  # type: ignore[union-attr]
    with pytest.raises(Unauthenticated):
        authorizer.check(method, None, _bearer(first))

    path.write_text("[[tokens]\nbroken")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2_000_000))
    assert authorizer.check(method, None, _bearer(second)).name == "second"  # type: ignore[union-attr]


def test_a_missing_file_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read the token file"):
        Authorizer.from_path(str(tmp_path / "nope.toml"))
    assert Authorizer.from_path("") is None


async def test_a_dialled_channel_presents_the_token_on_every_kind_of_call() -> None:
    """Unary and streaming calls alike carry the token (grpc.aio files an interceptor under one kind only)."""
    seen: dict[str, str] = {}

    def note(kind: str, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        seen[kind] = dict(context.invocation_metadata() or ()).get("authorization", "")

    async def unary_unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        note("unary_unary", context)
        return b""

    async def unary_stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        note("unary_stream", context)
        yield b""

    async def stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        note("stream_unary", context)
        return b""

    async def stream_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        note("stream_stream", context)
        yield b""

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "UU": grpc.unary_unary_rpc_method_handler(unary_unary),
            "US": grpc.unary_stream_rpc_method_handler(unary_stream),
            "SU": grpc.stream_unary_rpc_method_handler(stream_unary),
            "SS": grpc.stream_stream_rpc_method_handler(stream_stream),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = auth.dial(f"127.0.0.1:{port}", "cvt_secret")
    try:
        await channel.unary_unary("/test.Echo/UU")(b"")
        async for _ in channel.unary_stream("/test.Echo/US")(b""):
            pass
        await channel.stream_unary("/test.Echo/SU")(iter([b""]))
        async for _ in channel.stream_stream("/test.Echo/SS")(iter([b""])):
            pass
    finally:
        await channel.close()
        await server.stop(None)
    kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
    assert seen == dict.fromkeys(kinds, "Bearer cvt_secret")


def test_the_presented_token_comes_from_the_environment_or_a_mounted_file(tmp_path: Path) -> None:
    assert auth.presented_token({}) == ""
    assert auth.presented_token({"CONVEYOR_TOKEN": "cvy_direct"}) == "cvy_direct"
    mounted = tmp_path / "services.token"
    mounted.write_text("cvy_from_a_secret\n")
    assert auth.presented_token({"CONVEYOR_TOKEN_FILE": str(mounted)}) == "cvy_from_a_secret"


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"CONVEYOR_TOKEN": "cvy_a", "CONVEYOR_TOKEN_FILE": "/x"}, "both set"),
        ({"CONVEYOR_TOKEN_FILE": "/nonexistent/token"}, "cannot read it"),
    ],
)
def test_an_ambiguous_or_unreadable_token_is_refused_with_one_line(env: dict[str, str], error: str) -> None:
    with pytest.raises(TokenFileError, match=error):
        auth.presented_token(env)


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    with pytest.raises(TokenFileError, match="empty"):
        auth.presented_token({"CONVEYOR_TOKEN_FILE": str(empty)})
