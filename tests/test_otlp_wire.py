"""sidecar.otlp_wire writes the bytes the official OTLP encoder writes.

Every test encodes spans with both and compares: the bytes (protobuf writes fields in
number order, so equal messages serialize to equal bytes) and the parsed messages. Where
the official encoder drops an attribute or raises, ours must do the same.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from enum import IntEnum
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as official_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from sidecar.model import CallRecord, GatewayEvent, UpstreamAttempt, Usage
from sidecar.otlp_wire import encode_spans
from sidecar.tracing import TracingSettings, build_resource, to_span
from tests.test_ledger import BASE

# -- helpers ----------------------------------------------------------------------------------


def official(spans: Sequence[ReadableSpan]) -> bytes:
    data: bytes = official_encode_spans(spans).SerializePartialToString()
    return data


def assert_same(spans: Sequence[ReadableSpan]) -> bytes:
    """Our bytes are the official encoder's, and they parse to its message."""
    ours = encode_spans(spans)
    message = official_encode_spans(spans)
    assert ours == message.SerializePartialToString()
    assert ExportTraceServiceRequest.FromString(ours) == message
    return ours


def assert_same_outcome(spans: Sequence[ReadableSpan]) -> None:
    """The same bytes, or both raise (bytes only: messages nested past 100 levels do not parse)."""
    try:
        expected = official(spans)
    except Exception:
        with pytest.raises((ValueError, TypeError)):
            encode_spans(spans)
        return
    assert encode_spans(spans) == expected


def context(
    trace_id: int = 0x0AF7651916CD43DD8448EB211C80319C,
    span_id: int = 0xB7AD6B7169203331,
    *,
    remote: bool = False,
    flags: int = TraceFlags.SAMPLED,
    state: Sequence[tuple[str, str]] = (),
) -> SpanContext:
    return SpanContext(trace_id, span_id, remote, TraceFlags(flags), TraceState(list(state)))


class Color(IntEnum):
    RED = 1


class Text(str):
    pass


class Number(float):
    pass


class Blob(bytes):
    pass


RESOURCE = Resource({"service.name": "llm-sidecar", "deployment.environment": "test"})
SCOPE = InstrumentationScope("llm-sidecar", "0.1.0")


def span(**changes: object) -> ReadableSpan:
    """A span with everything set, or as changed."""
    fields: dict[str, object] = {
        "name": "chat gpt-4o",
        "context": context(),
        "parent": None,
        "resource": RESOURCE,
        "attributes": {"gen_ai.operation.name": "chat", "http.response.status_code": 200},
        "kind": SpanKind.CLIENT,
        "status": Status(StatusCode.UNSET),
        "start_time": 1_735_689_600_250_000_000,
        "end_time": 1_735_689_601_500_000_000,
        "instrumentation_scope": SCOPE,
    }
    fields.update(changes)
    return ReadableSpan(**fields)  # type: ignore[arg-type]


# -- spans as the sidecar builds them ------------------------------------------------------------

SIDECAR_RESOURCE = build_resource(TracingSettings(resource_attributes=(("deployment.environment", "prod"),)))


def record(**changes: object) -> CallRecord:
    fields: dict[str, object] = {"trace_sampled": True, **changes}
    return dataclasses.replace(BASE, **fields)  # type: ignore[arg-type]


