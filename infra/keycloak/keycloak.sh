#!/usr/bin/env bash
# The bundled Keycloak for development and tests.
#
#   keycloak.sh start [--port P]   fetch (once, through Maven, into a cache outside the repo),
#                                  start on 127.0.0.1:P (default 8180) with realm-spe.json
#                                  imported, and wait until the realm's discovery document
#                                  answers. A second start reuses the cache and a running server.
#   keycloak.sh stop               stop the server started from this checkout.
#   keycloak.sh status             say whether it runs and where (exit 1 when not).
#   keycloak.sh env                print `export ...` lines for the tests.
#   keycloak.sh verify ZIP         check a distribution zip against keycloak-dist.sha256.
#
# Supply chain: the zip is checked against the SHA-256 recorded in keycloak-dist.sha256 (beside
# this script) before it is unpacked, and again before each start while it is in the cache; a
# zip whose hash differs, or a version with no recorded hash, is refused.
#
# Environment: SPE_KEYCLOAK_CHECKSUMS (default: keycloak-dist.sha256 beside this script), SPE_CACHE_DIR (default ~/.cache/spe), SPE_KEYCLOAK_VERSION, SPE_KEYCLOAK_PORT,
# SPE_KEYCLOAK_START_TIMEOUT (seconds, default 300), KC_BOOTSTRAP_ADMIN_USERNAME/PASSWORD
# (default admin/admin: dev only). State and logs live in <repo>/var/services/keycloak.
# Dev mode (start-dev, H2 database in the state directory): never use this for production.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
VERSION=${SPE_KEYCLOAK_VERSION:-26.5.5}
CACHE=${SPE_CACHE_DIR:-$HOME/.cache/spe}/keycloak
DIST=$CACHE/keycloak-$VERSION
STATE=$ROOT/var/services/keycloak
HOME_DIR=$STATE/home
LOG=$STATE/keycloak.log
PID_FILE=$STATE/keycloak.pid
PORT_FILE=$STATE/port
REALM_FILE=$HERE/realm-spe.json
CHECKSUMS=${SPE_KEYCLOAK_CHECKSUMS:-$HERE/keycloak-dist.sha256}
REALM=spe
TIMEOUT=${SPE_KEYCLOAK_START_TIMEOUT:-300}

log() { echo "keycloak: $*" >&2; }

port_of_state() {
  if [ -s "$PORT_FILE" ]; then cat "$PORT_FILE"; else echo "${SPE_KEYCLOAK_PORT:-8180}"; fi
}

discovery_ok() {
  curl -fsS -m 5 -o /dev/null "http://127.0.0.1:$1/realms/$REALM/.well-known/openid-configuration"
}

running_pid() {
  [ -s "$PID_FILE" ] || return 1
  local pid
  pid=$(cat "$PID_FILE")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

java_major() {
  "${JAVA:-java}" -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print (v[1] == "1" ? v[2] : v[1]); exit}'
}

ensure_java() {
  local major
  major=$(java_major || echo 0)
  if [ "${major:-0}" -ge 17 ]; then return 0; fi
  log "Keycloak $VERSION needs JDK 17 or newer (found: ${major:-none})"
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    log "installing a JDK from the distribution's packages"
    apt-get update -q >&2 || true
    apt-get install -y -q openjdk-17-jre-headless >&2 || apt-get install -y -q default-jre-headless >&2
  else
    log "install OpenJDK 17, 21 or 25 and retry"; exit 1
  fi
}

# verify_zip ZIP: refuse (exit 1) unless ZIP's SHA-256 is the one recorded for its file name.
verify_zip() {
  local zip=$1 name want have
  name=$(basename "$zip")
  want=$(awk -v n="$name" '$1 !~ /^#/ && $2 == n {print $1; exit}' "$CHECKSUMS" 2>/dev/null || true)
  if [ -z "$want" ]; then
    log "REFUSED: no SHA-256 recorded for $name in $CHECKSUMS; record it after checking it"
    exit 1
  fi
  have=$(sha256sum "$zip" | cut -d' ' -f1)
  if [ "$have" != "$want" ]; then
    log "REFUSED: $zip has SHA-256 $have, but $CHECKSUMS records $want for $name"
    log "the file was changed or is not the published distribution; delete it to fetch it again"
    exit 1
  fi
}

