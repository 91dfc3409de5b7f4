#!/usr/bin/env bash
# Installs headless Chromium from Debian's `chromium` package if it is not on the machine.
# Idempotent. scripts/status-screenshot uses it to check the /status page in a real browser.
# Prints the path of the binary on its last line.
set -euo pipefail
bin="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$bin" ]; then
  echo "installing chromium (Debian package chromium)" >&2
  if [ "$(id -u)" != 0 ]; then
    echo "error: chromium is missing and installing it needs root (apt-get install chromium)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || { echo "error: apt-get update failed; check that Debian's mirrors are reachable" >&2; exit 1; }
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2 || {
    echo "error: could not install Debian's chromium package" >&2
    exit 1
  }
  bin="$(command -v chromium)"
fi
echo "$bin"
