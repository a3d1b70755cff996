#!/usr/bin/env bash
# System packages the tests use: a real PostgreSQL server (started by the tests on loopback)
# and promtool (checks the metrics exposition), and the Kubernetes control plane of the
# end-to-end tests (scripts/k8s-build.sh). Installs or builds only what is missing.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "test-deps: missing ${need[*]}; install them (apt-get install ${need[*]}) or run as root" >&2
    exit 1
  fi
  echo "test-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The Debian packages start system services; the tests start their own servers on loopback.
  service postgresql stop >/dev/null 2>&1 || true
  service prometheus stop >/dev/null 2>&1 || true
fi
# The end-to-end tests' Kubernetes control plane (built once into a cache outside the repo).
bash "$(dirname "$0")/k8s-build.sh"
