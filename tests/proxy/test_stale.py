"""Last-known-good answers (router/core/stale.py): pure tests, time passed in, no sleeps."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from router.cli.serve_options import serve_config_from_args
from router.core import stale, tenancy
from router.core.routes import RoutesError, RouteTable, Tenant, Upstream, parse_routes_file
from router.devtools.pki import Pki
from router.proxy import IdentityHeaders, forward_headers
from router.settings import TenancySettings
from router.settings.serve import RequestHeaderSettings, StaleSettings
from tests.conftest import HPA_IDENTITY, parse_serve_args, serve_args

TARGET = "/apis/external.metrics.k8s.io/v1beta1/namespaces/tenant-a/s0-prometheus?labelSelector=x"
JSON = b"application/json"
IDS = IdentityHeaders.from_settings(RequestHeaderSettings())


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Sequence[tuple[bytes, bytes]] = ((b"Content-Type", JSON),)


def key_of(headers: Sequence[tuple[str, str]], target: str = TARGET) -> stale.Key:
    """The key of a request as the proxy computes it: from the forwarded header block."""
    raw = [(k.encode(), v.encode()) for k, v in headers]
    return stale.request_key(forward_headers(raw, IDS).headers, target)


def cache(seconds: float = 30.0, **caps: int) -> stale.StaleCache:
    c = stale.StaleCache(StaleSettings(serve_stale_for=seconds, **caps))
    c.configure({"a": seconds, "b": seconds})
    return c


OK = Answer(200, b'{"kind":"ExternalMetricValueList","items":[]}')
KEY = key_of(HPA_IDENTITY)


# --------------------------------------------------------------------------- duration


def test_a_caller_gets_its_answer_within_the_duration_and_the_error_after_it() -> None:
    c = cache(30.0)
    assert c.remember("a", KEY, OK, now=100.0)
    got = c.answer("a", KEY, "unreachable", now=129.9, wall=1e9)
    assert got is not None
    assert got.body == OK.body
    assert got.age == pytest.approx(29.9)
    assert b"Content-Type: application/json\r\n" in got.headers
    assert b"Age: 29\r\n" in got.headers
    assert c.view("a").last_served == 1e9
    assert c.answer("a", KEY, "unreachable", now=130.0, wall=1e9) is None
    assert c.entries("a") == 0  # the expired entry was dropped when found


def test_a_fresh_answer_restarts_the_clock() -> None:
    c = cache(10.0)
    c.remember("a", KEY, Answer(200, b"old"), now=0.0)
    c.remember("a", KEY, Answer(200, b"new"), now=8.0)
    got = c.answer("a", KEY, "timeout", now=15.0, wall=0.0)
    assert got is not None
    assert got.body == b"new"
    assert c.entries("a") == 1


def test_off_by_default_and_per_tenant() -> None:
    c = stale.StaleCache(StaleSettings())
    up = Upstream.parse("https://127.0.0.1:7001")
    table = RouteTable.from_tenants(
        [Tenant("a", ("tenant-a",), up), Tenant("b", ("tenant-b",), up, serve_stale_for=30.0)]
    )
    c.configure(stale.durations(table, 0.0))
    assert c.key_for("a", b"", TARGET) is None  # off: nothing computed, nothing remembered
    assert not c.remember("a", KEY, OK, now=0.0)
    assert c.key_for("b", b"", TARGET) is not None
    assert c.duration("b") == 30.0
    c.configure(stale.durations(table, 5.0))  # the default applies to tenants without one
    assert (c.duration("a"), c.duration("b")) == (5.0, 30.0)
    table0 = RouteTable.from_tenants([Tenant("a", ("tenant-a",), up, serve_stale_for=0.0)])
    c.configure(stale.durations(table0, 5.0))  # a tenant can turn it off
    assert c.duration("a") == 0.0


def test_a_tenant_leaving_the_routes_loses_its_entries() -> None:
    c = cache()
    c.remember("a", KEY, OK, now=0.0)
    c.remember("b", KEY, OK, now=0.0)
    before = c.bytes
    c.configure({"b": 30.0})
    assert c.entries("a") == 0
    assert c.entries("b") == 1
    assert c.bytes < before
    assert c.answer("a", KEY, "unreachable", now=1.0, wall=0.0) is None
    c.configure({"b": 0.0})  # turned off: forgotten too
    assert c.bytes == 0


# --------------------------------------------------------------------------- never across callers


def with_groups(groups: Sequence[str]) -> list[tuple[str, str]]:
    rest = [(k, v) for k, v in HPA_IDENTITY if k != "X-Remote-Group"]
    return rest + [("X-Remote-Group", g) for g in groups]


HPA_GROUPS = [v for k, v in HPA_IDENTITY if k == "X-Remote-Group"]


@pytest.mark.parametrize(
    "other",
    [
        pytest.param(with_groups([*HPA_GROUPS, "system:masters"]), id="one-group-more"),
        pytest.param(with_groups(HPA_GROUPS[:-1]), id="one-group-less"),
        pytest.param(with_groups([*HPA_GROUPS, HPA_GROUPS[0]]), id="a-group-twice"),
        pytest.param(
            [(k, "system:anonymous" if k == "X-Remote-User" else v) for k, v in HPA_IDENTITY],
            id="other-user",
        ),
        pytest.param([(k, v) for k, v in HPA_IDENTITY if k != "X-Remote-Uid"], id="no-uid"),
        pytest.param([*HPA_IDENTITY, ("X-Remote-Extra-Scopes", "x")], id="one-extra-more"),
        pytest.param(HPA_IDENTITY[:-1], id="one-extra-value-less"),
        pytest.param(
            [*HPA_IDENTITY, ("Accept", "application/vnd.kubernetes.protobuf")], id="accept"
        ),
    ],
)
def test_another_identity_never_gets_the_answer(other: list[tuple[str, str]]) -> None:
    c = cache()
    c.remember("a", KEY, OK, now=0.0)
    other_key = key_of(other)
    assert other_key != KEY
    assert c.answer("a", other_key, "unreachable", now=1.0, wall=0.0) is None
    assert c.answer("a", KEY, "unreachable", now=1.0, wall=0.0) is not None


def test_other_query_or_tenant_never_gets_the_answer() -> None:
    c = cache()
    c.remember("a", KEY, OK, now=0.0)
    assert c.answer("a", key_of(HPA_IDENTITY, TARGET + "y"), "timeout", 1.0, 0.0) is None
    assert c.answer("b", KEY, "timeout", 1.0, 0.0) is None


def test_the_same_identity_with_groups_and_extras_in_another_order_is_the_same_key() -> None:
    shuffled = with_groups(list(reversed(HPA_GROUPS)))
    extras = [h for h in shuffled if h[0].startswith("X-Remote-Extra-")]
    others = [h for h in shuffled if not h[0].startswith("X-Remote-Extra-")]
    assert key_of(list(reversed(extras)) + others) == KEY


def test_the_key_is_what_is_forwarded_not_what_arrived() -> None:
    # Spoofed upstream-namespace identity lines are dropped by forward_headers, so they cannot
    # make two callers share a key or split one caller's.
    spoof = [*HPA_IDENTITY, ("X-Remote-Group-Extra", "x"), ("Impersonate-User", "admin")]
    assert key_of(spoof) == KEY
    # Non-default requestheader names are forwarded as X-Remote-*: the key follows.
    custom = IdentityHeaders.from_settings(
        RequestHeaderSettings(username_headers=("X-Auth-User",), group_headers=("X-Auth-Group",))
    )
    raw = [(b"X-Auth-User", b"u"), (b"X-Auth-Group", b"g2"), (b"X-Auth-Group", b"g1")]
    key = stale.request_key(forward_headers(raw, custom).headers, TARGET)
    assert key[2:5] == ((b"u",), (), (b"g1", b"g2"))


# --------------------------------------------------------------------------- what qualifies


@pytest.mark.parametrize("code", [201, 204, 301, 400, 401, 403, 404, 429, 500, 502, 503, 504])
def test_errors_are_never_remembered(code: int) -> None:
    c = cache()
    assert not c.remember("a", KEY, Answer(code, b"{}"), now=0.0)
    assert c.entries("a") == 0
    assert c.answer("a", KEY, "upstream_503", now=1.0, wall=0.0) is None


@pytest.mark.parametrize("code", [400, 401, 403, 404, 405, 429, 502, 504])
def test_other_upstream_statuses_pass_through(code: int) -> None:
    assert stale.reason_for_status(code) is None


def test_failures_that_may_be_answered_stale() -> None:
    assert stale.reason_for_status(503) == "upstream_503"
    assert stale.reason_for_status(500) == "upstream_500"
    for kind in ("unreachable", "timeout", "tls", "protocol"):
        assert stale.reason_for_error(kind) == kind
    assert stale.reason_for_error("something-else") is None
    c = cache()
    c.remember("a", KEY, OK, now=0.0)
    assert c.answer("a", KEY, None, now=1.0, wall=0.0) is None  # no reason: the failure stands
    assert c.answer("a", None, "timeout", now=1.0, wall=0.0) is None  # no key: tenant off


def test_a_compressed_answer_is_not_remembered() -> None:
    c = cache()
    gz = Answer(200, b"\x1f\x8b...", ((b"Content-Type", JSON), (b"Content-Encoding", b"gzip")))
    assert not c.remember("a", KEY, gz, now=0.0)
    ident = Answer(200, b"{}", ((b"Content-Encoding", b"identity"),))
    assert c.remember("a", KEY, ident, now=0.0)
    got = c.answer("a", KEY, "timeout", now=1.0, wall=0.0)
    assert got is not None
    assert b"Content-Type" not in got.headers  # none was sent, none is invented


def test_protobuf_content_type_is_answered_as_received() -> None:
    c = cache()
    proto = Answer(
        200, b"k8s\x00\x01", ((b"content-type", b"application/vnd.kubernetes.protobuf"),)
    )
    c.remember("a", KEY, proto, now=0.0)
    got = c.answer("a", KEY, "timeout", now=1.0, wall=0.0)
    assert got is not None
    assert got.body == b"k8s\x00\x01"
    assert got.headers.startswith(b"Content-Type: application/vnd.kubernetes.protobuf\r\n")


# --------------------------------------------------------------------------- bounds


def numbered_key(i: int) -> stale.Key:
    return key_of(HPA_IDENTITY, f"{TARGET}&n={i}")


def test_the_entry_cap_per_tenant_evicts_the_oldest() -> None:
    c = cache(max_entries_per_tenant=3)
    for i in range(5):
        c.remember("a", numbered_key(i), Answer(200, b"%d" % i), now=float(i))
    c.remember("b", numbered_key(0), OK, now=5.0)
    assert c.entries("a") == 3
    assert c.entries("b") == 1  # another tenant's cap is its own
    for i in (0, 1):
        assert c.answer("a", numbered_key(i), "timeout", 6.0, 0.0) is None
    for i in (2, 3, 4):
        got = c.answer("a", numbered_key(i), "timeout", 6.0, 0.0)
        assert got is not None
        assert got.body == b"%d" % i


def test_refreshing_an_entry_makes_it_the_newest() -> None:
    c = cache(max_entries_per_tenant=2)
    c.remember("a", numbered_key(0), OK, now=0.0)
    c.remember("a", numbered_key(1), OK, now=1.0)
    c.remember("a", numbered_key(0), OK, now=2.0)  # fresh again
    c.remember("a", numbered_key(2), OK, now=3.0)  # evicts 1, the oldest now
    assert c.answer("a", numbered_key(0), "timeout", 4.0, 0.0) is not None
    assert c.answer("a", numbered_key(1), "timeout", 4.0, 0.0) is None


def test_the_byte_cap_evicts_the_oldest_of_any_tenant() -> None:
    body = b"x" * 1000
    one = 1000 + len(JSON) + stale.key_size(numbered_key(0)) + stale.ENTRY_OVERHEAD
    c = cache(max_bytes=3 * one + 10)
    c.remember("a", numbered_key(0), Answer(200, body), now=0.0)
    c.remember("b", numbered_key(0), Answer(200, body), now=1.0)
    c.remember("a", numbered_key(1), Answer(200, body), now=2.0)
    assert c.bytes == 3 * one
    c.remember("b", numbered_key(1), Answer(200, body), now=3.0)
    assert c.bytes <= 3 * one + 10
    assert c.answer("a", numbered_key(0), "timeout", 4.0, 0.0) is None  # the oldest went
    assert c.entries("a") == 1
    assert c.entries("b") == 2


def test_an_answer_larger_than_the_byte_cap_is_not_remembered() -> None:
    c = cache(max_bytes=100)
    assert not c.remember("a", KEY, Answer(200, b"x" * 200), now=0.0)
    assert c.bytes == 0


# --------------------------------------------------------------------------- the Warning header


class WarningParseError(ValueError):
    pass


def parse_warning_header(header: str) -> tuple[int, str, str, str]:
    """client-go's net.ParseWarningHeader (k8s.io/apimachinery/pkg/util/net/http.go), ported:
    (code, agent, text, remainder)."""
    header = header.strip()
    parts = header.split(" ", 2)
    if len(parts) != 3:
        raise WarningParseError("fewer than 3 segments")
    code, agent, rest = parts
    if not re.fullmatch(r"[0-9]{3}", code):
        raise WarningParseError("code segment is not 3 digits")
    if not agent or any(unicodedata.category(c) == "Cc" for c in agent):
        raise WarningParseError("invalid agent")
    if not rest or rest[0] != '"':
        raise WarningParseError("missing initial quote")
    out: list[str] = []
    escaping = False
    remainder = None
    for i, ch in enumerate(rest[1:], start=1):
        if ch == '"' and not escaping:
            remainder = rest[i + 1 :].strip()
            break
        if ch == "\\" and not escaping:
            escaping = True
            continue
        out.append(ch)
        escaping = False
    if remainder is None:
        raise WarningParseError("missing closing quote")
    text = "".join(out)
    if any(unicodedata.category(c) == "Cc" for c in text):
        raise WarningParseError("invalid text")
    if remainder and remainder[0] == '"':
        end = remainder.find('"', 1)
        if end < 0:
            raise WarningParseError("unterminated date segment")
        remainder = remainder[end + 1 :].strip()
    if remainder:
        if remainder[0] != ",":
            raise WarningParseError("unexpected token after warn-date")
        remainder = remainder[1:].strip()
    return int(code), agent, text, remainder


def header_value(line: bytes, name: bytes) -> str:
    head, _, value = line.partition(b": ")
    assert head == name
    assert line.endswith(b"\r\n")
    return value[:-2].decode("utf-8")


@pytest.mark.parametrize("reason", sorted(stale.REASONS))
@pytest.mark.parametrize("age", [0.0, 0.4, 12.7, 65.0, 3600.0])
def test_the_warning_header_is_well_formed_as_client_go_parses_it(reason: str, age: float) -> None:
    line = stale.warning_header(age, reason)
    code, agent, text, remainder = parse_warning_header(header_value(line, b"Warning"))
    assert (code, agent, remainder) == (299, "-", "")  # 299: the code client-go surfaces
    assert text == f"stale metric value from {stale.format_age(age)} ago: {stale.REASONS[reason]}"


def test_warning_text_with_quotes_backslashes_and_controls_stays_one_parsable_header() -> None:
    line = stale.warning_header(5.0, 'a "quoted"\\ reason\r\nX-Injected: 1')
    assert line.count(b"\r\n") == 1
    _, _, text, _ = parse_warning_header(header_value(line, b"Warning"))
    assert text == 'stale metric value from 5s ago: a "quoted"\\ reasonX-Injected: 1'


@pytest.mark.parametrize(("age", "text"), [(0.0, "0s"), (0.9, "0s"), (59.9, "59s"), (65, "1m5s")])
def test_age_is_whole_seconds(age: float, text: str) -> None:
    assert stale.format_age(age) == text


def test_the_stale_answer_carries_warning_and_age() -> None:
    c = cache(60.0)
    c.remember("a", KEY, OK, now=0.0)
    got = c.answer("a", KEY, "upstream_503", now=42.5, wall=0.0)
    assert got is not None
    lines = got.headers.split(b"\r\n")
    assert lines[0] == b"Content-Type: application/json"
    assert lines[1].startswith(b'Warning: 299 - "stale metric value from 42s ago: ')
    assert lines[2] == b"Age: 42"
    assert got.reason == "upstream_503"


# --------------------------------------------------------------------------- property


IDENTITIES = [
    with_groups(HPA_GROUPS),
    with_groups(HPA_GROUPS[:-1]),
    with_groups([*HPA_GROUPS, "system:masters"]),
    [("X-Remote-User", "alice"), ("X-Remote-Group", "system:authenticated")],
    [
        ("X-Remote-User", "alice"),
        ("X-Remote-Group", "system:authenticated"),
        ("X-Remote-Extra-A", "1"),
    ],
]
TARGETS = [TARGET, TARGET + "y", TARGET.replace("tenant-a", "tenant-a--dev")]
DURATION = 30.0


@dataclass
class Fresh:
    identity: int
    body: bytes
    at: float


@dataclass
class Model:
    # (tenant, identity index, target index) -> the last fresh answer of that caller
    fresh: dict[tuple[str, int, int], Fresh] = field(default_factory=dict)


class StaleMachine(RuleBasedStateMachine):
    """Whatever the sequence of answers, failures and route changes: a stale answer goes only
    to the identity that received that body fresh, and is never older than the duration."""

    @initialize(caps=st.sampled_from([(1000, 1 << 20), (2, 1 << 20), (1000, 6000)]))
    def start(self, caps: tuple[int, int]) -> None:
        self.cache = stale.StaleCache(
            StaleSettings(DURATION, max_entries_per_tenant=caps[0], max_bytes=caps[1])
        )
        self.cache.configure({"a": DURATION, "b": DURATION})
        self.model = Model()
        self.now = 0.0
        self.counter = 0
        self.keys = {(i, t): key_of(IDENTITIES[i], TARGETS[t]) for i in range(5) for t in range(3)}

    @rule(seconds=st.floats(min_value=0.0, max_value=20.0))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule(
        tenant=st.sampled_from("ab"),
        identity=st.integers(0, 4),
        path=st.integers(0, 2),
        code=st.sampled_from([200, 200, 401, 403, 404, 500, 503]),
    )
    def upstream_answers(self, tenant: str, identity: int, path: int, code: int) -> None:
        self.counter += 1
        body = b"%s|%d|%d|%d" % (tenant.encode(), identity, path, self.counter)
        self.cache.remember(tenant, self.keys[identity, path], Answer(code, body), self.now)
        if code == 200:
            self.model.fresh[tenant, identity, path] = Fresh(identity, body, self.now)

    @rule(
        tenant=st.sampled_from("ab"),
        identity=st.integers(0, 4),
        path=st.integers(0, 2),
        reason=st.sampled_from(sorted(stale.REASONS)),
    )
    def upstream_fails(self, tenant: str, identity: int, path: int, reason: str) -> None:
        got = self.cache.answer(tenant, self.keys[identity, path], reason, self.now, 0.0)
        if got is None:
            return
        fresh = self.model.fresh.get((tenant, identity, path))
        assert fresh is not None, "a stale answer for a caller that never got one fresh"
        assert got.body == fresh.body  # that caller's own latest answer, nobody else's
        assert got.body.split(b"|")[:3] == [tenant.encode(), b"%d" % identity, b"%d" % path]
        assert got.age == self.now - fresh.at
        assert got.age < DURATION

    @rule(tenant=st.sampled_from("ab"))
    def tenant_leaves_and_returns(self, tenant: str) -> None:
        self.cache.configure({t: DURATION for t in "ab" if t != tenant})
        self.model.fresh = {k: v for k, v in self.model.fresh.items() if k[0] != tenant}
        self.cache.configure({"a": DURATION, "b": DURATION})

    @invariant()
    def bounded(self) -> None:
        assert self.cache.bytes <= self.cache.settings.max_bytes
        for tenant in "ab":
            assert self.cache.entries(tenant) <= self.cache.settings.max_entries_per_tenant


TestStaleMachine = StaleMachine.TestCase
TestStaleMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(
    groups=st.lists(st.sampled_from(["g1", "g2", "g3", "system:masters"]), max_size=4),
    more=st.sampled_from(["g1", "g4", "system:masters"]),
)
def test_one_group_more_is_always_another_key(groups: list[str], more: str) -> None:
    assert key_of(with_groups(groups)) != key_of(with_groups([*groups, more]))
    assert key_of(with_groups(groups)) == key_of(with_groups(sorted(groups, reverse=True)))


# --------------------------------------------------------------------------- configuration


def test_routes_file_serve_stale_for() -> None:
    table = parse_routes_file(
        "tenants:\n"
        "  a: {namespaces: [tenant-a], upstream: 'https://127.0.0.1:7001', serveStaleFor: 30s}\n"
        "  b: {namespaces: [tenant-b], upstream: 'https://127.0.0.1:7002', serveStaleFor: 0}\n"
        "  c: {namespaces: [tenant-c], upstream: 'https://127.0.0.1:7003'}\n"
    )
    assert [t.serve_stale_for for t in table.tenants] == [30.0, 0.0, None]


@pytest.mark.parametrize("value", ["'30 seconds'", "-1", "true", "[30s]"])
def test_routes_file_bad_serve_stale_for_is_refused(value: str) -> None:
    with pytest.raises(RoutesError, match=r"tenants\.a\.serveStaleFor: "):
        parse_routes_file(
            "tenants:\n  a: {namespaces: [tenant-a], upstream: 'https://127.0.0.1:7001', "
            f"serveStaleFor: {value}}}\n"
        )


def service(annotations: dict[str, str] | None) -> dict[str, object]:
    meta: dict[str, object] = {"namespace": "tenant-a--sys", "name": "keda-metrics"}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": {"ports": [{"name": "https", "port": 443}]}}


@pytest.mark.parametrize(
    ("annotations", "want"),
    [
        (None, None),
        ({tenancy.SERVE_STALE_ANNOTATION: "30s"}, 30.0),
        ({tenancy.SERVE_STALE_ANNOTATION: "1m"}, 60.0),
        ({tenancy.SERVE_STALE_ANNOTATION: "0"}, 0.0),
        ({tenancy.SERVE_STALE_ANNOTATION: "soon"}, None),  # invalid: the default applies
    ],
)
def test_service_annotation_sets_the_tenant_duration(
    annotations: dict[str, str] | None, want: float | None
) -> None:
    svc = tenancy.ServiceInfo.from_object(service(annotations))
    namespaces = [tenancy.NamespaceInfo("tenant-a"), tenancy.NamespaceInfo("tenant-a--sys")]
    resolution = tenancy.resolve(namespaces, [svc], TenancySettings())
    (tenant,) = resolution.table.tenants
    assert tenant.name == "tenant-a"
    assert tenant.serve_stale_for == want


def test_serve_flags(tmp_path: Path, pki: Pki) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("tenants: {}\n")
    base = serve_args(pki, routes)
    cfg = serve_config_from_args(parse_serve_args(base))
    assert cfg.stale == StaleSettings()
    assert cfg.stale.serve_stale_for == 0.0
    cfg = serve_config_from_args(
        parse_serve_args(
            [
                *base,
                "--serve-stale-for", "1m30s",
                "--stale-cache-max-entries-per-tenant", "50",
                "--stale-cache-max-bytes", "4Mi",
            ]
        )
    )  # fmt: skip
    assert cfg.stale == StaleSettings(90.0, 50, 4 * 1024 * 1024)
