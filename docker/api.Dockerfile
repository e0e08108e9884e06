# syntax=docker/dockerfile:1
# facegen API image: FastAPI + the job-spec module, no torch.
# Build from the repository root:  docker build -f docker/api.Dockerfile -t facegen-api .

ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a self-contained virtualenv in /opt/venv -------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies first (cached while only the code changes): exactly the hashed pins of the api extra
# (requirements/api.lock, written by `make lock`; --no-deps: the lock lists every dependency).
COPY requirements/api.lock ./requirements/
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install --require-hashes --no-deps -r requirements/api.lock
COPY pyproject.toml README.md ./
COPY facegen ./facegen
COPY service ./service
# pip byte-compiles at install time, so the read-only root filesystem at runtime costs nothing.
# ".[api]" with --no-deps adds only facegen itself; pip check proves the lock left no dependency out.
# Contract check: the API image never carries torch.
RUN /opt/venv/bin/pip install --no-deps ".[api]" \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"

# ---- runtime -------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 facegen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin facegen
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    REDIS_URL=redis://redis:6379/0
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# python:3.11-slim has no curl; urllib is enough. /healthz is liveness only (no Redis round trip).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# On 0.0.0.0 the API refuses to start without API_KEYS (or ADMIN_API_KEYS) unless ALLOW_OPEN_API=true: pass keys,
# or allow an open API where the port is reachable from this machine alone (docker-compose.yml does).
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
