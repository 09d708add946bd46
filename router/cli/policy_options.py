"""The NetworkPolicy flags of `serve` and the settings built from them (CLI code; the lead
moves it under router/cli/ later)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from router.cli.tenancy_options import tenancy_from_args
from router.cluster.lease import default_identity
from router.cluster.policy_loop import PolicySyncSettings
from router.core.option_values import parse_duration
from router.core.policy import (
    KIND_NETWORKPOLICY,
    KINDS,
    ManifestError,
    PolicyConfig,
    parse_policy_config,
)
from router.settings import LeaderElectionSettings, TenancySettings

logger = logging.getLogger(__name__)


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """NetworkPolicy flags of `serve` (see docs/network-policies.md)."""
    g = parser.add_argument_group("network policies")
    g.add_argument(
        "--manage-network-policies",
        action="store_true",
        help="apply the tenants' NetworkPolicies with server-side apply and prune owned ones "
        "no tenant wants (needs the cluster API)",
    )
    g.add_argument(
        "--network-policy-kind",
        choices=KINDS,
        default=KIND_NETWORKPOLICY,
        help="networkpolicy (networking.k8s.io/v1) or cilium (CiliumClusterwideNetworkPolicy); "
        "default %(default)s",
    )
    g.add_argument("--policy-config", type=Path, help="policy config YAML (re-read on change)")
    g.add_argument(
        "--policy-resync-period",
        default="5m",
        help="re-apply everything this often, reverting hand edits (default %(default)s)",
    )
    g.add_argument(
        "--leader-elect",
        type=_bool,
        nargs="?",
        const=True,
        default=True,
        help="only the holder of the Lease writes policies (default true; "
        "--leader-elect=false for a single replica)",
    )
    g.add_argument(
        "--leader-election-namespace",
        default="metrics-router",
        help="namespace of the Lease (default %(default)s)",
    )
    g.add_argument(
        "--leader-election-lease-name",
        default="metrics-router",
        help="name of the Lease (default %(default)s)",
    )
    g.add_argument(
        "--leader-elect-lease-duration",
        default="15s",
        help="how long a Lease not renewed stays held; standbys wait this long "
        "(default %(default)s)",
    )
    g.add_argument(
        "--leader-elect-renew-deadline",
        default="10s",
        help="the holder steps down when it could not renew for this long (default %(default)s)",
    )
    g.add_argument(
        "--leader-elect-retry-period",
        default="2s",
        help="time between attempts to acquire or renew (default %(default)s)",
    )


def policy_settings_from_args(
    args: argparse.Namespace, errors: list[str]
) -> PolicySyncSettings | None:
    """Settings from the flags, or None without --manage-network-policies; problems are
    appended to ``errors`` (the policy config file is read and checked here)."""
    if not args.manage_network_policies:
        return None
    durations: dict[str, float] = {}
    for flag in (
        "policy_resync_period",
        "leader_elect_lease_duration",
        "leader_elect_renew_deadline",
        "leader_elect_retry_period",
    ):
        name = "--" + flag.replace("_", "-")
        try:
            durations[flag] = parse_duration(str(getattr(args, flag)))
            if durations[flag] <= 0:
                errors.append(f"{name}: must be > 0")
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
            durations[flag] = 1.0
    le = LeaderElectionSettings(
        enabled=bool(args.leader_elect),
        namespace=args.leader_election_namespace,
        lease_name=args.leader_election_lease_name,
        identity=default_identity(),
        lease_duration=durations["leader_elect_lease_duration"],
        renew_deadline=durations["leader_elect_renew_deadline"],
        retry_period=durations["leader_elect_retry_period"],
    )
    if not le.retry_period < le.renew_deadline < le.lease_duration:
        errors.append(
            "leader election: want --leader-elect-retry-period < --leader-elect-renew-deadline "
            "< --leader-elect-lease-duration"
        )
    config = PolicyConfig()
    if args.policy_config is not None:
        try:
            config = parse_policy_config(Path(args.policy_config).read_text())
        except OSError as exc:
            errors.append(f"--policy-config: {exc}")
        except ManifestError as exc:
            errors.extend(f"--policy-config {args.policy_config}: {e}" for e in exc.errors)
    # The tenancy flags share serve's parser; their problems are reported by serve's own check.
    root_label = TenancySettings().tenant_root_label
    if hasattr(args, "tenant_root_label"):
        root_label = tenancy_from_args(args, []).tenant_root_label
    return PolicySyncSettings(
        kind=args.network_policy_kind,
        tenant_root_label=root_label,
        config=config,
        config_path=args.policy_config,
        resync_period=durations["policy_resync_period"],
        leader_election=le,
    )
