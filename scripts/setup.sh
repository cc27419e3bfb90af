#!/usr/bin/env bash
# Set up everything the SPE needs on a fresh Debian machine: system packages, the project's
# virtual environment at .venv (with the `spe` command), and Python dependencies pinned by
# constraints.txt. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(postgresql bubblewrap nftables iproute2 util-linux passwd curl unzip python3 python3-venv)
# Headless Chromium for the browser tests (driven by Playwright for Python, which cannot
# download its own browsers here).
APT_PACKAGES+=(chromium)
# Keycloak needs a JDK 17, 21 or 25; any one already installed is enough.
command -v java >/dev/null 2>&1 || APT_PACKAGES+=(openjdk-17-jre-headless)
# Keycloak's server distribution is fetched through Maven.
command -v mvn >/dev/null 2>&1 || APT_PACKAGES+=(maven)
# JupyterHub's proxy (configurable-http-proxy) comes from npm.
command -v npm >/dev/null 2>&1 || APT_PACKAGES+=(nodejs npm)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing system packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "setup: Python 3.11 or newer is required" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.spe-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
# configurable-http-proxy for JupyterHub, into ./node_modules.
if [ ! -x node_modules/.bin/configurable-http-proxy ]; then
  npm install --prefix . --no-audit --no-fund --silent
fi
# The workspace runtime: a venv from the system Python that sandboxed servers can read.
.venv/bin/python -m workspaces.runtime build var/runtime >/dev/null
echo "setup: ready (.venv/bin/spe)"