SIDECAR_RECORDS: dict[str, CallRecord] = {
    "plain": record(),
    "unsampled": record(trace_sampled=False),
    "client parent and tracestate": record(
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        span_id="00000000000000ff",
        parent_span_id="00f067aa0ba902b7",
        tracestate="congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    ),
    "upstream error": record(error_type="upstream_5xx", status=502, parent_span_id="00f067aa0ba902b7"),
    "timeout, no response": record(error_type="timeout", status=504, response_model=None, usage=Usage()),
    "gateway events": record(
        route="chat-default",
        variant="candidate",
        events=(
            GatewayEvent("fallback", 0.25, (("from", "openai"), ("to", "azure"), ("reason", "5xx"))),
            GatewayEvent("breaker.open", 0.5),
            GatewayEvent("ünïcødé ✓", 0.0, (("", ""),)),
        ),
        attempts=(
            UpstreamAttempt("openai", "5xx", 0.0, 0.25),
            UpstreamAttempt("azure", "success", 0.25, 1.0, model="gpt-4o"),
        ),
    ),
    "anthropic": record(
        provider="anthropic",
        operation="messages",
        upstream="anthropic",
        path="/v1/messages",
        request_model="claude-sonnet-4-5",
        response_model="claude-sonnet-4-5-20250929",
        response_id="msg_01XFDUDYJgAACzvnptvVoYEL",
        finish_reasons=("end_turn", "max_tokens"),
        server_address="api.anthropic.com",
        server_port=443,
        stream=False,
    ),
    "throttled, unpriced": record(
        error_type="throttled", status=429, throttled="rpm", cost_usd=None, ttft_s=None, usage=Usage()
    ),
    "embeddings": record(operation="embeddings", path="/v1/embeddings", stream=False, usage=Usage(input=7)),
    "other path": record(operation="other", provider="", method="GET", path="/v1/models", request_model=None),
}


@pytest.mark.parametrize("name", SIDECAR_RECORDS)
def test_sidecar_span(name: str) -> None:
    assert_same([to_span(SIDECAR_RECORDS[name], SIDECAR_RESOURCE)])


def test_sidecar_batch() -> None:
    spans = [
        to_span(dataclasses.replace(rec, span_id=f"{i + 1:016x}", request_id=f"req-{i}"), SIDECAR_RESOURCE)
        for i, rec in enumerate(list(SIDECAR_RECORDS.values()) * 20)
    ]
    assert_same(spans)
    assert_same(spans)  # again, from the caches


def test_a_pace_is_called_before_each_span_and_changes_nothing() -> None:
    spans = [to_span(rec, SIDECAR_RESOURCE) for rec in SIDECAR_RECORDS.values()]
    calls: list[int] = []
    assert encode_spans(spans, lambda: calls.append(1)) == encode_spans(spans)
    assert len(calls) == len(spans)


# -- every field of a span -------------------------------------------------------------------------


def test_every_span_field() -> None:
    events: BoundedList[Event] = BoundedList(2)
    events.extend(
        [
            Event("ignored", {"a": 1}, timestamp=1),
            Event("sidecar.fallback", {"from": "a", "to": "b", "n": 2}, timestamp=1_735_689_600_300_000_000),
            Event("", None, timestamp=0),
        ]
    )
    links: BoundedList[Link] = BoundedList(3)
    links.extend(
        [
            Link(context(0x1, 0x2), {"link.kind": "follows_from"}),
            Link(context(2**128 - 1, 2**64 - 1, remote=True, state=[("k", "v")])),
            Link(context(0x3, 0x4, flags=TraceFlags.DEFAULT), BoundedAttributes(1, {"x": 1, "y": 2})),
            Link(context(0x5, 0x6)),
        ]
    )
    full = span(
        context=context(state=[("congo", "t61rcWkgMzE"), ("rojo", "00f067aa0ba902b7")]),
        parent=context(span_id=0x00F067AA0BA902B7, remote=True),
        attributes=BoundedAttributes(3, {"dropped": 0, "a": "x", "b": True, "c": 1.5}),
        events=events,
        links=links,
        status=Status(StatusCode.ERROR, "upstream_5xx"),
    )
    ours = assert_same([full])
    message = ExportTraceServiceRequest.FromString(ours)
    parsed = message.resource_spans[0].scope_spans[0].spans[0]
    dropped = (parsed.dropped_attributes_count, parsed.dropped_events_count, parsed.dropped_links_count)
    assert dropped == (1, 1, 1)
    # The oldest link was dropped: the remote one is first.
    assert parsed.flags == 0x300 and [link.flags for link in parsed.links] == [0x300, 0x100, 0x100]


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"parent": context(span_id=7)}, id="local parent"),
        pytest.param({"parent": context(span_id=0, remote=True)}, id="remote parent, span id 0"),
        pytest.param({"context": context(0, 0, flags=0)}, id="zero ids"),
        pytest.param({"context": SpanContext(1, 2, False, TraceFlags(1), None)}, id="no trace state"),
        pytest.param({"status": Status(StatusCode.OK)}, id="ok"),
        pytest.param({"status": Status(StatusCode.ERROR)}, id="error without message"),
        pytest.param({"status": Status(StatusCode.ERROR, "")}, id="error with empty message"),
        pytest.param({"status": None}, id="no status"),
        pytest.param({"start_time": None, "end_time": None}, id="no times"),
        pytest.param({"start_time": 0, "end_time": 2**64 - 1}, id="time limits"),
        pytest.param({"name": ""}, id="empty name"),
        pytest.param({"name": "名前 ✓ 𝄞" * 50}, id="long unicode name"),
        pytest.param({"name": b"bytes name"}, id="utf-8 bytes name"),
        pytest.param({"name": None}, id="no name"),
        pytest.param({"name": Text("str subclass")}, id="str subclass name"),
        pytest.param({"attributes": None}, id="no attributes"),
        pytest.param({"attributes": {}}, id="empty attributes"),
        pytest.param({"events": [Event("e", {}, timestamp=5)] * 200}, id="many events"),
        pytest.param({"instrumentation_scope": None}, id="no scope"),
    ]
    + [pytest.param({"kind": kind}, id=kind.name) for kind in SpanKind],
)
def test_span_variants(changes: dict[str, object]) -> None:
    assert_same([span(**changes)])


