"""What every part of the benchmark shares: paths, tenants, the request, the HPA identity, log."""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BENCH = ROOT / "bench"


RESULTS = BENCH / "results.md"


VENV_BIN = Path(sys.executable).parent


TENANTS = ("a", "b", "c", "h")  # h: the hanging tenant of the isolation scenario


METRIC_PATH = (
    "/apis/external.metrics.k8s.io/v1beta1/namespaces/{ns}/s0-prometheus"
    "?labelSelector=scaledobject.keda.sh%2Fname%3Dapp-scaler"
)


HPA_IDENTITY = (
    ("X-Remote-User", "system:serviceaccount:kube-system:horizontal-pod-autoscaler"),
    ("X-Remote-Group", "system:serviceaccounts"),
    ("X-Remote-Group", "system:authenticated"),
)


# Idle keep-alive connections kept per upstream, for the router and NGINX alike: as many as the
# router's per-tenant in-flight limit, so c=64 does not close and re-open connections.
KEEPALIVE = 64


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)
