"""Scale benchmark of the tenancy control loop: 10,000 namespaces across 1,000 tenants.

Run by hand from the repository root (not collected by pytest)::

    .venv/bin/python bench/bench_tenancy.py [--tenants 1000] [--per-tenant 10] [--repeat 5]

What it measures (CPU seconds of this process, ``time.process_time``; best of --repeat):

- ``first sync (pure)``: parse the raw NamespaceList / ServiceList JSON bodies as the informers
  receive them, build the caches, turn them into NamespaceInfo / ServiceInfo and resolve the
  RouteTable, for each strategy (hnc, label, pattern) with Service discovery;
- ``recompute``: what ClusterRoutes does on every change after the first sync: re-read the
  caches (unchanged objects are memoised), resolve, compare the table with the last one;
- ``first sync (client)``: the whole path through the real kubernetes-asyncio client against
  tests.fakeapi.FakeKube running in a child process (so only the router's CPU is counted): paged
  lists of both resources (500 per page), then the first recompute;
- memory: what the caches, infos and table of one ClusterRoutes hold (tracemalloc), the RSS
  growth of the client run, and the bench process' RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.cluster import client as kube  # noqa: E402
from router.cluster.routes_loop import ClusterRoutes  # noqa: E402
from router.core import tenancy  # noqa: E402
from router.core.tenancy import upstreams  # noqa: E402
from router.settings import TenancySettings  # noqa: E402

KEDA = {"app.kubernetes.io/name": "keda-operator-metrics-apiserver"}
ROOT_LABEL = ("tenancy.metrics-router.io/root", "true")
TENANT_LABEL = "tenancy.metrics-router.io/tenant"
DEPTH = tenancy.HNC_DEPTH_SUFFIX


def managed_fields() -> list[dict[str, Any]]:
    """What a real object carries and the informer strips (realistic parse cost)."""
    return [
        {
            "manager": "hnc-manager",
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2024-01-01T00:00:00Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {".": {}, f"f:{TENANT_LABEL}": {}}}},
        }
    ]


def namespace_objects(tenants: int, per_tenant: int) -> list[dict[str, Any]]:
    """tenant-<t> (HNC root) with children tenant-<t>--<i>, labelled as HNC labels them."""
    out = []
    rv = 1000
    for t in range(tenants):
        root = f"tenant-t{t}"
        for i in range(per_tenant):
            name = root if i == 0 else f"{root}--{i}"
            labels = {
                "kubernetes.io/metadata.name": name,
                f"{name}{DEPTH}": "0",
                TENANT_LABEL: f"t{t}",
            }
            if i == 0:
                labels[ROOT_LABEL[0]] = ROOT_LABEL[1]
            else:
                labels[f"{root}{DEPTH}"] = "1"
            rv += 1
            out.append(
                {
                    "metadata": {
                        "name": name,
                        "uid": f"00000000-0000-0000-0000-{rv:012d}",
                        "resourceVersion": str(rv),
                        "creationTimestamp": "2024-01-01T00:00:00Z",
                        "labels": labels,
                        "annotations": {"hnc.x-k8s.io/subnamespace-of": root} if i else {},
                        "managedFields": managed_fields(),
                    },
                    "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"},
                }
            )
    return out


def service_objects(tenants: int) -> list[dict[str, Any]]:
    out = []
    for t in range(tenants):
        ns = f"tenant-t{t}--1"
        out.append(
            {
                "metadata": {
                    "name": "keda-operator-metrics-apiserver",
                    "namespace": ns,
                    "uid": f"10000000-0000-0000-0000-{t:012d}",
                    "resourceVersion": str(50000 + t),
                    "labels": dict(KEDA),
                    "managedFields": managed_fields(),
                },
                "spec": {
                    "type": "ClusterIP",
                    "clusterIP": f"10.96.{t // 250}.{t % 250 + 1}",
                    "ports": [
                        {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443},
                        {"name": "metrics", "port": 8080, "protocol": "TCP", "targetPort": 8080},
                    ],
                },
            }
        )
    return out


def list_body(kind: str, items: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "99999"}, "items": items}
    ).encode()


def best(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        gc.collect()
        start = time.process_time()
        result = fn()
        times.append(time.process_time() - start)
    return min(times), result


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


STRATEGIES = {
    "hnc": TenancySettings(strategies=("hnc",)),
    "label": TenancySettings(strategies=("label",), tenant_label=TENANT_LABEL),
    "pattern": TenancySettings(
        strategies=("pattern",), tenant_pattern=r"^tenant-(?P<tenant>[a-z0-9]+)(--.+)?$"
    ),
}


def first_sync(ns_body: bytes, svc_body: bytes, settings: TenancySettings) -> tenancy.Resolution:
    # cold: a first sync has not parsed any upstream URL yet
    upstreams._service_url.cache_clear()
    upstreams.template_upstream.cache_clear()
    caches = []
    for body in (ns_body, svc_body):
        cache: dict[str, dict[str, Any]] = {}
        for item in json.loads(body)["items"]:
            item["metadata"].pop("managedFields", None)
            cache[kube.object_key(item)] = item
        caches.append(cache)
    namespaces = [tenancy.NamespaceInfo.from_object(o) for o in caches[0].values()]
    services = [tenancy.ServiceInfo.from_object(o) for o in caches[1].values()]
    return tenancy.resolve(namespaces, services, settings)


# --------------------------------------------------------------------------- through the client


def _serve_fake(directory: str, tenants: int, per_tenant: int, ready: Any, stop: Any) -> None:
    from tests.fakeapi import FakeKube

    async def main() -> None:
        async with FakeKube(Path(directory)) as fake:
            for obj in namespace_objects(tenants, per_tenant):
                fake.put("namespaces", obj)
            for obj in service_objects(tenants):
                fake.put("services", obj)
            ready.set()
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)

    asyncio.run(main())


async def client_first_sync(
    kubeconfig: Path, settings: TenancySettings
) -> tuple[float, int, float]:
    api = await kube.api_client(kubeconfig)
    tables: list[Any] = []
    routes = ClusterRoutes(api, settings, metrics=_metrics(), on_table=tables.append)
    gc.collect()
    before_rss = rss_mib()
    start = time.process_time()
    task = asyncio.create_task(routes.run())
    try:
        await asyncio.wait_for(routes.synced.wait(), 120)
        cpu = time.process_time() - start
        gc.collect()
        grown = rss_mib() - before_rss
        return cpu, tables[0].namespace_count, grown
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()


def _metrics() -> Any:
    from prometheus_client import CollectorRegistry

    from router.metrics import ClusterMetrics

    return ClusterMetrics(CollectorRegistry())


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=1000)
    parser.add_argument("--per-tenant", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-client", action="store_true", help="skip the fake-API run")
    args = parser.parse_args()

    base_rss = rss_mib()
    ns_objs = namespace_objects(args.tenants, args.per_tenant)
    svc_objs = service_objects(args.tenants)
    ns_body, svc_body = list_body("NamespaceList", ns_objs), list_body("ServiceList", svc_objs)
    del ns_objs, svc_objs
    print(
        f"{args.tenants * args.per_tenant} namespaces, {args.tenants} tenants, "
        f"{args.tenants} metrics Services; list bodies {len(ns_body) / 2**20:.1f} MiB + "
        f"{len(svc_body) / 2**20:.1f} MiB of JSON; best of {args.repeat}, CPU seconds\n"
    )
    rows: list[tuple[str, str, str]] = []
    for name, settings in STRATEGIES.items():
        cpu, res = best(functools.partial(first_sync, ns_body, svc_body, settings), args.repeat)
        assert res.table.namespace_count == args.tenants * args.per_tenant, (name, res.unrouted)
        assert len(res.table.tenants) == args.tenants
        rows.append((f"first sync (pure), {name}", f"{cpu:.3f}", ""))

    # recompute as ClusterRoutes does it: memoised infos, resolve, table comparison
    settings = STRATEGIES["hnc"]
    gc.collect()
    tracemalloc.start()
    caches = []
    for body in (ns_body, svc_body):
        cache = {}
        for item in json.loads(body)["items"]:
            item["metadata"].pop("managedFields", None)
            cache[kube.object_key(item)] = item
        caches.append(cache)
    routes = ClusterRoutes(cast(Any, None), settings, metrics=_metrics(), on_table=lambda t: None)
    routes.namespaces.cache = caches[0]
    routes.services.cache = caches[1]
    routes.recompute()
    gc.collect()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    for label in ("hnc", "label", "pattern"):
        routes.settings = STRATEGIES[label]
        cpu, res = best(routes.recompute, args.repeat)
        rows.append((f"recompute, {label}", f"{cpu:.3f}", ""))
    rows.append(("held: caches + infos + table (tracemalloc)", "", f"{held / 2**20:.1f} MiB"))

    if not args.no_client:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = multiprocessing.get_context("spawn")
            ready, stop = ctx.Event(), ctx.Event()
            child = ctx.Process(
                target=_serve_fake, args=(tmp, args.tenants, args.per_tenant, ready, stop)
            )
            child.start()
            try:
                if not ready.wait(120):
                    raise SystemExit("fake API did not start")
                kubeconfig = Path(tmp) / "fake-kubeconfig.yaml"
                cpu, count, grown = asyncio.run(client_first_sync(kubeconfig, settings))
                assert count == args.tenants * args.per_tenant
                rows.append(
                    ("first sync (client, fake API), hnc", f"{cpu:.3f}", f"+{grown:.1f} MiB")
                )
            finally:
                stop.set()
                child.join(30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(("RSS now / peak (whole bench process)", "", f"{rss_mib():.0f} / {peak:.0f} MiB"))
    rows.append(("RSS at start (interpreter + imports)", "", f"{base_rss:.0f} MiB"))

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'CPU s':>7}  {'memory':>14}")
    print(f"{'-' * width}  {'-' * 7}  {'-' * 14}")
    for label, cpu_text, mem in rows:
        print(f"{label:<{width}}  {cpu_text:>7}  {mem:>14}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
