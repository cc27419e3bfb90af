#!/usr/bin/env bash
# Start or stop the services the tests need, on loopback ports, with state under var/services.
# `start` prints `export NAME=value` lines for the test environment (eval them).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SVC=$ROOT/var/services
PG_PORT=${SPE_TEST_PG_PORT:-55432}
PG_DIR=$SVC/postgres
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)

as_pg() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_start() {
  mkdir -p "$SVC"
  if [ ! -s "$PG_DIR/PG_VERSION" ]; then
    rm -rf "$PG_DIR"; mkdir -p "$PG_DIR"
    [ "$(id -u)" -ne 0 ] || chown postgres:postgres "$PG_DIR"
    as_pg "$PG_BIN/initdb" -D "$PG_DIR" -U spe --auth=trust -E UTF8 >/dev/null
  fi
  if ! as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR" status >/dev/null 2>&1; then
    as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR" -l "$PG_DIR/server.log" -w -t 60 \
      -o "-p $PG_PORT -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null
  fi
  as_pg "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U spe -d postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='spe_test'" | grep -q 1 \
    || as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U spe spe_test
  echo "export SPE_TEST_POSTGRES_URL=postgresql+psycopg://spe@127.0.0.1:$PG_PORT/spe_test"
}

pg_stop() {
  [ -d "$PG_DIR" ] && as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR" -m fast stop >/dev/null 2>&1 || true
}

kc_start() {
  if [ -x infra/keycloak/keycloak.sh ]; then
    infra/keycloak/keycloak.sh start >&2
    infra/keycloak/keycloak.sh env
  fi
}

kc_stop() {
  [ -x infra/keycloak/keycloak.sh ] && infra/keycloak/keycloak.sh stop >&2 || true
}

case "${1:-}" in
  start) pg_start; kc_start ;;
  stop) kc_stop; pg_stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
