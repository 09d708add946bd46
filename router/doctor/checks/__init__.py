"""The doctor's checks: pure functions from a :class:`Snapshot` to results (no I/O, no clock).

Each ``check_*`` function returns a list of :class:`CheckResult`; :func:`run_checks` runs them
all in the order of the report. A failure carries its evidence and one concrete fix. The fix
texts name flags and the files of deploy/ that set them, so an operator can act on them.

``results`` (CheckResult, the sections, shared helpers), ``aggregation`` (1-3: APIService,
serving certificate, requestheader trust), ``tenants`` (4-5: routes, trust chains),
``boundaries`` (6-7: traffic policies, tenant KEDA settings), ``router_itself`` (8).
"""

from __future__ import annotations

from collections.abc import Sequence

from router.doctor.checks.aggregation import check_apiservice, check_requestheader, check_serving
from router.doctor.checks.boundaries import check_keda, check_traffic, contains, flag_value
from router.doctor.checks.results import (
    DOCTOR_GROUP,
    DOCTOR_USER,
    SECTIONS,
    CheckResult,
    Status,
    pem_certificates,
)
from router.doctor.checks.router_itself import check_router
from router.doctor.checks.tenants import check_routes, check_trust
from router.doctor.snapshot import Snapshot

__all__ = [
    "DOCTOR_GROUP",
    "DOCTOR_USER",
    "SECTIONS",
    "CheckResult",
    "Status",
    "check_apiservice",
    "check_keda",
    "check_requestheader",
    "check_router",
    "check_routes",
    "check_serving",
    "check_traffic",
    "check_trust",
    "contains",
    "exit_code",
    "flag_value",
    "pem_certificates",
    "run_checks",
]


def run_checks(snapshot: Snapshot) -> list[CheckResult]:
    """Every check, in report order."""
    return [
        *check_apiservice(snapshot),
        *check_serving(snapshot),
        *check_requestheader(snapshot),
        *check_routes(snapshot),
        *check_trust(snapshot),
        *check_traffic(snapshot),
        *check_keda(snapshot),
        *check_router(snapshot),
    ]


def exit_code(results: Sequence[CheckResult]) -> int:
    """1 when any check failed, else 0."""
    return 1 if any(r.status == "fail" for r in results) else 0
