# syntax=docker/dockerfile:1
# conv-as-a-service on a CUDA host: `docker compose up` (see docs/deploy.md).
#
# torch and triton are the CUDA builds already in the pinned PyTorch runtime image; the project and
# its other dependencies (deploy/docker/requirements.txt, pinned) are installed from wheels built in
# the first stage with --no-index, so nothing can pull a second torch. The final stage keeps no
# source tree, build tools or pip cache.
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime

FROM ${BASE_IMAGE} AS wheels
WORKDIR /src
COPY deploy/docker/requirements.txt /wheels/requirements.txt
RUN pip wheel --no-cache-dir --wheel-dir /wheels --requirement /wheels/requirements.txt
COPY pyproject.toml README.md ./
COPY app ./app
COPY kernels ./kernels
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="conv-as-a-service" \
      org.opencontainers.image.description="Conv2d forward/backward over HTTP, on a GPU worker" \
      org.opencontainers.image.version="0.1.0"
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels \
        --requirement /wheels/requirements.txt convservice==0.1.0 \
    && useradd --no-log-init --create-home --uid 10001 --user-group conv
COPY deploy/docker/healthcheck.py /opt/convservice/healthcheck.py

# Settings are the server's own CONV_* variables (app/config.py); override any with -e or compose.
# CONV_HOST is 0.0.0.0 here because the container's port is published; the server's default
# (127.0.0.1) is right only outside a container. CONV_DEVICE=auto uses the GPU when the container
# has one (compose and Kubernetes ask for cuda explicitly). HOME holds Triton's cache (~/.triton).
# CONV_COMPILE=off: the runtime image has no C++ compiler, which compiling CPU kernels needs
# (kernels/compiled.py); GPU work does not use it.
ENV HOME=/home/conv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CONV_HOST=0.0.0.0 \
    CONV_PORT=8000 \
    CONV_DEVICE=auto \
    CONV_COMPILE=off \
    CONV_LOG_LEVEL=info

# Numeric, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/conv
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/convservice/healthcheck.py", "/readyz"]
# The same module entrypoint as the README's scripts/serve.sh (`.venv/bin/python -m app`).
CMD ["python", "-m", "app"]
