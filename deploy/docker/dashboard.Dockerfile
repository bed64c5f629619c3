# syntax=docker/dockerfile:1
# Conveyor dashboard image. Build from the repository root:
#   docker build -f deploy/docker/dashboard.Dockerfile -t conveyor-dashboard .
# conveyor-common and conveyor-dashboard with the pins uv.lock gives for that one package, plus
# the Chart.js bundle from package-lock.json: the page never fetches anything from elsewhere.

# --- 1. Chart.js, exactly as package-lock.json pins it (production dependencies only) ---------
FROM node:20-slim AS assets
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

# --- 2. Pinned requirements for this one service, from uv.lock -------------------------------
FROM python:3.11-slim AS requirements
RUN pip install --no-cache-dir --disable-pip-version-check uv==0.13.9
WORKDIR /src
# uv needs the workspace's pyproject files to find the member in uv.lock; nothing else.
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/
COPY services/producer/pyproject.toml services/producer/
COPY services/worker/pyproject.toml services/worker/
COPY services/results/pyproject.toml services/results/
COPY services/dashboard/pyproject.toml services/dashboard/
RUN uv export --package conveyor-dashboard --frozen --no-dev --no-emit-workspace --no-header \
        --output-file /requirements.txt

# --- 3. A virtualenv with the pins, conveyor-common and conveyor-dashboard ----------------------
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: --no-deps -r /tmp/requirements.txt
WORKDIR /src
COPY libs/common libs/common
COPY services/dashboard services/dashboard
RUN pip install --no-cache-dir --no-deps ./libs/common ./services/dashboard \
    && pip check

# --- 4. Runtime: the virtualenv and the Chart.js bundle, as a non-root user ---------------------
FROM python:3.11-slim
LABEL org.opencontainers.image.title="conveyor-dashboard" \
      org.opencontainers.image.description="Conveyor dashboard (python -m conveyor.dashboard)"
RUN groupadd --system --gid 10001 conveyor \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin conveyor
COPY --from=build /opt/venv /opt/venv
COPY --from=assets /src/node_modules/chart.js/dist/chart.umd.min.js /opt/conveyor/chart.umd.min.js
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CONVEYOR_DASHBOARD_ADDR=0.0.0.0:8080 \
    CONVEYOR_DASHBOARD_CHART_JS=/opt/conveyor/chart.umd.min.js \
    CONVEYOR_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
# The dashboard answers /healthz once it can reach the producer; urllib is in the standard library.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=3)"]
ENTRYPOINT ["python", "-m", "conveyor.dashboard"]
