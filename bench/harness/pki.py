"""The benchmark's PKI: generated once per run; private router copies; rotation under load."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness.common import TENANTS


def make_pki(workdir: Path) -> Path:
    from router.devtools.pki import generate_pki

    pki = generate_pki(workdir / "pki", tenants=TENANTS)
    # ab -E wants one PEM file: certificate, then key.
    for name in ("front-proxy-client", "router-client"):
        (workdir / f"{name}.pem").write_bytes(
            (pki.directory / f"{name}.crt").read_bytes()
            + (pki.directory / f"{name}.key").read_bytes()
        )
    return pki.directory


def router_certs(pki: Path, dest: Path) -> Path:
    """A private copy of the router's own certificates (so rotating one never touches another)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("router-serving", "router-client"):
        for ext in ("crt", "key"):
            shutil.copy2(pki / f"{name}.{ext}", dest / f"{name}.{ext}")
    return dest


def rotate_cert(pki: Path, dest: Path, which: str) -> None:
    """Issue a fresh router serving or client certificate into dest (key first, then cert)."""
    from router.devtools import pki as certs

    if which == "serving":
        ca = certs.CertAndKey.load(pki / "router-serving-ca.crt", pki / "router-serving-ca.key")
        leaf = certs.issue_cert(
            ca,
            certs.ROUTER_SERVICE,
            server=True,
            dns_names=certs.ROUTER_SERVING_DNS,
            ip_addresses=certs.LOOPBACK_IPS,
        )
    else:
        ca = certs.CertAndKey.load(pki / "router-client-ca.crt", pki / "router-client-ca.key")
        leaf = certs.issue_cert(ca, certs.ROUTER_CLIENT_CN, client=True)
    leaf.write(dest / f"router-{which}.crt", dest / f"router-{which}.key")
