"""Last-known-good answers while a tenant's metrics server restarts: bounded, per caller (pure).

When a tenant's KEDA restarts, its metrics server fails for seconds to tens of seconds and the
HPA stops scaling that tenant. With a stale duration on (``--serve-stale-for``, a tenant's
``serveStaleFor`` in the routes file, or its metrics Service's annotation), the proxy remembers
every 200 answer to a metric GET and, when a later identical request fails, answers the
remembered body instead of the error, marked with a ``Warning`` and an ``Age`` header.

- **Key.** (identity, request target with its query, Accept). The identity is read from the
  header block the router forwards upstream (``proxy.forward_headers``): every user and uid
  line in order, the group lines sorted, the extra lines sorted, names and values as forwarded.
  The upstream authorised exactly that identity; a body is never answered to any other, so a
  caller with one group more or less, or another extra, never gets it.
- **What is remembered.** 200 answers only, and not one with a Content-Encoding (its bytes
  depend on the request's Accept-Encoding, which is not in the key). Errors never are.
- **What may be answered stale.** An upstream that is unreachable, times out or answers badly
  (TLS or protocol: the router's 502), an upstream answering 500 or 503, and a tenant over its
  in-flight limit. Every other status passes through: 401 and 403 are the upstream's
  authorisation decision and are never replaced, 404 and 400 are answers.
- **Age.** An entry is answered while it is younger than the tenant's duration; an older one
  is dropped when found.
- **Bounds.** At most ``max_entries_per_tenant`` entries per tenant and ``max_bytes`` bytes in
  all (bodies, keys and a fixed overhead per entry); the oldest go first. A tenant that leaves
  the routes, or whose duration becomes 0, loses its entries.

No clock is read here: every call takes ``now`` (seconds on a monotonic clock), so tests need
no sleeps. No asyncio, aiohttp or prometheus_client either.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from router.core.option_values import format_duration
from router.core.routes import DEFAULT_TENANT, RouteTable
from router.settings.serve import StaleSettings

Key = tuple[
    bytes,  # the request target, path and query as received
    tuple[bytes, ...],  # Accept lines
    tuple[bytes, ...],  # user lines, in order
    tuple[bytes, ...],  # uid lines, in order
    tuple[bytes, ...],  # group lines, sorted
    tuple[tuple[bytes, bytes], ...],  # extra lines as (name after the prefix, value), sorted
]

# Memory counted besides the bytes of body and key, close to what CPython (64-bit) holds:
# per entry (the entry, the body object, two dict slots), and per object in a key.
ENTRY_OVERHEAD = 320
KEY_OBJECT_OVERHEAD = 56

# Why a failure was answered stale: metric label and the words of the Warning header.
REASONS: Mapping[str, str] = {
    "unreachable": "the tenant's metrics server is unreachable",
    "timeout": "the tenant's metrics server timed out",
    "tls": "TLS with the tenant's metrics server failed",
    "protocol": "the tenant's metrics server sent a broken response",
    "upstream_500": "the tenant's metrics server answered 500",
    "upstream_503": "the tenant's metrics server answered 503",
    "overloaded": "the tenant has too many requests in flight",
}
_ERROR_KINDS = frozenset({"unreachable", "timeout", "tls", "protocol"})
# Upstream statuses that may be replaced. KEDA's metrics server answers 500 (InternalError)
# when its operator cannot be reached over gRPC, which is what a restart looks like.
_STALE_STATUSES = {500: "upstream_500", 503: "upstream_503"}


def reason_for_error(kind: str) -> str | None:
    """The stale reason for an upstream failure kind (UpstreamError.kind), None if none."""
    return kind if kind in _ERROR_KINDS else None


def reason_for_status(status: int) -> str | None:
    """The stale reason for an upstream answer's status; None: relay it (401, 403, 404, ...)."""
    return _STALE_STATUSES.get(status)


