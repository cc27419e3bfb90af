#!/usr/bin/env bash
# Keycloak in production mode (`kc.sh start`, not start-dev): its own PostgreSQL database,
# HTTPS only, a fixed hostname, the SPE realm imported on first start.
#
#   keycloak-prod.sh start --port P --hostname URL --cert FILE --key FILE \
#                          --db-url JDBC_URL --db-user USER --db-password-file FILE \
#                          --admin-password-file FILE
#       build the optimised server for PostgreSQL (once per checkout), start it on
#       127.0.0.1:P over HTTPS with the certificate and key files, and wait until the realm's
#       discovery document answers over TLS (checked against SPE_KEYCLOAK_CA_FILE when set).
#       Its management interface (health) listens on P+1.
#   keycloak-prod.sh stop      stop the server started from this checkout.
#
# The distribution is the one keycloak.sh fetched and verified against keycloak-dist.sha256
# (run `keycloak.sh start` once first); this script refuses an unverified one. Secrets come from
# files that only their owner may read (refused otherwise) and never appear on a command line.
# State and logs live in <repo>/var/services/keycloak-prod (separate from the development
# server's). Environment: SPE_CACHE_DIR, SPE_KEYCLOAK_VERSION, SPE_KEYCLOAK_START_TIMEOUT
# (seconds, default 300), SPE_KEYCLOAK_CA_FILE, KC_BOOTSTRAP_ADMIN_USERNAME (default admin).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VERSION=${SPE_KEYCLOAK_VERSION:-26.5.5}
DIST=${SPE_CACHE_DIR:-$HOME/.cache/spe}/keycloak/keycloak-$VERSION
STATE=$ROOT/var/services/keycloak-prod
HOME_DIR=$STATE/home
LOG=$STATE/keycloak.log
PID_FILE=$STATE/keycloak.pid
REALM=spe
TIMEOUT=${SPE_KEYCLOAK_START_TIMEOUT:-300}

log() { echo "keycloak-prod: $*" >&2; }

