#!/usr/bin/env bash
# `make bench`: install what the benchmark needs (Debian packages), then run bench/bench.py.
# A benchmark, not a test: it prints figures, writes bench/results.md, never fails on a number.
# BENCH_QUICK=1 for a ~1-minute run; arguments are passed to bench/bench.py (see --help).
set -uo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ab >/dev/null 2>&1 || need+=(apache2-utils)
command -v nginx >/dev/null 2>&1 || need+=(nginx)
if [ ${#need[@]} -gt 0 ]; then
  sudo=()
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then sudo=(sudo); fi
  echo "bench: installing Debian packages: ${need[*]}"
  "${sudo[@]}" apt-get update -qq || echo "bench: apt-get update failed" >&2
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    "${need[@]}" >/dev/null ||
    echo "bench: could not install ${need[*]}: without nginx the NGINX rows are skipped" >&2
fi
if ! command -v ab >/dev/null 2>&1; then
  echo "bench: ApacheBench (ab, Debian package apache2-utils) is required; nothing measured" >&2
  exit 0
fi
exec .venv/bin/python bench/bench.py "$@"
