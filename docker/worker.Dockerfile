# syntax=docker/dockerfile:1
# facegen GPU worker image: CUDA runtime + Python 3.11 + torch (cu128 wheel) + the bundled demo checkpoints.
# Build from the repository root:  docker build -f docker/worker.Dockerfile -t facegen-worker .
#
# Ubuntu 24.04 ships Python 3.12, so the 3.11 interpreter comes from uv's managed (python-build-standalone)
# builds, installed under /opt/python and copied with the virtualenv into the runtime stage.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8
ARG PYTHON_VERSION=3.11
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

FROM ${UV_IMAGE} AS uv

# ---- build: /opt/python (interpreter) + /opt/venv (dependencies and the facegen package) -------------------
FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION
ARG TORCH_INDEX_URL
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install ${PYTHON_VERSION} \
    && uv venv --seed --python ${PYTHON_VERSION} /opt/venv
WORKDIR /src
# Dependencies first (torch is the big, rarely-changing layer). torch is kept out of the lock: its wheel differs
# between CPU and CUDA hosts, so it is installed by its exact pin in pyproject.toml from the CUDA index. Everything
# else is exactly the hashed pins of the worker extra (requirements/worker.lock, written by `make lock`;
# --no-deps: the lock lists every dependency but torch).
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install --extra-index-url ${TORCH_INDEX_URL} \
        "$(sed -n 's/^ *"\(torch==[^"]*\)",*$/\1/p' pyproject.toml)"
COPY requirements/worker.lock ./requirements/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install --require-hashes --no-deps -r requirements/worker.lock
COPY facegen ./facegen
COPY worker ./worker
# ".[worker]" with --no-deps adds only facegen itself; pip check proves no dependency is missing.
# Contract check: the CUDA build of torch was installed (version local tag "+cu128"), not a CPU wheel, with the
# Triton that torch.compile needs on CUDA.
RUN /opt/venv/bin/pip install --no-deps ".[worker]" \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import torch, triton, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); sys.exit(torch.version.cuda is None)"

# ---- runtime -------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
# COMPILE other than off: Triton (in the torch wheel's dependencies) builds a small C launcher per kernel at run time
# with the system C compiler and the interpreter's headers (shipped with /opt/python), so the image carries gcc and
# the C library headers; the worker checks for them at start (worker.engine.check_compile_supported).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 facegen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin facegen \
    && mkdir -p /cache && chown 10001:10001 /cache
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
# Bundled demo checkpoints (checkpoints/<kind>/<version>/); mount a volume over /app/checkpoints to replace them.
# Root-owned and read-only for the worker: checkpoints are verified by sha256, never rewritten at runtime.
COPY checkpoints/ /app/checkpoints/
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    TRITON_CACHE_DIR=/cache/triton \
    REDIS_URL=redis://redis:6379/0 \
    CHECKPOINT_DIR=/app/checkpoints \
    MODEL_VERSION=latest \
    DEVICE=auto \
    PRECISION=auto \
    QUEUES=facegen \
    METRICS_PORT=9100
# Compiled kernels (inductor's FX graph and autotuning caches, Triton's binaries) persist in /cache: mount a volume
# there and a restarted worker warms its buckets up from the cache instead of compiling again.
VOLUME /cache
WORKDIR /app
USER 10001:10001
EXPOSE 9100
# /healthz (on the metrics port) fails while the worker starts (loading, compile warm-up) and once its main loop has
# not ticked for LIVENESS_TIMEOUT seconds; urlopen raises on its 503, so the check exits non-zero. The start
# period covers a cold compile warm-up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('METRICS_PORT', '9100'), timeout=4)"]
# RQ handles SIGTERM as a warm shutdown (finish the current batch); give it time (compose stop_grace_period,
# k8s terminationGracePeriodSeconds).
CMD ["python", "-m", "worker"]
