"""Hostile peers for the benchmark's `hostile` scenario (bench/README.md, "Hostile input").

- ``python bench/hostile.py upstream --pki DIR --port N``: a tenant upstream (mTLS, tenant h's
  serving certificate) that misbehaves by namespace: ``flood-body`` (Content-Length 100 MiB),
  ``flood-chunked`` (100 MiB of chunks), ``flood-header`` (100 MiB of header lines),
  ``surplus`` (a second, unasked answer after the first). Prints ``listening on`` when ready.
- client attacks (blocking sockets, used by bench.py): a pipelining client that never reads,
  slow-body clients without a certificate, and one request through a flooding tenant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import ssl
import sys
import time
from pathlib import Path

FLOOD = 100 << 20
CHUNK = 1 << 16
FLOOD_NAMESPACES = ("flood-body", "flood-chunked", "flood-header")


# ---------------------------------------------------------------------------------- upstream


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1]
            ns = target.split(b"/namespaces/", 1)[-1].split(b"/", 1)[0].decode()
            if ns == "flood-body":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % FLOOD)
                await _flood(writer, b"x" * CHUNK)
            elif ns == "flood-chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                await _flood(writer, b"%x\r\n" % CHUNK + b"x" * CHUNK + b"\r\n")
            elif ns == "flood-header":
                writer.write(b"HTTP/1.1 200 OK\r\n")
                await _flood(writer, b"X-Flood: " + b"y" * 1014 + b"\r\n")
            else:  # surplus: the answer, then one nobody asked for
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                    b"\r\n{}HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nEVIL!"
                )
                await writer.drain()
                continue
            return  # a flood ends the connection
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def _flood(writer: asyncio.StreamWriter, chunk: bytes) -> None:
    sent = 0
    while sent < FLOOD:
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)


def upstream_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hostile.py upstream")
    p.add_argument("--pki", type=Path, required=True)
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(a.pki / "upstream-h.crt", a.pki / "upstream-h.key")
    ctx.load_verify_locations(a.pki / "router-client-ca.crt")
    ctx.verify_mode = ssl.CERT_REQUIRED

    async def main() -> None:
        server = await asyncio.start_server(_serve, "127.0.0.1", a.port, ssl=ctx)
        print(f"listening on https://127.0.0.1:{a.port}", flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


# ----------------------------------------------------------------------------------- clients


def client_context(pki: Path, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "router-serving-ca.crt"))
    ctx.check_hostname = False
    if cert:
        ctx.load_cert_chain(pki / "front-proxy-client.crt", pki / "front-proxy-client.key")
    return ctx


def request(path: str, identity: tuple[tuple[str, str], ...], extra: str = "") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: router", *(f"{k}: {v}" for k, v in identity)]
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


def one_request(port: int, ctx: ssl.SSLContext, data: bytes, timeout: float = 60.0) -> str:
    """Send data, read until the router closes; the status line and bytes received."""
    received = b""
    total = 0
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw) as s,
    ):
        s.sendall(data)
        with contextlib.suppress(OSError):
            while chunk := s.recv(1 << 20):
                if len(received) < 200:
                    received += chunk[:200]
                total += len(chunk)
    status = received.split(b"\r\n", 1)[0].decode(errors="replace")
    return f"{status or 'closed'} ({total} bytes)"


def pipeline_without_reading(
    port: int, ctx: ssl.SSLContext, data: bytes, seconds: float
) -> tuple[ssl.SSLSocket, int]:
    """Write pipelined requests and never read, for at most ``seconds`` or until the router
    stops reading (a send blocks for 2 s). Returns the open socket and the bytes sent."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = ctx.wrap_socket(raw)
    s.settimeout(2.0)
    block = data * 1000
    sent = 0
    deadline = time.monotonic() + seconds
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline:
            s.sendall(block)
            sent += len(block)
    return s, sent


def slow_bodies_without_certificate(
    port: int, ctx: ssl.SSLContext, path: str, n: int, wait: float
) -> int:
    """n connections without a certificate send a head with Content-Length 1000 and one byte;
    how many the router still holds open after ``wait`` seconds."""
    socks = []
    for _ in range(n):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        s = ctx.wrap_socket(raw)
        s.sendall(request(path, (), "Content-Length: 1000\r\n") + b"x")
        socks.append(s)
    time.sleep(wait)
    still_open = 0
    for s in socks:
        s.settimeout(0.05)
        try:
            while s.recv(65536):
                pass
        except TimeoutError:
            still_open += 1  # nothing more to read, and not closed
        except OSError:
            pass
        s.close()
    return still_open


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "upstream":
        sys.exit(upstream_main(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
