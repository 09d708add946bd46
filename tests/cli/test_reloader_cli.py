"""`metrics-router reloader` started where there is no cluster: one line that fits the reloader."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.cli import main as cli


def test_without_a_cluster_the_error_suggests_what_the_reloader_takes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    argv = ["reloader", "--tenant", "tenant-a", "--health-bind-address", "0", "--", "/bin/true"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "no Kubernetes client configuration found" in err
    assert "--routes-file" not in err  # a flag the reloader does not have
    assert "or give --kubeconfig" in err
    assert "Traceback" not in err
