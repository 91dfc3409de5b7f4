#!/usr/bin/env bash
# Installs headless Chromium from Debian's `chromium` package if it is not on the machine.
# Idempotent. scripts/status-screenshot uses it to check the /status page in a real browser.
# Prints the path of the binary on its last line.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" chromium chromium fonts-dejavu-core
fi
command -v chromium || command -v chromium-browser