def request_key(forwarded_headers: bytes, target: str) -> Key:
    """The cache key of a request from the header block sent upstream and the raw target.

    ``forwarded_headers`` is ``Forwarded.headers``: after ``forward_headers`` the only
    ``X-Remote-*`` lines left are the identity, in KEDA's names.
    """
    accept: list[bytes] = []
    users: list[bytes] = []
    uids: list[bytes] = []
    groups: list[bytes] = []
    extras: list[tuple[bytes, bytes]] = []
    for line in forwarded_headers.split(b"\r\n"):
        name, _, value = line.partition(b": ")  # forward_headers writes NAME: VALUE, as is
        lname = name.lower()
        if lname == b"accept":
            accept.append(value)
        elif not lname.startswith(b"x-remote-"):
            continue
        elif lname == b"x-remote-user":
            users.append(value)
        elif lname == b"x-remote-uid":
            uids.append(value)
        elif lname == b"x-remote-group":
            groups.append(value)
        elif lname.startswith(b"x-remote-extra-"):
            extras.append((name[len(b"x-remote-extra-") :], value))
    return (
        target.encode("utf-8", "surrogateescape"),
        tuple(accept),
        tuple(users),
        tuple(uids),
        tuple(sorted(groups)),
        tuple(sorted(extras)),
    )


def key_size(key: Key) -> int:
    """Bytes a key holds, estimated: its strings plus an overhead per object."""
    target, accept, users, uids, groups, extras = key
    strings = (target, *accept, *users, *uids, *groups)
    size = sum(map(len, strings)) + sum(len(k) + len(v) for k, v in extras)
    objects = 6 + len(strings) + 3 * len(extras)  # the tuples, the strings, each pair's three
    return size + objects * KEY_OBJECT_OVERHEAD


def warning_header(age: float, reason: str) -> bytes:
    """``Warning: 299 - "stale metric value from <age> ago: <reason>"`` as a header line.

    299 is the code client-go surfaces (it logs the text, kubectl prints it); the agent is
    "-"; the text is a quoted-string without control characters (client-go's
    ParseWarningHeader rejects those) and with '"' and '\\' escaped.
    """
    text = f"stale metric value from {format_age(age)} ago: {REASONS.get(reason, reason)}"
    text = "".join(c for c in text if c.isprintable())
    quoted = text.replace("\\", "\\\\").replace('"', '\\"')
    return b'Warning: 299 - "' + quoted.encode("utf-8") + b'"\r\n'


def format_age(age: float) -> str:
    """Whole seconds, Go style: "0s", "12s", "1m5s"."""
    return format_duration(float(int(max(age, 0.0))))


def durations(table: RouteTable, default: float) -> dict[str, float]:
    """Each routed tenant's stale duration: its own setting, else the default."""
    out = {
        t.name: default if t.serve_stale_for is None else t.serve_stale_for for t in table.tenants
    }
    if table.default is not None:
        out[DEFAULT_TENANT] = default
    return out


class Answer(Protocol):
    """An upstream's answer (``upstream.UpstreamResponse``)."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]: ...
    @property
    def body(self) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Entry:
    body: bytes
    content_type: bytes | None  # the Content-Type header value, None when there was none
    stored_at: float
    size: int


@dataclass(frozen=True, slots=True)
class StaleAnswer:
    """A remembered answer to send instead of a failure: header lines (CRLF-terminated:
    Content-Type, Warning, Age) and body."""

    headers: bytes
    body: bytes
    age: float
    reason: str


@dataclass(frozen=True, slots=True)
class TenantView:
    """What /routes shows of a tenant's stale answers."""

    serve_stale_for: float
    entries: int
    last_served: float | None  # wall-clock time of the last stale answer