ensure_dist() {
  mkdir -p "$CACHE"
  local zip=$CACHE/keycloak-quarkus-dist-$VERSION.zip
  if [ -x "$DIST/bin/kc.sh" ] && [ -s "$DIST/.spe-verified" ]; then
    # Unpacked from a verified zip; re-check the zip while the cache keeps it.
    [ ! -e "$zip" ] || verify_zip "$zip"
    return 0
  fi
  if [ ! -s "$zip" ]; then
    command -v mvn >/dev/null || { log "Maven (mvn) is needed to fetch Keycloak"; exit 1; }
    log "fetching org.keycloak:keycloak-quarkus-dist:$VERSION through Maven"
    (cd "$CACHE" && mvn -q -B dependency:copy \
      "-Dartifact=org.keycloak:keycloak-quarkus-dist:$VERSION:zip" \
      "-DoutputDirectory=$CACHE" >&2)
  fi
  verify_zip "$zip"
  if [ -x "$DIST/bin/kc.sh" ]; then
    # Unpacked before the check existed: keep it only if it is what the verified zip holds.
    if ! (cd "$DIST" && unzip -Z1 "$zip" | sed -n "s#^keycloak-$VERSION/##p" | grep -v -e '/$' -e '^$' \
          | while read -r f; do [ -e "$f" ] || exit 1; done); then
      log "the unpacked $DIST does not match the verified zip; unpacking it again"
      rm -rf "$DIST"
    fi
  fi
  if [ ! -x "$DIST/bin/kc.sh" ]; then
    local tmp
    tmp=$(mktemp -d "$CACHE/unpack.XXXXXX")
    unzip -q "$zip" -d "$tmp"
    mv "$tmp/keycloak-$VERSION" "$DIST"
    rm -rf "$tmp"
  fi
  sha256sum "$zip" | cut -d' ' -f1 > "$DIST/.spe-verified"
}

# A per-checkout Keycloak home: its own bin/conf/data (so the import directory, the H2 database
# and the logs stay in this checkout), the read-only parts linked from the shared cache.
prepare_home() {
  # lib/quarkus is rewritten by the dev-mode build, so lib is per checkout too; only the
  # dependency jars (lib/lib), providers and themes are shared, read-only, with the cache.
  [ -L "$HOME_DIR/lib" ] && rm -f "$HOME_DIR/lib"
  mkdir -p "$HOME_DIR/bin" "$HOME_DIR/data/import" "$HOME_DIR/conf" "$HOME_DIR/lib"
  local part
  for part in providers themes lib/lib; do
    if [ "$(readlink "$HOME_DIR/$part" 2>/dev/null)" != "$DIST/$part" ]; then
      rm -rf "${HOME_DIR:?}/$part"; ln -s "$DIST/$part" "$HOME_DIR/$part"
    fi
  done
  if [ ! -d "$HOME_DIR/lib/quarkus" ]; then
    cp -r "$DIST/lib/app" "$DIST/lib/quarkus" "$DIST/lib/quarkus-run.jar" "$HOME_DIR/lib/"
  fi
  cp -f "$DIST"/bin/kc.sh "$HOME_DIR/bin/kc.sh"
  [ -e "$HOME_DIR/conf/keycloak.conf" ] || cp -r "$DIST/conf/." "$HOME_DIR/conf/"
  # Re-import from scratch when the realm file changed since the database was created.
  local want have=""
  want=$(sha256sum "$REALM_FILE" | cut -d' ' -f1)
  [ -s "$STATE/realm.sha256" ] && have=$(cat "$STATE/realm.sha256")
  if [ "$want" != "$have" ]; then
    rm -rf "$HOME_DIR/data/h2"
    echo "$want" > "$STATE/realm.sha256"
  fi
  cp -f "$REALM_FILE" "$HOME_DIR/data/import/realm-spe.json"
}