# -- attribute values ------------------------------------------------------------------------------


# Any: the tests pass values the attribute types do not allow, on purpose.
VALUES: dict[str, Any] = {
    "empty string": "",
    "string": "gpt-4o",
    "unicode": "ünïcødé ✓ 𝄞 名前",
    "nul": "\x00",
    "long string": "x" * 20_000,
    "true": True,
    "false": False,
    "zero": 0,
    "one": 1,
    "minus one": -1,
    "127": 127,
    "128": 128,
    "2**31": 2**31,
    "int64 max": 2**63 - 1,
    "int64 min": -(2**63),
    "zero float": 0.0,
    "minus zero": -0.0,
    "float": 1.5,
    "tiny float": 5e-324,
    "huge float": 1.7976931348623157e308,
    "inf": float("inf"),
    "minus inf": float("-inf"),
    "nan": float("nan"),
    "empty bytes": b"",
    "bytes": b"\x00\xff\x80",
    "none": None,
    "empty list": [],
    "empty tuple": (),
    "strings": ["stop", "length"],
    "ints": [1, -1, 2**63 - 1],
    "bools": (True, False),
    "floats": [1.5, float("nan")],
    "nones": [None, None],
    "mixed": ["a", 1, 2.5, True, b"b", None],
    "nested lists": [[1, [2, [3]]], "x", []],
    "long list": list(range(300)),
    "empty dict": {},
    "dict": {"a": 1, "b": [1, {"c": None}], "": "empty key"},
    "dict with other keys": {1: "int key", None: "none key", (1, 2): "tuple key"},
    "range": range(3),
    "bytearray": bytearray(b"ab"),
    "memoryview": memoryview(b"ab"),
    "int enum": Color.RED,
    "str subclass": Text("text"),
    "float subclass": Number(2.5),
    "bytes subclass": Blob(b"blob"),
    "ordered dict": OrderedDict([("b", 1), ("a", [2])]),
    "mapping proxy": MappingProxyType({"a": True}),
}
# The official encoder drops these (logging why), keeping the span's other attributes.
DROPPED: dict[str, Any] = {
    "object": object(),
    "int64 max + 1": 2**63,
    "int64 min - 1": -(2**63) - 1,
    "lone surrogate": "a\ud800b",
    "object in a list": [1, object()],
    "surrogate in a dict": {"a": "\udfff"},
    "surrogate dict key": {"\ud800": 1},
    "set": {1, 2},
}


