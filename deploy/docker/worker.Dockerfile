# syntax=docker/dockerfile:1
# Conveyor worker image. Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t conveyor-worker .
# Only conveyor-common (which holds the enqueue and validation code the worker's scheduler loop
# shares with the producer) and conveyor-worker are installed, with the third-party pins that
# uv.lock gives for that one package (uv export --package): no psycopg here.

# --- 1. Pinned requirements for this one service, from uv.lock -------------------------------
FROM python:3.11-slim AS requirements
RUN pip install --no-cache-dir --disable-pip-version-check uv==0.13.9
WORKDIR /src
# uv needs the workspace's pyproject files to find the member in uv.lock; nothing else.
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/
COPY services/producer/pyproject.toml services/producer/
COPY services/worker/pyproject.toml services/worker/
COPY services/results/pyproject.toml services/results/
# --frozen: use uv.lock exactly as committed. --no-emit-workspace: third-party pins only (with
# hashes); the workspace members are installed from source below.
RUN uv export --package conveyor-worker --frozen --no-dev --no-emit-workspace --no-header \
        --output-file /requirements.txt

# --- 2. A virtualenv with the pins, conveyor-common and conveyor-worker ---------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=requirements /requirements.txt /tmp/requirements.txt
# Hashes are checked, wheels only (every pin has manylinux wheels for amd64 and arm64), and
# --no-deps because the export is already the complete closure: nothing unpinned gets in.
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps -r /tmp/requirements.txt
WORKDIR /src
COPY libs/common libs/common
COPY services/worker services/worker
RUN pip install --no-cache-dir --no-deps ./libs/common ./services/worker \
    && pip check

# --- 3. Runtime: the virtualenv and the health probe, as a non-root user ----------------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="conveyor-worker" \
      org.opencontainers.image.description="Conveyor worker (python -m conveyor.worker)"
RUN groupadd --system --gid 10001 conveyor \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin conveyor
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/conveyor/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CONVEYOR_GRPC_ADDR=0.0.0.0:50061 \
    CONVEYOR_LOG_FORMAT=json
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 50061
# On SIGTERM the service reports NOT_SERVING, stops claiming, lets running jobs
# finish for CONVEYOR_SHUTDOWN_GRACE_SECONDS and records their outcomes (up to the grace again);
# anything unfinished stays pending in Redis for another worker to reclaim. Give it a stop
# timeout of at least twice the grace (compose stop_grace_period, k8s terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/opt/conveyor/healthcheck.py"]
ENTRYPOINT ["python", "-m", "conveyor.worker"]
