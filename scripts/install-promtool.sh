#!/usr/bin/env bash
# Installs promtool (Prometheus's metrics linter) from Debian's `prometheus` package if it is
# not on the machine. Idempotent. The metrics tests run `promtool check metrics` on every
# process's /metrics. Prints the path of the binary on its last line.
set -euo pipefail
if ! command -v promtool >/dev/null 2>&1; then
  echo "installing promtool (Debian package prometheus)" >&2
  if [ "$(id -u)" != 0 ]; then
    echo "error: promtool is missing and installing it needs root (apt-get install prometheus)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || { echo "error: apt-get update failed; check that Debian's mirrors are reachable" >&2; exit 1; }
  # The package's service is not started in a container (no init); only promtool is used.
  apt-get install -y -qq --no-install-recommends prometheus >&2 || {
    echo "error: could not install Debian's prometheus package (for promtool)" >&2
    exit 1
  }
fi
command -v promtool
