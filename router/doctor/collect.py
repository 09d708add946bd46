"""The doctor's whole snapshot: the router's own /metrics, then the routes file or the cluster,
then a TLS probe of every tenant's metrics server. ``checks`` judge it; nothing here decides."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from router.core.routes import RoutesError, parse_routes_file
from router.doctor import gather, probes
from router.doctor.snapshot import RouterState, RoutesFile, Snapshot


async def collect(
    routes_file: Path | None,
    kubeconfig: Path | None,
    inputs: gather.ClusterInputs,
    tls: probes.ClientTLS,
    network: probes.Network,
    metrics_url: str | None,
    *,
    router_cn: str,
    expiry_warning: float,
) -> Snapshot:
    """Gather the whole snapshot (routes-file mode or cluster mode)."""
    if metrics_url is not None:
        router = await probes.read_router(metrics_url, network.timeout)
    else:
        router = RouterState(
            "",
            skipped="no --metrics-url (kubectl -n metrics-router port-forward "
            "svc/metrics-router 9090, then --metrics-url http://127.0.0.1:9090)",
        )
    snapshot = Snapshot(
        now=probes.now(), router_cn=router_cn, router=router, expiry_warning=expiry_warning
    )
    if routes_file is not None:
        try:
            text = await asyncio.to_thread(Path(routes_file).read_text)
            table = parse_routes_file(text)
        except (OSError, RoutesError) as exc:
            return replace(
                snapshot,
                routes_file=RoutesFile(str(routes_file), error=str(exc)),
                trust_skipped="the routes file could not be read",
            )
        trust = await probes.probe_tenants(table, tls, network)
        tenants = {t.name: t.namespaces for t in table.tenants}
        return replace(snapshot, routes_file=RoutesFile(str(routes_file), tenants), trust=trust)
    got = await gather.read(kubeconfig, inputs, network, router_via_api=router.skipped is not None)
    if got.cluster is None:
        return replace(snapshot, cluster_error=got.error, trust_skipped="no cluster")
    if got.router is not None:
        snapshot = replace(snapshot, router=got.router)
    trust = await probes.probe_tenants(
        got.table, tls, network, got.cluster.endpoints, got.cluster.tenancy.upstreams
    )
    return replace(snapshot, cluster=got.cluster, trust=trust)
