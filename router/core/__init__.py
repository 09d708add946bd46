"""The pure core: decisions over plain immutable data (no asyncio, aiohttp, kubernetes_asyncio
or prometheus_client; an import-linter contract keeps it so)."""
