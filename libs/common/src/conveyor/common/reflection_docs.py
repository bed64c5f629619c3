"""Server reflection that serves the contract with its comments.

grpcio-reflection rebuilds each file it serves from a descriptor pool (``CopyToProto``),
which drops ``source_code_info``, and generated modules carry no comments anyway. So this
servicer answers file requests with the FileDescriptorProtos of the descriptor set that
``make proto`` writes beside the stubs (``protoc --include_source_info``), and ``grpcurl
describe`` shows the documentation of every RPC, message and field.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import _async, reflection_pb2, reflection_pb2_grpc

DESCRIPTORS = "descriptors.binpb"


@functools.cache
def documented_files() -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with comments, for the contract and its imports."""
    files = descriptor_pb2.FileDescriptorSet.FromString((resources.files("conveyor.v1") / DESCRIPTORS).read_bytes())
    return {f.name: f.SerializeToString() for f in files.file}


@functools.cache
def documented_pool() -> descriptor_pool.DescriptorPool:
    """A pool of the contract (plus health, reflection and the google.rpc error details), to look symbols up in.

    The error details (BadRequest, PreconditionFailure) travel packed in Any in a failed call's
    status; grpcurl and buf curl look their type up by reflection to print their fields rather
    than base64.
    """
    pool = descriptor_pool.DescriptorPool()
    files = documented_files()
    for serialized in files.values():  # dependencies come first (protoc --include_imports)
        pool.AddSerializedFile(serialized)
    for module in (health_pb2, reflection_pb2, status_pb2, error_details_pb2):
        for dependency in module.DESCRIPTOR.dependencies:
            if dependency.name not in files:
                pool.AddSerializedFile(dependency.serialized_pb)
        if module.DESCRIPTOR.name not in files:
            pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


def _with_dependencies(file: Any, seen: dict[str, Any]) -> dict[str, Any]:
    seen[file.name] = file
    for dependency in file.dependencies:
        if dependency.name not in seen:
            _with_dependencies(dependency, seen)
    return seen


def _not_found(request: Any) -> reflection_pb2.ServerReflectionResponse:
    return reflection_pb2.ServerReflectionResponse(
        error_response=reflection_pb2.ErrorResponse(
            error_code=grpc.StatusCode.NOT_FOUND.value[0], error_message=grpc.StatusCode.NOT_FOUND.value[1]
        ),
        original_request=request,
    )


class DocumentedReflectionServicer(_async.ReflectionServicer):
    """grpc.reflection.v1alpha with the contract's comments."""

    def __init__(self, service_names: list[str], pool: descriptor_pool.DescriptorPool) -> None:
        super().__init__(service_names, pool=pool)
        self._documented = pool

    def _respond(self, request: Any, file: Any) -> reflection_pb2.ServerReflectionResponse:
        docs = documented_files()
        protos = []
        for name, descriptor in _with_dependencies(file, {}).items():
            if name in docs:
                protos.append(docs[name])
            else:
                proto = descriptor_pb2.FileDescriptorProto()
                descriptor.CopyToProto(proto)
                protos.append(proto.SerializeToString())
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(file_descriptor_proto=protos),
            original_request=request,
        )

    def _file_by_filename(self, request: Any, filename: str) -> reflection_pb2.ServerReflectionResponse:
        try:
            return self._respond(request, self._documented.FindFileByName(filename))
        except KeyError:
            return _not_found(request)

    def _file_containing_symbol(self, request: Any, name: str) -> reflection_pb2.ServerReflectionResponse:
        try:
            return self._respond(request, self._documented.FindFileContainingSymbol(name))
        except KeyError:
            return _not_found(request)


def enable(service_names: list[str], server: Any) -> None:
    """Serve reflection for ``service_names`` on ``server`` (a grpc.aio server)."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        DocumentedReflectionServicer(service_names, documented_pool()), server
    )
