"""Fixtures of the request-path suites.

- ``client_session`` (function): an aiohttp ClientSession factory presenting the front-proxy
  client certificate, none, or the rogue / other certificates; every session is closed after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from router.devtools.pki import Pki
from tests.conftest import ClientCert, client_ssl_context

SessionFactory = Callable[[ClientCert], aiohttp.ClientSession]


@pytest.fixture
async def client_session(pki: Pki) -> AsyncIterator[SessionFactory]:
    """Factory of aiohttp sessions presenting a client certificate (or none); closed after."""
    sessions: list[aiohttp.ClientSession] = []

    def factory(cert: ClientCert = "front-proxy") -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(ssl=client_ssl_context(pki, cert))
        session = aiohttp.ClientSession(connector=connector)
        sessions.append(session)
        return session

    yield factory
    for session in sessions:
        await session.close()