# private_file FILE: refuse a secret file that group or others may access.
private_file() {
  local f=$1 mode
  [ -f "$f" ] || { log "REFUSED: $f is not a file"; exit 1; }
  mode=$(stat -c %a "$f")
  if [ $((8#$mode & 8#077)) -ne 0 ]; then
    log "REFUSED: $f has mode $mode; group or others may access it (chmod 0600)"; exit 1
  fi
}

prepare_home() {
  if [ ! -x "$DIST/bin/kc.sh" ] || [ ! -s "$DIST/.spe-verified" ]; then
    log "no verified Keycloak $VERSION in $DIST: run infra/keycloak/keycloak.sh start once"
    exit 1
  fi
  mkdir -p "$HOME_DIR/bin" "$HOME_DIR/data/import" "$HOME_DIR/conf" "$HOME_DIR/lib"
  chmod 0700 "$STATE"
  local part
  for part in providers themes lib/lib; do
    if [ "$(readlink "$HOME_DIR/$part" 2>/dev/null)" != "$DIST/$part" ]; then
      rm -rf "${HOME_DIR:?}/$part"; ln -s "$DIST/$part" "$HOME_DIR/$part"
    fi
  done
  # The build rewrites lib/quarkus: this home has its own copy.
  [ -d "$HOME_DIR/lib/quarkus" ] || \
    cp -r "$DIST/lib/app" "$DIST/lib/quarkus" "$DIST/lib/quarkus-run.jar" "$HOME_DIR/lib/"
  cp -f "$DIST/bin/kc.sh" "$HOME_DIR/bin/kc.sh"
  [ -e "$HOME_DIR/conf/keycloak.conf" ] || cp -r "$DIST/conf/." "$HOME_DIR/conf/"
  cp -f "$HERE/realm-spe.json" "$HOME_DIR/data/import/realm-spe.json"
}

discovery_ok() {
  local ca=()
  [ -z "${SPE_KEYCLOAK_CA_FILE:-}" ] || ca=(--cacert "$SPE_KEYCLOAK_CA_FILE")
  curl -fsS -m 5 -o /dev/null "${ca[@]}" "$1/realms/$REALM/.well-known/openid-configuration"
}

cmd_start() {
  local port="" hostname="" cert="" key="" db_url="" db_user="" db_pw_file="" admin_pw_file=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port=$2 ;;
      --hostname) hostname=$2 ;;
      --cert) cert=$2 ;;
      --key) key=$2 ;;
      --db-url) db_url=$2 ;;
      --db-user) db_user=$2 ;;
      --db-password-file) db_pw_file=$2 ;;
      --admin-password-file) admin_pw_file=$2 ;;
      *) log "unknown option $1"; exit 2 ;;
    esac
    shift 2
  done
  local v
  for v in port hostname cert key db_url db_user db_pw_file admin_pw_file; do
    [ -n "${!v}" ] || { log "missing --${v//_/-}"; exit 2; }
  done
  private_file "$key"; private_file "$db_pw_file"; private_file "$admin_pw_file"
  mkdir -p "$STATE"
  if [ -s "$PID_FILE" ] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null; then
    log "already running (pid $(cat "$PID_FILE"))"
    wait_ready "$hostname" "$(cat "$PID_FILE")"; return
  fi
  prepare_home
  : > "$LOG"
  local started=$SECONDS
  # One machine: local caches (no cluster discovery listening on the network).
  local build="$VERSION postgres local-cache"
  if [ ! -s "$STATE/built" ] || [ "$(cat "$STATE/built")" != "$build" ]; then
    log "building the optimised server for PostgreSQL (once)"
    "$HOME_DIR/bin/kc.sh" build --db=postgres --cache=local --health-enabled=true >>"$LOG" 2>&1
    echo "$build" > "$STATE/built"
  fi
  log "starting Keycloak $VERSION in production mode on https://127.0.0.1:$port (log: $LOG)"
  (
    cd "$STATE"
    KC_DB_PASSWORD=$(cat "$db_pw_file"); export KC_DB_PASSWORD
    KC_BOOTSTRAP_ADMIN_PASSWORD=$(cat "$admin_pw_file"); export KC_BOOTSTRAP_ADMIN_PASSWORD
    export KC_BOOTSTRAP_ADMIN_USERNAME=${KC_BOOTSTRAP_ADMIN_USERNAME:-admin}
    export JAVA_OPTS_KC_HEAP=${JAVA_OPTS_KC_HEAP:-"-Xms64m -Xmx768m"}
    exec setsid "$HOME_DIR/bin/kc.sh" start --optimized --hostname="$hostname" \
      --http-enabled=false --https-port="$port" --http-host=127.0.0.1 \
      --http-management-port="$((port + 1))" \
      --https-certificate-file="$cert" --https-certificate-key-file="$key" \
      --db-url="$db_url" --db-username="$db_user" --import-realm </dev/null >>"$LOG" 2>&1
  ) &
  local pid=$!
  echo "$pid" > "$PID_FILE"
  wait_ready "$hostname" "$pid"
  log "up after $((SECONDS - started))s"
}

wait_ready() {
  local url=$1 pid=$2 waited=0
  while [ "$waited" -lt "$TIMEOUT" ]; do
    if discovery_ok "$url" 2>/dev/null; then log "ready: $url/realms/$REALM"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "Keycloak exited during startup; last lines of $LOG:"
      tail -n 40 "$LOG" >&2 || true
      rm -f "$PID_FILE"; return 1
    fi
    sleep 2; waited=$((waited + 2))
  done
  log "not ready after ${TIMEOUT}s; last lines of $LOG:"; tail -n 40 "$LOG" >&2 || true
  return 1
}

cmd_stop() {
  [ -s "$PID_FILE" ] || { log "not running"; return 0; }
  local pid i
  pid=$(cat "$PID_FILE")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  rm -f "$PID_FILE"
  log "stopped (pid $pid)"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  *) echo "usage: $0 start --port P --hostname URL --cert F --key F --db-url U --db-user U" \
          "--db-password-file F --admin-password-file F | stop" >&2; exit 2 ;;
esac
