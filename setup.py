"""Optional compiled build: ``METRICS_ROUTER_COMPILE=1`` compiles the request path's hot
modules with mypyc (needs mypy and a C compiler at build time; the Dockerfile does this).

Without it (the default, ``make install``) the package is pure Python and behaves the same:
every other setting lives in pyproject.toml.
"""

import os

from setuptools import setup

# The modules every proxied request runs through (bench/README.md, "Compiled build").
COMPILED = ["router/proxy.py", "router/http/server.py", "router/http/client.py"]

ext_modules = []
if os.environ.get("METRICS_ROUTER_COMPILE", "") not in ("", "0"):
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, opt_level="3", group_name="metrics_router")

setup(ext_modules=ext_modules)
