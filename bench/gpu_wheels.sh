#!/usr/bin/env bash
# Wheels of the service's own dependencies for a GPU host that has torch, triton and pytest but not
# fastapi & co (the lent H100/H200 machines: Python 3.12, no network), resolved with their dependencies.
# Run here, where PyPI is reachable; carry the folder; on the GPU host, install it before gpu_check.sh:
#
#   bash bench/gpu_wheels.sh [.whl] [3.12]
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   bash bench/gpu_check.sh        # now also runs tests/app/test_cuda.py (the service on cuda)
#
# Resolving matters: fastapi 0.165 needs opentelemetry-api, which a hand-made list missed on the
# first try (2026-11-27), so the service's CUDA tests did not run on that lease.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:-.whl}
python_version=${2:-3.12}
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done
rm -rf "$folder"
python3 -m pip download -q --only-binary=:all: --python-version "$python_version" --implementation cp "${platforms[@]}" \
    -d "$folder" fastapi uvicorn httptools "pydantic>=2.6" pydantic-settings orjson prometheus-client httpx
echo "$(ls "$folder" | wc -l) wheels in $folder ($(du -sh "$folder" | cut -f1))"
