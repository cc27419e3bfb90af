#!/usr/bin/env bash
# Regenerate the hashed locks that set-up installs with `pip install --require-hashes`:
#
#   requirements/dev.txt      the project's dependencies with the dev extra (pyproject.toml)
#                             plus the installer and build back-end (requirements/build.in),
#                             resolved for the Python of the project's .venv;
#   requirements/runtime.txt  the workspace runtime (workspaces.runtime.PACKAGES, written to
#                             requirements/runtime.in) plus requirements/build.in, resolved for
#                             the system Python (/usr/bin/python3) that builds the runtime.
#
#   scripts/lock.sh              keep every pin of the existing locks, add what is new
#   scripts/lock.sh --upgrade    move every package to its newest version
#   scripts/lock.sh --upgrade-package NAME [...]   move only NAME (repeatable)
#
# The resolver (uv) is itself installed from a hashed lock (requirements/lock-tools.txt) into
# var/lock-tools. Review the diff of the locks like code: every changed hash is new code.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=var/lock-tools
if [ ! -x "$TOOLS/bin/uv" ]; then
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --require-hashes --only-binary=:all: \
    -r requirements/lock-tools.txt
fi
UV=$TOOLS/bin/uv
[ -x .venv/bin/python ] || { echo "lock: run scripts/setup.sh first (needs .venv)" >&2; exit 1; }

.venv/bin/python - <<'PY' > requirements/runtime.in
from workspaces.runtime import PACKAGES

print("# Written by scripts/lock.sh from workspaces.runtime.PACKAGES: edit those, not this file.")
print("\n".join(PACKAGES))
PY

common=(--generate-hashes --quiet --custom-compile-command "scripts/lock.sh" "$@")
"$UV" pip compile pyproject.toml requirements/build.in --extra dev --python .venv/bin/python \
  -o requirements/dev.txt "${common[@]}"
"$UV" pip compile requirements/runtime.in requirements/build.in --python /usr/bin/python3 \
  -o requirements/runtime.txt "${common[@]}"
echo "lock: wrote requirements/dev.txt and requirements/runtime.txt"