cmd_start() {
  local port=${SPE_KEYCLOAK_PORT:-8180}
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port=$2; shift 2 ;;
      --port=*) port=${1#--port=}; shift ;;
      *) log "unknown option $1"; exit 2 ;;
    esac
  done
  mkdir -p "$STATE"
  local pid
  if pid=$(running_pid); then
    local running_port
    running_port=$(port_of_state)
    if [ "$running_port" != "$port" ]; then
      log "already running on port $running_port (pid $pid); stop it first to change the port"
      exit 1
    fi
    if wait_ready "$port" "$pid"; then log "already running on port $port (pid $pid)"; return 0; fi
    exit 1
  fi
  if discovery_ok "$port" 2>/dev/null; then
    log "a Keycloak with realm $REALM already answers on port $port (not started from here); using it"
    echo "$port" > "$PORT_FILE"
    return 0
  fi
  ensure_java
  ensure_dist
  prepare_home
  echo "$port" > "$PORT_FILE"
  log "starting Keycloak $VERSION on 127.0.0.1:$port (log: $LOG)"
  : > "$LOG"
  (
    cd "$STATE"
    export KC_BOOTSTRAP_ADMIN_USERNAME=${KC_BOOTSTRAP_ADMIN_USERNAME:-admin}
    export KC_BOOTSTRAP_ADMIN_PASSWORD=${KC_BOOTSTRAP_ADMIN_PASSWORD:-admin}
    export JAVA_OPTS_KC_HEAP=${JAVA_OPTS_KC_HEAP:-"-Xms64m -Xmx768m"}
    exec setsid "$HOME_DIR/bin/kc.sh" start-dev --http-host=127.0.0.1 --http-port="$port" \
      --import-realm </dev/null >>"$LOG" 2>&1
  ) &
  pid=$!
  echo "$pid" > "$PID_FILE"
  wait_ready "$port" "$pid"
}

wait_ready() {
  local port=$1 pid=$2 waited=0
  while [ "$waited" -lt "$TIMEOUT" ]; do
    if discovery_ok "$port" 2>/dev/null; then
      log "ready: http://127.0.0.1:$port/realms/$REALM (after ${waited}s)"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      log "Keycloak exited during startup; last lines of $LOG:"
      tail -n 40 "$LOG" >&2 || true
      rm -f "$PID_FILE"
      return 1
    fi
    sleep 2; waited=$((waited + 2))
  done
  log "not ready after ${TIMEOUT}s; last lines of $LOG:"
  tail -n 40 "$LOG" >&2 || true
  return 1
}

cmd_stop() {
  local pid
  if ! pid=$(running_pid); then log "not running"; rm -f "$PID_FILE"; return 0; fi
  kill -TERM "$pid" 2>/dev/null || true
  local i
  for i in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$PID_FILE"
  log "stopped (pid $pid)"
}

cmd_status() {
  local port pid
  port=$(port_of_state)
  if discovery_ok "$port" 2>/dev/null; then
    if pid=$(running_pid); then
      echo "running: http://127.0.0.1:$port (pid $pid)"
    else
      echo "running: http://127.0.0.1:$port (not started from this checkout)"
    fi
    return 0
  fi
  if pid=$(running_pid); then echo "starting: pid $pid, port $port"; return 1; fi
  echo "stopped"; return 1
}

cmd_env() {
  local port
  port=$(port_of_state)
  echo "export SPE_TEST_KEYCLOAK_URL=http://127.0.0.1:$port"
  echo "export SPE_TEST_KEYCLOAK_REALM=$REALM"
  echo "export SPE_TEST_KEYCLOAK_ADMIN_USER=${KC_BOOTSTRAP_ADMIN_USERNAME:-admin}"
  echo "export SPE_TEST_KEYCLOAK_ADMIN_PASSWORD=${KC_BOOTSTRAP_ADMIN_PASSWORD:-admin}"
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  verify) [ $# -eq 2 ] || { echo "usage: $0 verify ZIP" >&2; exit 2; }
          verify_zip "$2"; log "verified: $2" ;;
  *) echo "usage: $0 start [--port P] | stop | status | env | verify ZIP" >&2; exit 2 ;;
esac
