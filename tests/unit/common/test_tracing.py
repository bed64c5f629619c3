"""conveyor.common.tracing: which OTEL_* settings switch tracing on, and the context helpers."""

from __future__ import annotations

import pytest
from opentelemetry import trace

from conveyor.common import tracing
from conveyor.common.settings import SettingsError


@pytest.mark.parametrize(
    ("env", "exporter"),
    [
        ({}, ""),  # off by default, although the SDK's own default exporter is otlp
        ({"OTEL_SERVICE_NAME": "x"}, ""),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": " OTLP "}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ""),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, ""),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "TRUE"}, ""),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, "otlp"),
    ],
)
def test_the_standard_variables_switch_tracing_on(env: dict[str, str], exporter: str) -> None:
    assert tracing.wanted(env) == exporter


@pytest.mark.parametrize("value", ["jaeger", "zipkin", "otlp,console"])
def test_an_exporter_conveyor_does_not_ship_is_refused_by_name(value: str) -> None:
    with pytest.raises(SettingsError, match="OTEL_TRACES_EXPORTER"):
        tracing.wanted({"OTEL_TRACES_EXPORTER": value})


def test_configure_leaves_tracing_off_without_the_variables() -> None:
    assert tracing.configure("conveyor-test", env={}) is False
    assert tracing.tracer is None


def test_a_stored_context_round_trips_and_garbage_is_no_context() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    ctx = tracing.job_context(traceparent, "k=v")
    assert ctx is not None
    span_context = trace.get_current_span(ctx).get_span_context()
    assert span_context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C and span_context.is_remote
    assert tracing.stored_context(trace.NonRecordingSpan(span_context)) == (traceparent, "k=v")
    assert tracing.job_context("") is None
    assert tracing.job_context("not a traceparent") is None
    assert tracing.links_to(None) == []


def test_context_from_metadata_reads_only_the_w3c_keys() -> None:
    metadata = [
        ("user-agent", "x"),
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ("x-bin", b"\x00"),
    ]
    span = trace.get_current_span(tracing.context_from_metadata(metadata))
    assert span.get_span_context().span_id == 0xB7AD6B7169203331
    assert not trace.get_current_span(tracing.context_from_metadata(None)).get_span_context().is_valid
