#!/usr/bin/env bash
# Creates .venv-peers: the peer model servers (LitServe, KServe) the service benchmark compares us with,
# kept out of the project's own dependencies. Installs this repo with --no-deps so the peers import the
# same `kernels` package. Also installs wrk (Debian) for the load, and matplotlib for the plots.
# Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${PEERS_VENV:-.venv-peers}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat bench/setup_peers.sh | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # 2.13.0 is the CPU wheel kept on local disk; a bare `torch` would pull a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    # pydantic-settings and prometheus-client let our own app run here too (with uvloop and httptools,
    # which litserve and kserve bring): the "ours-uvloop" diagnostic in serve_compare.py.
    "$VENV/bin/python" -m pip install -q litserve kserve orjson httpx matplotlib numpy py-spy pydantic-settings prometheus-client
    "$VENV/bin/python" -m pip install -q -e . --no-deps
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
if ! command -v wrk >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup_peers.sh: wrk is missing and installing it needs root (apt-get install wrk)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends wrk >/dev/null
fi
"$VENV/bin/python" -c "import importlib.metadata as m, kernels, kserve, litserve; print('peers ready:', ', '.join(f'{p} {m.version(p)}' for p in ('litserve', 'kserve', 'torch')))"