@pytest.mark.parametrize("name", list(VALUES) + list(DROPPED))
def test_attribute_value(name: str) -> None:
    value = VALUES.get(name, DROPPED.get(name))
    attributes: dict[str, Any] = {"before": 1, "k": value, "after": "x"}
    assert_same(
        [
            span(
                attributes=attributes,
                events=[Event("e", attributes, timestamp=1)],
                links=[Link(context(), attributes)],
                instrumentation_scope=InstrumentationScope("s", "1", attributes=attributes),
            )
        ]
    )


@pytest.mark.parametrize(
    "key", ["", "ünïcødé", "k" * 300, b"bytes key", b"\xff", None, 1, ("t",), "\ud800"], ids=repr
)
def test_attribute_key(key: object) -> None:
    assert_same([span(attributes={key: "v", "other": 1})])


def test_resource_attribute_values() -> None:
    values = {name: value for name, value in VALUES.items() if not isinstance(value, dict)}
    assert_same([span(resource=Resource(values, schema_url="https://opentelemetry.io/schemas/1.21.0"))])


def test_dropped_attribute_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    attributes = {"good": 1, "bad": object(), "worse": [1, object()]}
    caplog.set_level(logging.ERROR, logger="sidecar.otlp_wire")
    ours = assert_same([span(attributes=attributes)])
    parsed = ExportTraceServiceRequest.FromString(ours).resource_spans[0].scope_spans[0].spans[0]
    assert [kv.key for kv in parsed.attributes] == ["good"]
    logged = [r.getMessage() for r in caplog.records if r.name == "sidecar.otlp_wire"]
    assert len(logged) == 2
    assert "'bad'" in logged[0] and "unsupported attribute value type object" in logged[0]
    assert "'worse'" in logged[1]


def test_unsupported_type_dropped_by_both() -> None:
    """The official encoder does not raise on an unsupported attribute value: it logs and drops it."""
    one = span(attributes={"k": object()})
    expected = official([one])
    assert encode_spans([one]) == expected == official([span(attributes={})])


# -- resources and scopes ---------------------------------------------------------------------------


def test_grouping_by_resource_and_scope() -> None:
    r1 = Resource({"service.name": "a"})
    r1_again = Resource({"service.name": "a"})  # equal, another object: grouped with r1
    r2 = Resource({"service.name": "b", "n": 1}, schema_url="https://opentelemetry.io/schemas/1.21.0")
    r3 = Resource({})
    s1 = InstrumentationScope("llm-sidecar", "0.1.0")
    s1_again = InstrumentationScope("llm-sidecar", "0.1.0")
    s2 = InstrumentationScope("other", None, "https://example.com/schema", {"scope.attr": [1, 2]})
    s3 = InstrumentationScope("")
    spans = [
        span(name=f"s{i}", resource=resource, instrumentation_scope=scope)
        for i, (resource, scope) in enumerate(
            [
                (r1, s1),
                (r2, s2),
                (r1_again, s2),
                (r1, s1_again),
                (r3, None),
                (r2, s1),
                (r1_again, None),
                (r3, s3),
                (r1, s2),
                (r2, s2),
            ]
        )
    ]
    ours = assert_same(spans)
    message = ExportTraceServiceRequest.FromString(ours)
    layout = [[[s.name for s in ss.spans] for ss in rs.scope_spans] for rs in message.resource_spans]
    assert layout == [
        [["s0", "s3"], ["s2", "s8"], ["s6"]],
        [["s1", "s9"], ["s5"]],
        [["s4"], ["s7"]],
    ]


def test_many_distinct_attributes() -> None:
    """More names and values than the encoder's caches hold."""
    attributes = {f"k{i}": (f"v{i}" if i % 3 else i) for i in range(5000)}
    assert_same([span(attributes=attributes), span(attributes=attributes)])


def test_default_resource() -> None:
    assert_same([span(resource=None), span(resource=None)])


def test_empty_batch() -> None:
    assert encode_spans([]) == official([]) == b""


def test_fresh_resources_and_scopes_every_call() -> None:
    """The cache by object id never serves another object's bytes (ids are reused after GC)."""
    for i in range(200):
        resource = Resource({"i": i, "pad": "x" * (i % 7)})
        scope = InstrumentationScope(f"scope-{i % 3}", str(i))
        assert_same([span(resource=resource, instrumentation_scope=scope), span(resource=RESOURCE)])


