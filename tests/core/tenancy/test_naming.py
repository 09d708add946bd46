"""One tenant naming convention across every default: a newcomer who follows any of them (the
README, `certs init`, the default pattern, the upstream template, the demo) gets names that
agree, so TLS names match and namespaces resolve to the tenant the certificates were made for."""

from __future__ import annotations

import re

import yaml

from router.cli import tenancy_options
from router.core.routes import parse_routes_file
from router.core.tenancy import NamespaceInfo, resolve, tenant_of
from router.devtools import demo
from router.devtools import pki as certs
from router.settings import TenancySettings
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
PATTERN = TenancySettings(strategies=("pattern",))


def test_default_pattern_names_a_tenant_after_its_root_namespace() -> None:
    for ns, tenant in (("tenant-a", "tenant-a"), ("tenant-a--dev", "tenant-a"),
                       ("tenant-a--sys", "tenant-a"), ("tenant-b42", "tenant-b42"),
                       ("kube-system", None), ("a", None)):  # fmt: skip
        assert tenant_of(NamespaceInfo(ns), {}, PATTERN) == tenant, ns


def test_certs_init_defaults_match_the_template_and_the_pattern() -> None:
    template = TenancySettings(
        strategies=("pattern",), upstream_template=tenancy_options.DEFAULT_UPSTREAM_TEMPLATE_EXAMPLE
    )
    for tenant in certs.DEFAULT_TENANTS:
        assert tenant_of(NamespaceInfo(tenant), {}, PATTERN) == tenant
        route = resolve([NamespaceInfo(tenant)], [], template).table.lookup(tenant)
        assert route is not None
        assert route.tenant == tenant
        # The upstream the template points at is a name on the tenant's certificate.
        assert route.upstream.tls_name in certs.upstream_dns_names(tenant)
        assert certs.tenant_namespace(tenant) == f"{tenant}--sys"
        assert tenant_of(NamespaceInfo(certs.tenant_namespace(tenant)), {}, PATTERN) == tenant


def test_readme_routes_example_agrees_with_certs_and_pattern() -> None:
    readme = (ROOT / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if b.startswith("tenants:")
    )
    table = parse_routes_file(block)
    doc = yaml.safe_load(block)
    assert set(doc["tenants"]) <= set(certs.DEFAULT_TENANTS)
    for tenant in table.tenants:
        if tenant.upstream.server_name is not None:
            assert tenant.upstream.server_name in certs.upstream_dns_names(tenant.name)
        for ns in tenant.namespaces:
            assert tenant_of(NamespaceInfo(ns), {}, PATTERN) == tenant.name


def test_demo_tenants_follow_the_convention() -> None:
    assert set(demo.TENANTS) == set(certs.DEFAULT_TENANTS)
    for tenant, (namespaces, _) in demo.TENANTS.items():
        for ns in namespaces:
            assert tenant_of(NamespaceInfo(ns), {}, PATTERN) == tenant
