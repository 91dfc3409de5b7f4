#!/usr/bin/env bash
# Installs the Python packages the tests use (the official `openai` and `anthropic` SDKs for
# real-client checks,
# `xxhash` as an independent reference for block hashes, `numpy` for the native engine's reference
# forward pass, `nats-py` to check the NATS service protocol; `aiohttp`, `pyzmq` and `msgpack` for
# the stand-in engine server of scripts/engine-standin.py) into a project-local, git-ignored
# venv. Idempotent. Prints the venv's python on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PY_VENV:-$root/.venv-py}"
want_openai="${OPENAI_VERSION:-3.*}"
py="$venv/bin/python"

have() {
  [ -x "$py" ] && "$py" -c "import openai, anthropic, xxhash, numpy, nats, aiohttp, zmq, msgpack, sys; sys.exit(0 if openai.__version__.startswith(\"${want_openai%%.*}.\") else 1)" 2>/dev/null
}

if ! have; then
  echo "installing openai $want_openai, anthropic, xxhash, numpy, nats-py, aiohttp, pyzmq and msgpack into $venv (PyPI)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "openai==$want_openai" "anthropic==0.*" "xxhash==4.*" "numpy==2.*" "nats-py==2.*" "aiohttp==3.*" "pyzmq==27.*" "msgpack==1.*" >&2 || {
    echo "error: could not install the test packages from PyPI; check that PyPI is reachable" >&2
    exit 1
  }
  have || { echo "error: a test package installed but does not import in $venv" >&2; exit 1; }
fi
echo "$py"