# -- what raises -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"name": "a\ud800"}, id="surrogate in the name"),
        pytest.param({"name": b"\xff"}, id="bytes name not utf-8"),
        pytest.param({"name": 5}, id="int name"),
        pytest.param({"events": [Event("\udfff", timestamp=1)]}, id="surrogate in an event name"),
        pytest.param({"events": [Event("e", timestamp=-1)]}, id="negative event time"),
        pytest.param({"status": Status(StatusCode.ERROR, "\ud800")}, id="surrogate in the status"),
        pytest.param({"instrumentation_scope": InstrumentationScope("\ud800")}, id="surrogate in the scope"),
        pytest.param(
            {"instrumentation_scope": InstrumentationScope("s", b"\xff")},  # type: ignore[arg-type]
            id="bad scope version",
        ),
        pytest.param({"resource": Resource({}, schema_url="\ud800")}, id="surrogate in a schema url"),
        pytest.param({"start_time": -1}, id="negative start"),
        pytest.param({"end_time": 2**64}, id="end past uint64"),
        pytest.param({"start_time": 1.5}, id="float start"),
        pytest.param({"context": context(trace_id=2**128)}, id="trace id too big"),
        pytest.param({"context": context(span_id=-1)}, id="negative span id"),
        pytest.param({"parent": context(span_id=2**64)}, id="parent id too big"),
        pytest.param({"links": [Link(context(trace_id=-1))]}, id="bad link id"),
        pytest.param({"kind": "client"}, id="not a span kind"),
        pytest.param({"context": None}, id="no context"),
    ],
)
def test_raises_where_the_official_encoder_raises(changes: dict[str, object]) -> None:
    spans = [span(name="fine"), span(**changes)]
    with pytest.raises(Exception):  # noqa: B017 - whatever it raises
        official(spans)
    with pytest.raises((ValueError, TypeError)):
        encode_spans(spans)


class MiscountedSpan(ReadableSpan):
    def __init__(self, dropped: int) -> None:
        super().__init__("s", context(), resource=RESOURCE)
        self.dropped = dropped

    @property
    def dropped_attributes(self) -> int:
        return self.dropped


@pytest.mark.parametrize("dropped", [-1, 2**32])
def test_dropped_count_out_of_range_raises(dropped: int) -> None:
    spans = [MiscountedSpan(dropped)]
    with pytest.raises(ValueError):
        official(spans)
    with pytest.raises(ValueError):
        encode_spans(spans)
    assert_same([MiscountedSpan(2**32 - 1)])


def nested_lists(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def nested_dicts(depth: int) -> object:
    value: object = []
    for _ in range(depth):
        value = {"a": value}
    return value


LOCATIONS: dict[str, Callable[[Any], ReadableSpan]] = {
    "span": lambda v: span(attributes={"k": v}),
    "event": lambda v: span(events=[Event("e", {"k": v}, timestamp=1)]),
    "link": lambda v: span(links=[Link(context(), {"k": v})]),
    "scope": lambda v: span(instrumentation_scope=InstrumentationScope("s", attributes={"k": v})),
    "resource": lambda v: span(resource=Resource({"k": v})),
}


@pytest.mark.parametrize("location", LOCATIONS)
@pytest.mark.parametrize(
    ("nest", "depths"), [(nested_lists, range(44, 53)), (nested_dicts, range(29, 36))], ids=["lists", "dicts"]
)
def test_nesting_limits(location: str, nest: Callable[[int], object], depths: range) -> None:
    """Past the protobuf runtime's depth limit the official encoder drops the attribute, or
    raises when the attribute fits but the whole message does not: ours does the same."""
    for depth in depths:
        assert_same_outcome([LOCATIONS[location](nest(depth))])


def test_no_protobuf_at_runtime() -> None:
    code = (
        "import sys, sidecar.otlp_wire\n"
        "bad = [m for m in sys.modules if m.startswith(('google.protobuf', 'opentelemetry.proto',"
        " 'opentelemetry.exporter'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- property ---------------------------------------------------------------------------------------

_surrogates = st.sampled_from(["\ud800", "a\udfffb"])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(),  # out of the int64 range now and then: dropped
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=10),
    _surrogates,
)
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=5) | st.integers(0, 9), children, max_size=4)
    ),
    max_leaves=12,
)
_attributes: st.SearchStrategy[Any] = st.none() | st.dictionaries(
    st.text(max_size=12) | _surrogates, _values, max_size=6
)

