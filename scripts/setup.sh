#!/usr/bin/env bash
# Set up everything the SPE needs on a fresh Debian machine: system packages, the project's
# virtual environment at .venv (with the `spe` command), and Python dependencies from the hashed
# lock requirements/dev.txt (pip --require-hashes; regenerate with scripts/lock.sh), the npm
# proxy from package-lock.json (npm ci, integrity checked), the workspace runtime from
# requirements/runtime.txt, SBOMs under var/sbom and a vulnerability scan where its database is
# reachable. Safe to run again: it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(postgresql bubblewrap nftables iproute2 util-linux passwd curl unzip python3 python3-venv)
# Headless Chromium for the browser tests (driven by Playwright for Python, which cannot
# download its own browsers here).
APT_PACKAGES+=(chromium)
# The R kernel of the workspaces (Debian's R with IRkernel, which registers the kernel
# system-wide under /usr/share/jupyter, visible in every sandbox).
APT_PACKAGES+=(r-base-core r-cran-irkernel)
# PDF previews in the console: poppler's pdftoppm, run under bubblewrap.
APT_PACKAGES+=(poppler-utils)
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
want=$(cat pyproject.toml requirements/dev.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # Every dependency, the installer and the build back-end included, from the hashed lock: pip
  # refuses any file whose hash differs. Then the project itself, without dependencies and
  # without fetching a build environment. The install report keeps the hash of each file.
  mkdir -p .venv/.spe-install-reports
  .venv/bin/python -m pip install -q --require-hashes -r requirements/dev.txt \
    --report ".venv/.spe-install-reports/$(date +%s).json"
  # (setuptools warns about editable installs on stderr: shown only when the install fails)
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>.venv/.spe-install.err \
    || { cat .venv/.spe-install.err >&2; exit 1; }
  .venv/bin/python -m pip check >/dev/null || {
    .venv/bin/python -m pip check >&2
    echo "setup: requirements/dev.txt misses a dependency of pyproject.toml: run scripts/lock.sh" >&2
    exit 1; }
  echo "$want" > "$stamp"
fi
# configurable-http-proxy for JupyterHub, into ./node_modules, exactly as package-lock.json says
# (npm ci checks every tarball against the lock's integrity hash); reinstalled when the installed
# tree differs from the lock.
if ! .venv/bin/python scripts/supply_chain.py npm-verify 2>/dev/null; then
  npm ci --no-audit --no-fund --silent
  .venv/bin/python scripts/supply_chain.py npm-verify
fi
# The workspaces' JupyterLab extension (TypeScript: the permit panel and "Request export"): its
# npm packages from its own package-lock.json (npm ci, integrity checked), built with JupyterLab's
# builder into var/labextension, which the runtime's build installs. Rebuilt when its sources
# change.
lab=workspaces/labextension
lab_want=$(cat "$lab/package.json" "$lab/package-lock.json" "$lab/tsconfig.json" "$lab"/src/* \
  "$lab"/style/* | sha256sum | cut -c1-16)
if [ ! -f var/labextension/package.json ] || [ "$(cat var/.labextension-built 2>/dev/null)" != "$lab_want" ]; then
  mkdir -p var
  (cd "$lab" && rm -rf lib tsconfig.tsbuildinfo && npm ci --no-audit --no-fund --silent \
    && node_modules/.bin/tsc && PATH="$PWD/../../.venv/bin:$PATH" jupyter labextension build .) \
    >var/labextension-build.log 2>&1 || { tail -30 var/labextension-build.log >&2
      echo "setup: the JupyterLab extension did not build (var/labextension-build.log)" >&2; exit 1; }
  .venv/bin/python scripts/supply_chain.py npm-verify --lock "$lab/package-lock.json" \
    --modules "$lab/node_modules"
  echo "$lab_want" > var/.labextension-built
fi
# The workspace runtime: a venv from the system Python that sandboxed servers can read, its
# packages from the hashed lock requirements/runtime.txt.
.venv/bin/python -m workspaces.runtime build var/runtime >/dev/null
# Build artefacts (git-ignored): CycloneDX SBOMs of the project's venv, the workspace runtime and
# the npm packages, and the vulnerability scan of the locks where its database is reachable.
mkdir -p var/sbom
.venv/bin/python scripts/supply_chain.py sbom --env .venv --lock requirements/dev.txt \
  --name spe-venv -o var/sbom/project-venv.cdx.json
.venv/bin/python scripts/supply_chain.py sbom --env var/runtime --lock requirements/runtime.txt \
  --name spe-workspace-runtime -o var/sbom/workspace-runtime.cdx.json
.venv/bin/python scripts/supply_chain.py npm-sbom -o var/sbom/npm.cdx.json
.venv/bin/python scripts/supply_chain.py npm-sbom --lock workspaces/labextension/package-lock.json \
  -o var/sbom/labextension-npm.cdx.json
if [ "${SPE_SKIP_AUDIT:-0}" != "1" ]; then
  .venv/bin/python scripts/supply_chain.py audit --lock requirements/dev.txt \
    -o var/sbom/vulnerabilities-project.json --timeout 60
  .venv/bin/python scripts/supply_chain.py audit --lock requirements/runtime.txt \
    -o var/sbom/vulnerabilities-runtime.json --timeout 60
  .venv/bin/python scripts/supply_chain.py npm-audit -o var/sbom/vulnerabilities-npm.json \
    --timeout 60
fi
echo "setup: ready (.venv/bin/spe)"
