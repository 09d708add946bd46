"""A tenant upstream that accepts requests and never answers (for the isolation scenario).

A KedaStub (mTLS, router client CA enforced) with ``behaviour.hang`` set: TLS completes, the
request is read, and the answer never comes until the stub stops. Prints ``listening on URL``
once it accepts connections; stops on SIGTERM/SIGINT.

    python bench/hang_stub.py --pki DIR --tenant h --port N
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from router.devtools.keda_stub import KedaStub, serve_forever
from router.devtools.pki import Pki


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--tenant", default="h")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    pki = Pki.at(args.pki, tenants=(args.tenant,))
    stub = KedaStub(
        tenant=args.tenant,
        cert_file=pki.upstream_cert(args.tenant),
        key_file=pki.upstream_key(args.tenant),
        client_ca_file=pki.router_client_ca,
    )
    stub.behaviour.hang = True
    asyncio.run(serve_forever(stub, "127.0.0.1", args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
