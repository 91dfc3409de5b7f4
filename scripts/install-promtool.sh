#!/usr/bin/env bash
# Installs promtool (Prometheus's metrics linter) from Debian's `prometheus` package if it is
# not on the machine. Idempotent. The metrics tests run `promtool check metrics` on every
# process's /metrics. Prints the path of the binary on its last line.
set -euo pipefail
if ! command -v promtool >/dev/null 2>&1; then
  # The package's service is not started in a container (no init); only promtool is used.
  bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" promtool prometheus
fi
command -v promtool
