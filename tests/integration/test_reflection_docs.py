"""Server reflection serves the contract with its comments (issue #5 item 8: `grpcurl describe` shows them)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.integration.conftest import Producer


def _file_of(addr: str, symbol: str) -> descriptor_pb2.FileDescriptorProto:
    with grpc.insecure_channel(addr) as channel:
        return ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol(symbol)


def _comment(file: object, path: list[int]) -> str:
    for location in file.source_code_info.location:  # type: ignore[attr-defined]
        if list(location.path) == path:
            return str(location.leading_comments)
    return ""


@pytest.mark.parametrize(
    ("symbol", "rpc", "words"),
    [
        ("conveyor.v1.AdminService", "SetRateLimit", "at most N starts per period"),
        ("conveyor.v1.AdminService", "GetQueueStats", "one instant"),
        ("conveyor.v1.ProducerService", "WatchQueue", "every event"),
        ("conveyor.v1.ProducerService", "Enqueue", ""),
    ],
)
async def test_reflection_describes_rpcs_with_their_comments(
    producer: Producer, symbol: str, rpc: str, words: str
) -> None:
    # The reflection client is synchronous: run it off the loop that serves the producer.
    file = await asyncio.to_thread(_file_of, producer.addr, symbol)
    service_index = next(i for i, s in enumerate(file.service) if f"{file.package}.{s.name}" == symbol)
    method_index = next(i for i, m in enumerate(file.service[service_index].method) if m.name == rpc)
    # FileDescriptorProto.service = 6, ServiceDescriptorProto.method = 2
    comment = _comment(file, [6, service_index, 2, method_index])
    assert comment.strip(), f"{symbol}/{rpc} has no comment over reflection"
    assert words.lower() in " ".join(comment.split()).lower()


@pytest.mark.parametrize("symbol", ["google.rpc.BadRequest", "google.rpc.PreconditionFailure", "google.rpc.Status"])
async def test_reflection_serves_the_error_details_so_clients_print_their_fields(
    producer: Producer, symbol: str
) -> None:
    file = await asyncio.to_thread(_file_of, producer.addr, symbol)
    assert file.package == "google.rpc"
    assert symbol.rsplit(".", 1)[1] in [m.name for m in file.message_type]
