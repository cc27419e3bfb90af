#!/usr/bin/env bash
# One command to run the tests on a fresh machine: set up, start the services the tests need
# (PostgreSQL, Keycloak), lint, and run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
eval "$(scripts/services.sh start)"
trap 'scripts/services.sh stop >/dev/null 2>&1 || true' EXIT
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
exit $rc