class StaleCache:
    """The remembered answers of every tenant, bounded; see the module docstring."""

    def __init__(self, settings: StaleSettings) -> None:
        self.settings = settings
        self._durations: dict[str, float] = {}
        # oldest first: every entry, and each tenant's keys
        self._all: collections.OrderedDict[tuple[str, Key], Entry] = collections.OrderedDict()
        self._by_tenant: dict[str, collections.OrderedDict[Key, None]] = {}
        self._last_served: dict[str, float] = {}
        self.bytes = 0

    # ---- configuration

    def configure(self, tenant_durations: Mapping[str, float]) -> None:
        """The tenants routed now and their durations; others (and those at 0) are forgotten."""
        self._durations = {t: d for t, d in tenant_durations.items() if d > 0}
        for tenant in [t for t in self._by_tenant if t not in self._durations]:
            self.forget(tenant)
        self._last_served = {t: v for t, v in self._last_served.items() if t in tenant_durations}

    def duration(self, tenant: str) -> float:
        """The tenant's stale duration in seconds, 0 when off."""
        return self._durations.get(tenant, 0.0)

    def key_for(self, tenant: str, forwarded_headers: bytes, target: str) -> Key | None:
        """The request's key when the tenant has stale answers on, else None (nothing to do)."""
        if tenant not in self._durations:
            return None
        return request_key(forwarded_headers, target)

    # ---- remembering

    def remember(self, tenant: str, key: Key, answer: Answer, now: float) -> bool:
        """Remember an upstream answer if it may be answered later (a 200 without a
        Content-Encoding, for a tenant with stale answers on); True when remembered."""
        if answer.status != 200 or tenant not in self._durations:
            return False
        body = answer.body
        content_type = None
        for name, value in answer.headers:
            lname = name.lower()
            if lname == b"content-type":
                content_type = value
            elif lname == b"content-encoding" and value.strip().lower() != b"identity":
                return False
        size = len(body) + (len(content_type) if content_type else 0) + key_size(key)
        size += ENTRY_OVERHEAD
        if size > self.settings.max_bytes:
            return False
        self._drop(tenant, key)
        self._all[(tenant, key)] = Entry(body, content_type, now, size)
        keys = self._by_tenant.setdefault(tenant, collections.OrderedDict())
        keys[key] = None
        self.bytes += size
        while len(keys) > self.settings.max_entries_per_tenant:
            self._drop(tenant, next(iter(keys)))
        while self.bytes > self.settings.max_bytes:
            old_tenant, old_key = next(iter(self._all))
            self._drop(old_tenant, old_key)
        return True

    def forget(self, tenant: str) -> None:
        for key in list(self._by_tenant.get(tenant, ())):
            self._drop(tenant, key)
        self._by_tenant.pop(tenant, None)

    def _drop(self, tenant: str, key: Key) -> None:
        entry = self._all.pop((tenant, key), None)
        if entry is None:
            return
        self.bytes -= entry.size
        keys = self._by_tenant[tenant]
        del keys[key]
        if not keys:
            del self._by_tenant[tenant]

    # ---- answering

    def lookup(self, tenant: str, key: Key, now: float) -> Entry | None:
        """The remembered answer for key if younger than the tenant's duration (an older one
        is dropped)."""
        entry = self._all.get((tenant, key))
        if entry is None:
            return None
        if now - entry.stored_at >= self.duration(tenant):
            self._drop(tenant, key)
            return None
        return entry

    def answer(
        self, tenant: str, key: Key | None, reason: str | None, now: float, wall: float
    ) -> StaleAnswer | None:
        """The stale answer for a failed request, or None (answer the failure): a reason to
        answer stale, a key, and a remembered answer younger than the duration are needed."""
        if key is None or reason is None:
            return None
        entry = self.lookup(tenant, key, now)
        if entry is None:
            return None
        age = max(now - entry.stored_at, 0.0)
        self._last_served[tenant] = wall
        headers = b"".join(
            (
                b""
                if entry.content_type is None
                else b"Content-Type: " + entry.content_type + b"\r\n",
                warning_header(age, reason),
                b"Age: %d\r\n" % int(age),
            )
        )
        return StaleAnswer(headers, entry.body, age, reason)

    # ---- observation

    def entries(self, tenant: str) -> int:
        return len(self._by_tenant.get(tenant, ()))

    def view(self, tenant: str) -> TenantView:
        return TenantView(
            self.duration(tenant), self.entries(tenant), self._last_served.get(tenant)
        )
