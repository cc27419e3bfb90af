#!/usr/bin/env bash
# One command to run the tests on a fresh machine: set up, start the services the tests need
# (PostgreSQL, Keycloak), lint and type-check, and run pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
eval "$(scripts/services.sh start)"
# Stop the services at the end unless asked to keep them (SPE_KEEP_SERVICES=1 while developing).
if [ "${SPE_KEEP_SERVICES:-0}" != "1" ]; then
  trap 'scripts/services.sh stop >/dev/null 2>&1 || true' EXIT
fi
.venv/bin/ruff check .
.venv/bin/mypy spe permits workspaces
# The layers (.importlinter, drawn in docs/architecture.md): no import reaches up a layer.
.venv/bin/lint-imports --no-cache
set +e
# tests.suite_summary prints what ran by kind (unit, integration, security, stat, e2e, browser,
# fuzz) just before pytest's own closing line; pytest's exit status is passed on unchanged,
# so a run that collected no test (status 5) fails.
.venv/bin/python -m pytest -p tests.suite_summary "$@"
rc=$?
set -e
[ "$rc" -ne 5 ] || echo "test: no test ran (pytest exit status 5)" >&2
exit $rc
