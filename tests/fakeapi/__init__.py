"""A fake Kubernetes API server over real TLS, driven by the real kubernetes-asyncio client.

See ``tests/fakeapi/server.py`` for the protocol it speaks and the helpers tests call.
"""

from tests.fakeapi.server import FakeKube
from tests.fakeapi.waiting import Signal, fast_backoff, running

__all__ = ["FakeKube", "Signal", "fast_backoff", "running"]
