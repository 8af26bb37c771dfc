#!/usr/bin/env bash
# Starts the server (sets up .venv first). Settings come from CONV_* environment variables.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m app "$@"
