"""OpenTelemetry tracing, off unless the standard ``OTEL_*`` variables switch it on (ADR 0018).

One module for the three services. :func:`configure` reads the environment once at start-up:

- ``OTEL_SDK_DISABLED=true``: off, whatever else is set.
- ``OTEL_TRACES_EXPORTER``: ``otlp`` (OTLP over gRPC; the SDK reads ``OTEL_EXPORTER_OTLP_*``),
  ``console`` (spans as JSON on stdout), ``none``. Unset, tracing is on (``otlp``) only when
  ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set: the SDK's own
  default (``otlp`` to localhost) would make every service try to export by default.
- ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``,
  ``OTEL_BSP_*``: read by the SDK as usual.

While tracing is off, :data:`tracer` is ``None`` and every caller tests that one attribute before
doing anything else: no span object, nothing serialised into a job, no context attached.

The trace context travels inside the stored Job (``Job.traceparent`` / ``Job.tracestate``, W3C
Trace Context), written by the producer only while tracing is on. Span names and attributes
follow the OpenTelemetry messaging conventions (``send {queue}``, ``process {queue}``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from conveyor.common.settings import SettingsError

#: The tracer of this process, or None while tracing is off (the only thing hot paths test).
tracer: Tracer | None = None

SYSTEM = "conveyor"
#: The Redis consumer group every worker reads the job streams with (scripts.py, claim.lua).
CONSUMER_GROUP = "workers"
INSTRUMENTATION = "conveyor"

_propagator = TraceContextTextMapPropagator()
_EXPORTERS = ("otlp", "console", "none")


def wanted(env: Mapping[str, str] | None = None) -> str:
    """The exporter the environment asks for: "otlp", "console", or "" for tracing off."""
    e = os.environ if env is None else env
    if e.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ""
    raw = e.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        endpoint = e.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or e.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return "otlp" if endpoint else ""
    names = [n.strip() for n in raw.split(",") if n.strip()]
    for name in names:
        if name not in _EXPORTERS:
            raise SettingsError(
                f"OTEL_TRACES_EXPORTER={raw!r}: Conveyor supports {', '.join(_EXPORTERS)} "
                "(otlp sends OTLP over gRPC to OTEL_EXPORTER_OTLP_ENDPOINT)"
            )
    if len(names) != 1:
        raise SettingsError(f"OTEL_TRACES_EXPORTER={raw!r}: name one exporter")
    return "" if names[0] == "none" else names[0]


def configure(service: str, env: Mapping[str, str] | None = None) -> bool:
    """Switch tracing on for this process when the environment asks for it; True if on.

    ``service`` is the default ``service.name`` ("conveyor-producer"...); ``OTEL_SERVICE_NAME``
    wins over it. The provider flushes its spans when the process exits.
    """
    exporter_name = wanted(env)
    if not exporter_name:
        return False
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    e = os.environ if env is None else env
    attributes: dict[str, Any] = {}
    detected = OTELResourceDetector().detect().attributes
    if not e.get("OTEL_SERVICE_NAME") and "service.name" not in detected:
        attributes["service.name"] = service
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider)
    structlog.get_logger("conveyor.tracing").info(
        "tracing_on", exporter=exporter_name, service=provider.resource.attributes.get("service.name")
    )
    return True


def install(provider: trace.TracerProvider | None) -> None:
    """Trace with ``provider`` from now on (None: off). Tests install one with an in-memory exporter."""
    global tracer
    if provider is None:
        tracer = None
        return
    tracer = provider.get_tracer(INSTRUMENTATION)
    # Handlers call opentelemetry.trace.get_tracer(...): give them the same provider. The API lets
    # the global provider be set once per process; a test installing a second keeps the first.
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)


# -- context in and out of jobs and RPCs -----------------------------------------------------


def context_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> otel_context.Context:
    """The caller's W3C trace context from incoming gRPC metadata (empty Context when none)."""
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if key in ("traceparent", "tracestate") and isinstance(value, str):
            carrier[key] = value
    return _propagator.extract(carrier) if carrier else otel_context.Context()


def job_context(traceparent: str, tracestate: str = "") -> otel_context.Context | None:
    """The creation context a stored job carries, or None (none stored, or not a valid one)."""
    if not traceparent:
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    ctx = _propagator.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def stored_context(span: Span) -> tuple[str, str]:
    """(traceparent, tracestate) to store in a job created under ``span``."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" when there is none)."""
    span = trace.get_current_span()
    return stored_context(span)[0] if span.get_span_context().is_valid else ""


def links_to(ctx: otel_context.Context | None) -> list[Link]:
    """A link to the span of ``ctx`` (the messaging conventions link a process span to its creation)."""
    if ctx is None:
        return []
    return [Link(trace.get_current_span(ctx).get_span_context())]


def messaging_attributes(queue: str, operation: str, job_id: str = "") -> dict[str, Any]:
    """The messaging semantic-convention attributes of a span about a job of ``queue``."""
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.destination.name": queue,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }
    if job_id:
        attributes["messaging.message.id"] = job_id
    return attributes


def fail(span: Span, kind: str, message: str) -> None:
    """Mark ``span`` failed the way record_exception would, from an error we only have as text."""
    span.add_event("exception", {"exception.type": kind, "exception.message": message})
    span.set_status(Status(StatusCode.ERROR, f"{kind}: {message}" if message else kind))


def end_all(spans: Iterable[Span], error: BaseException | None = None) -> None:
    for span in spans:
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()


__all__ = [
    "CONSUMER_GROUP",
    "SYSTEM",
    "Link",
    "Span",
    "SpanKind",
    "Status",
    "StatusCode",
    "Tracer",
    "configure",
    "context_from_metadata",
    "current_traceparent",
    "end_all",
    "fail",
    "install",
    "job_context",
    "links_to",
    "messaging_attributes",
    "stored_context",
    "tracer",
    "wanted",
]
