#!/usr/bin/env bash
# Installs Debian packages for a tool the project needs: `apt-install.sh TOOL PACKAGE...`.
# Needs root; says what to run otherwise. Used by install-promtool.sh and install-chromium.sh.
set -euo pipefail
tool="$1"
shift
echo "installing $tool (Debian package $*)" >&2
if [ "$(id -u)" != 0 ]; then
  echo "error: $tool is missing and installing it needs root (apt-get install $*)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2 || { echo "error: apt-get update failed; check that Debian's mirrors are reachable" >&2; exit 1; }
apt-get install -y -qq --no-install-recommends "$@" >&2 || {
  echo "error: could not install Debian's $* (for $tool)" >&2
  exit 1
}
