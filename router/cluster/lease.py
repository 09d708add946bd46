"""Leader election on a coordination.k8s.io/v1 Lease (client-go's Lease lock).

Only the holder writes NetworkPolicies. Failed Lease requests are retried with the project's
one backoff policy (``router.cluster.retry``), Retry-After honoured up to the renew deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio.client import ApiClient

from router import logs
from router.cluster import client as kube
from router.cluster.retry import Backoff
from router.settings import LeaderElectionSettings

logger = logging.getLogger(__name__)

LEASE_API = "coordination.k8s.io/v1"


def default_identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def _micro_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """client-go's Lease lock: acquire when free or expired, renew, release on shutdown.

    Expiry is judged on this replica's monotonic clock from the moment it last saw the Lease
    record change (as client-go does), so clock skew between replicas does not matter.
    """

    def __init__(
        self,
        api: ApiClient,
        settings: LeaderElectionSettings,
        on_change: Callable[[bool], None],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.s = settings
        self.identity = settings.identity or default_identity()
        self.on_change = on_change
        self.clock = clock
        self.wall_clock = wall_clock
        self.is_leader = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self._path = kube.resource_path(
            "leases", api_version=LEASE_API, namespace=settings.namespace, name=settings.lease_name
        )

    def _spec(self, transitions: int, acquire: str | None) -> dict[str, Any]:
        now = _micro_time(self.wall_clock())
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, math.ceil(self.s.lease_duration)),
            "acquireTime": acquire or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards."""
        try:
            lease = await kube.request(self.api, "GET", self._path)
        except kube.KubeNotFound:
            body = {
                "apiVersion": LEASE_API,
                "kind": "Lease",
                "metadata": {"name": self.s.lease_name, "namespace": self.s.namespace},
                "spec": self._spec(0, None),
            }
            collection = self._path.rsplit("/", 1)[0]
            try:
                await kube.request(self.api, "POST", collection, body=body)
            except kube.KubeConflict:
                return False  # another replica created it first
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        now = self.clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.s.lease_duration)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False  # held by another replica and not expired
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder != self.identity:
            transitions += 1
        lease["spec"] = self._spec(
            transitions, spec.get("acquireTime") if holder == self.identity else None
        )
        try:
            await kube.request(self.api, "PUT", self._path, body=lease)
        except kube.KubeConflict:
            return False  # someone else wrote it in between
        return True

    def _set(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            logger.info(
                "leader election %s",
                "acquired" if leader else "lost",
                extra=logs.fields(
                    lease=f"{self.s.namespace}/{self.s.lease_name}", identity=self.identity
                ),
            )
            self.on_change(leader)

    async def step(self) -> kube.KubeError | None:
        """One round: try to acquire or renew; step down when the renew deadline passed.
        Returns the error of a failed Lease request (None when the API answered)."""
        failure: kube.KubeError | None = None
        try:
            ok = await self.try_acquire_or_renew()
        except kube.KubeError as exc:
            logger.warning(
                "leader election: lease request failed", extra=logs.fields(error=str(exc))
            )
            ok, failure = None, exc
        now = self.clock()
        if ok:
            self._last_renew = now
            self._set(True)
        elif ok is False or now - self._last_renew > self.s.renew_deadline:
            self._set(False)
        return failure

    async def run(self) -> None:
        """Acquire and renew every retry period until cancelled. After a failed Lease request
        the next try follows the one retry policy: a server's Retry-After is honoured, up to
        the renew deadline (waiting longer would lose the Lease anyway)."""
        backoff = Backoff(
            initial=self.s.retry_period,
            maximum=max(self.s.retry_period, self.s.renew_deadline),
            factor=1.0,
            jitter=0.0,
        )
        while True:
            failure = await self.step()
            if failure is None:
                backoff.reset()
                await asyncio.sleep(self.s.retry_period)
            else:
                await backoff.sleep(failure.retry_after)

    async def release(self) -> None:
        """Give the Lease up (holder cleared), so another replica takes over at once."""
        if not self.is_leader:
            return
        self._set(False)
        try:
            lease = await kube.request(self.api, "GET", self._path)
            if (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            now = _micro_time(self.wall_clock())
            lease["spec"] |= {
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": now,
                "acquireTime": now,
            }
            await kube.request(self.api, "PUT", self._path, body=lease)
            logger.info(
                "leader election released",
                extra=logs.fields(lease=f"{self.s.namespace}/{self.s.lease_name}"),
            )
        except kube.KubeError as exc:
            logger.warning("leader election: release failed", extra=logs.fields(error=str(exc)))
