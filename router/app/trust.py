"""The TLS material of the two sides: what the secure port trusts of the aggregator
(AggregatorTrust) and the router's own client certificate for its upstream calls."""

from __future__ import annotations

import logging
from typing import Any

from router import logs, tls
from router.app.errors import StartupError
from router.metrics import (
    ProxyMetrics,
    ReloadState,
)
from router.proxy import IdentityHeaders
from router.settings.serve import RequestHeaderSettings, ServeConfig

logger = logging.getLogger("router.app")  # the name operators filter on


class AggregatorTrust:
    """What the secure port trusts of the aggregator: the serving certificate and the
    requestheader CA in one TLS context (validate, then swap), and the identity header names.
    The ConfigMap (cluster mode) may change both; the files are re-read by the FileWatcher."""

    def __init__(self, config: ServeConfig, metrics: ProxyMetrics, reload_state: ReloadState):
        self._config = config
        self._metrics = metrics
        self._reload_state = reload_state
        self.settings: RequestHeaderSettings = config.requestheader
        self.identity = IdentityHeaders.from_settings(config.requestheader)
        self.serving: tls.ReloadingContext | None = None  # built once the settings are known

    def build(self) -> tls.ReloadingContext:
        """Load the serving certificate and the CA (once the settings are known)."""
        try:
            self.serving = tls.ReloadingContext(
                "serving", self._source(), _build_serving, expiry_of=("serving", "requestheader-ca")
            )
        except tls.TLSFileError as exc:
            raise StartupError(str(exc)) from exc
        return self.serving

    def update(self, settings: RequestHeaderSettings) -> None:
        """New requestheader settings (from the ConfigMap). Before the TLS context is built (the
        first read, at start), they are simply taken; later they are validated, then applied to
        new handshakes, and the identity header names to the next request."""
        if self.serving is None:
            self.settings = settings
            self.identity = IdentityHeaders.from_settings(settings)
            return
        old = self.settings
        self.settings = settings
        try:
            self.serving.set_source(self._source())
        except (tls.TLSFileError, StartupError) as exc:
            self.settings = old
            self._metrics.reloads.labels("requestheader", "failure").inc()
            self._reload_state.set("requestheader", False)
            logger.error(
                "requestheader settings refused, keeping the last good",
                extra=logs.fields(source="configmap", error=str(exc)),
            )
            return
        self.identity = IdentityHeaders.from_settings(settings)
        self._metrics.reloads.labels("requestheader", "success").inc()
        self._reload_state.set("requestheader", True)
        names = ",".join(settings.allowed_names) or "(any from the CA)"
        logger.info("requestheader settings applied", extra=logs.fields(allowed_names=names))

    def _source(self) -> tls.Source:
        files = {
            "serving": self._config.tls_cert_file,
            "serving-key": self._config.tls_private_key_file,
        }
        rh = self.settings
        read_files = tls.read_files(files)
        if rh.client_ca_file is not None:
            ca_file = rh.client_ca_file

            def read() -> dict[str, bytes]:
                return {**read_files(), "requestheader-ca": ca_file.read_bytes()}

            return read
        pem = rh.client_ca_pem
        if pem is None:
            raise StartupError("no requestheader client CA: set --requestheader-client-ca-file")

        def read_with_pem() -> dict[str, bytes]:
            return {**read_files(), "requestheader-ca": pem}

        return read_with_pem


def _build_serving(d: dict[str, bytes]) -> Any:
    return tls.server_context(d["serving"], d["serving-key"], d["requestheader-ca"])


def load_client_tls(config: ServeConfig) -> tls.ReloadingContext:
    """The router's own client certificate (and the upstream CA) for its upstream calls."""
    files = {
        "proxy-client": config.proxy_client_cert_file,
        "proxy-client-key": config.proxy_client_key_file,
    }
    if config.upstream_ca_file is not None:
        files["upstream-ca"] = config.upstream_ca_file
    try:
        return tls.ReloadingContext(
            "proxy-client",
            tls.read_files(files),
            lambda d: tls.client_context(
                d["proxy-client"], d["proxy-client-key"], d.get("upstream-ca")
            ),
            expiry_of=("proxy-client", "upstream-ca"),
        )
    except tls.TLSFileError as exc:
        raise StartupError(str(exc)) from exc
