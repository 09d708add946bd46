"""A fake Kubernetes API server over real TLS, driven by the real kubernetes-asyncio client."""

from tests.fakeapi.server import FakeKube, Signal, fast_backoff, running

__all__ = ["FakeKube", "Signal", "fast_backoff", "running"]
