"""Development tools: the dev PKI, the KEDA stub and the demo. The serving path never imports
them; only router.cli (for `demo` and `certs`) and the tests do."""
