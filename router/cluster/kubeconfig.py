"""Where the Kubernetes client configuration comes from, found the way kubectl and
controller-runtime find it: ``--kubeconfig``, then ``$KUBECONFIG``, then the in-cluster
service account, then ``~/.kube/config``.

:func:`choose` is the decision (a plain function of the flag, the environment and which files
exist); :func:`load` applies it to a ``Configuration``. Every failure is a :class:`LoadError`
whose message names what was tried and suggests ``--routes-file`` for running without a
cluster.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes_asyncio.client import Configuration

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
NO_CLUSTER_HINT = "to run without a cluster, give --routes-file"


class LoadError(Exception):
    """No usable client configuration; the message says what was tried."""


@dataclass(frozen=True, slots=True)
class Choice:
    """The configuration to load: ``kind`` is flag, env, in-cluster or home."""

    kind: str
    paths: tuple[Path, ...] = ()

    def describe(self) -> str:
        if self.kind == "in-cluster":
            return "in-cluster service account"
        what = {"flag": "--kubeconfig", "env": "$KUBECONFIG", "home": "~/.kube/config"}[self.kind]
        return f"{what} {os.pathsep.join(map(str, self.paths))}"


def choose(
    flag: Path | None,
    environ: Mapping[str, str],
    home: Path | None,
    *,
    is_file: Callable[[Path], bool] = Path.is_file,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> tuple[Choice | None, list[str]]:
    """The first source that applies, and what was tried before it (for the error message)."""
    tried: list[str] = []
    if flag is not None:
        return Choice("flag", (flag,)), tried
    tried.append("--kubeconfig (not given)")
    env = environ.get("KUBECONFIG", "")
    paths = tuple(Path(p) for p in env.split(os.pathsep) if p)
    if paths:
        existing = tuple(p for p in paths if is_file(p))
        if existing:
            return Choice("env", existing), tried
        tried.append(f"$KUBECONFIG={env} (no such file)")
    else:
        tried.append("$KUBECONFIG (not set)")
    host = environ.get("KUBERNETES_SERVICE_HOST")
    port = environ.get("KUBERNETES_SERVICE_PORT")
    token = service_account_dir / "token"
    if host and port and is_file(token):
        return Choice("in-cluster"), tried
    if not (host and port):
        tried.append("in-cluster service account (KUBERNETES_SERVICE_HOST/PORT not set)")
    else:
        tried.append(f"in-cluster service account (no {token})")
    if home is not None:
        default = home / ".kube" / "config"
        if is_file(default):
            return Choice("home", (default,)), tried
        tried.append(f"{default} (no such file)")
    return None, tried


async def load(
    configuration: Configuration,
    flag: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
    service_account_dir: Path = SERVICE_ACCOUNT_DIR,
) -> Choice:
    """Fill ``configuration`` (a kubernetes_asyncio ``Configuration``) from the first source
    that applies; raise LoadError naming what was tried."""
    from kubernetes_asyncio.config import ConfigException, load_kube_config
    from kubernetes_asyncio.config.incluster_config import InClusterConfigLoader

    environ = os.environ if environ is None else environ
    if home is None:
        try:
            home = Path.home()
        except RuntimeError:
            home = None
    choice, tried = choose(flag, environ, home, service_account_dir=service_account_dir)
    if choice is None:
        raise LoadError(
            "no Kubernetes client configuration found; tried "
            + ", ".join(tried)
            + f" ({NO_CLUSTER_HINT})"
        )
    try:
        if choice.kind == "in-cluster":
            loader = InClusterConfigLoader(
                token_filename=str(service_account_dir / "token"),
                cert_filename=str(service_account_dir / "ca.crt"),
                environ=dict(environ),
            )
            loader.load_and_set(client_configuration=configuration)
        else:
            await load_kube_config(
                config_file=os.pathsep.join(map(str, choice.paths)),
                client_configuration=configuration,
                persist_config=False,
            )
    except Exception as exc:  # ConfigException, OSError, YAML errors...: a message, not a trace
        if not isinstance(exc, ConfigException):
            exc = ValueError(f"{type(exc).__name__}: {' '.join(str(exc).split())}")
        raise LoadError(
            f"cannot load Kubernetes client configuration from {choice.describe()}: {exc} "
            f"({NO_CLUSTER_HINT})"
        ) from exc
    return choice
