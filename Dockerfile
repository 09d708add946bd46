# syntax=docker/dockerfile:1
# metrics-router: one console script, `metrics-router <serve|reloader|render|certs|demo>`.
#
#   docker build -t registry.example.com/metrics-router:0.1.0 .
#
# Base pinned by tag; for reproducible release builds pin the digest too, e.g.
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: wheels for the project and its runtime dependencies, installed into a venv ------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY router ./router
# The compiled build (setup.py): the request path's hot modules compiled with mypyc, which
# needs mypy and a C compiler here only; the runtime stage gets the wheel.
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
 && python -m pip install "mypy>=1.11" "setuptools>=68" wheel \
 && METRICS_ROUTER_COMPILE=1 python -m pip wheel --no-build-isolation --no-deps \
      --wheel-dir /wheels . \
 && ls /wheels/tenant_metrics_router-*-cp3*-linux_*.whl \
 && python -m pip wheel --wheel-dir /wheels --find-links /wheels tenant-metrics-router \
 && python -m venv /opt/metrics-router \
 && /opt/metrics-router/bin/pip install --no-index --find-links /wheels tenant-metrics-router \
 && /opt/metrics-router/bin/pip uninstall --yes pip setuptools wheel \
 && /opt/metrics-router/bin/metrics-router --help >/dev/null

# --- runtime: the venv only (no compiler, no pip, no source tree, no dev dependencies) -------
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/metrics-router/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/metrics-router /opt/metrics-router
# Non-root, numeric so that runAsNonRoot can verify it; matches the manifests' runAsUser.
USER 65532:65532
# 6443: secure port (APIService backend); 9090: /metrics and /routes.
EXPOSE 6443 9090
ENTRYPOINT ["metrics-router"]
CMD ["--help"]
