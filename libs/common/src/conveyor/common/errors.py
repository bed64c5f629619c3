"""Errors meant for clients. Each subclass picks its gRPC status code.

Services raise these; the ErrorMapping interceptor is the only place that turns
them into a status (with google.rpc details). client.py reverses the mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2


class ConveyorError(Exception):
    """An error meant for the client; the subclass picks the gRPC code."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    by_code: ClassVar[dict[grpc.StatusCode, type[ConveyorError]]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        ConveyorError.by_code.setdefault(cls.code, cls)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[Message]:
        """google.rpc detail messages sent with the status."""
        return []


class InvalidArgument(ConveyorError):
    """A request field is missing or malformed."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Mapping[str, str]) -> None:
        super().__init__("; ".join(f"{f}: {why}" for f, why in violations.items()))
        self.violations = dict(violations)

    def details(self) -> list[Message]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.violations.items()
                ]
            )
        ]


class NotFound(ConveyorError):
    """The named job (or other resource) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ConveyorError):
    """The request is valid but the job's state does not allow it."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, subject: str = "", kind: str = "STATE") -> None:
        super().__init__(message)
        self.subject = subject
        self.kind = kind

    def details(self) -> list[Message]:
        if not self.subject:
            return []
        return [
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type=self.kind, subject=self.subject, description=self.message
                    )
                ]
            )
        ]


class ResourceExhausted(ConveyorError):
    """A payload, batch or buffer is over its limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ConveyorError):
    """A backing store (Redis, PostgreSQL, the results service) cannot be reached; retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Internal(ConveyorError):
    """A bug or an unexpected state; details are in the server log."""

    code = grpc.StatusCode.INTERNAL


class Unimplemented(ConveyorError):
    """The request asks for a feature this version does not have yet."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(ConveyorError):
    """No token, a malformed one, or one the server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ConveyorError):
    """The caller's token is known but its role (or its queues) does not allow the call."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, reason: str = "", metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[Message]:
        if not self.reason:
            return []
        return [error_details_pb2.ErrorInfo(reason=self.reason, domain="conveyor", metadata=self.metadata)]