_RESOURCES = [
    RESOURCE,
    Resource({"service.name": "llm-sidecar", "deployment.environment": "test"}),  # equal to RESOURCE
    Resource({"service.name": "b", "n": 1, "f": [1.5, 2.5]}, schema_url="https://opentelemetry.io/schemas/1"),
    Resource({}),
]
_SCOPES = [
    SCOPE,
    InstrumentationScope("llm-sidecar", "0.1.0"),  # equal to SCOPE
    InstrumentationScope("other", None, "https://example.com/schema", {"a": 1}),
    InstrumentationScope(""),
    None,
]
_states = st.lists(
    st.tuples(st.sampled_from(["congo", "rojo", "vendor@sys"]), st.sampled_from(["t61rcWkgMzE", "1", "v-2"])),
    max_size=3,
    unique_by=lambda kv: kv[0],
)


@st.composite
def _contexts(draw: st.DrawFn) -> SpanContext:
    return SpanContext(
        draw(st.integers(0, 2**128 - 1)),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.booleans()),
        TraceFlags(draw(st.integers(0, 255))),
        TraceState(draw(_states)),
    )


_statuses = st.sampled_from(
    [Status(StatusCode.UNSET), Status(StatusCode.OK), Status(StatusCode.ERROR), Status(StatusCode.ERROR, "x")]
) | st.text(max_size=10).map(lambda text: Status(StatusCode.ERROR, text))
_times = st.none() | st.integers(0, 2**64 - 1)


@st.composite
def _spans(draw: st.DrawFn) -> ReadableSpan:
    return ReadableSpan(
        name=draw(st.text(max_size=20)),
        context=draw(_contexts()),
        parent=draw(st.none() | _contexts()),
        resource=draw(st.sampled_from(_RESOURCES)),
        attributes=draw(_attributes),
        events=draw(
            st.lists(
                st.builds(Event, st.text(max_size=8), _attributes, st.integers(0, 2**64 - 1)), max_size=3
            )
        ),
        links=draw(st.lists(st.builds(Link, _contexts(), _attributes), max_size=2)),
        kind=draw(st.sampled_from(SpanKind)),
        status=draw(_statuses),
        start_time=draw(_times),
        end_time=draw(_times),
        instrumentation_scope=draw(st.sampled_from(_SCOPES)),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_spans(), max_size=4))
def test_property_same_as_official(spans: list[ReadableSpan]) -> None:
    assert_same(spans)


@pytest.mark.parametrize(
    "usage, estimated",
    [
        (Usage(input=100, cached_input=40, output=20), Usage(reasoning=3)),
        (Usage(), Usage(input=7, output=9)),
        (Usage(input=0, output=0), Usage()),
        (Usage(), Usage()),
        (Usage(input=5), Usage(input=6, output=2)),
    ],
)
def test_span_token_attributes_follow_the_records_counts(usage: Usage, estimated: Usage) -> None:
    """Usage attributes and sidecar.tokens.source: what token_counts() and the call log say."""
    from sidecar.calllog import tokens_source
    from sidecar.tracing import _USAGE_ATTRIBUTES, span_attributes

    rec = record(usage=usage, estimated=estimated)
    attrs = span_attributes(rec)
    expected = {_USAGE_ATTRIBUTES[c.type]: c.count for c in rec.token_counts()}
    assert {k: v for k, v in attrs.items() if k.startswith("gen_ai.usage.")} == expected
    assert attrs.get("sidecar.tokens.source") == tokens_source(rec)
    keys = list(attrs)
    assert [k for k in keys if k in expected] == list(expected)  # in the order of TOKEN_TYPES
