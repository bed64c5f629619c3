#!/usr/bin/env bash
# Installs the system binaries that tests and `make up` spawn privately: redis-server and PostgreSQL,
# tmux, in which the CLI's tests read its live progress bar off a real terminal, and chromium with
# chromedriver, in which the dashboard's tests drive a real headless browser.
# Idempotent: does nothing when they are present. Never starts, stops or reconfigures the system
# services; Conveyor runs its own throwaway servers (conveyor.common.devstack.servers).
set -euo pipefail

PACKAGES=(redis-server postgresql tmux chromium chromium-driver)

have_redis() { command -v redis-server >/dev/null 2>&1; }
have_postgres() { compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; }
have_tmux() { command -v tmux >/dev/null 2>&1; }
have_chromium() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

if ! have_redis || ! have_postgres || ! have_tmux || ! have_chromium; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "redis-server, PostgreSQL, tmux or chromium is missing; install them with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${PACKAGES[*]}" >&2
    exit 1
  fi
  # The packages' maintainer scripts start their services through invoke-rc.d; a policy-rc.d
  # answering 101 ("action forbidden") keeps them stopped. Only ours, and only while installing.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${PACKAGES[@]}"
fi

# As root, initdb and postgres refuse to run; the servers run as this user instead.
if [ "$(id -u)" -eq 0 ] && ! id -u postgres >/dev/null 2>&1; then
  useradd --system --user-group --home-dir /var/lib/postgresql --no-create-home \
    --shell /usr/sbin/nologin postgres
fi
