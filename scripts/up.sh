#!/usr/bin/env bash
# One command to run the SPE on a fresh machine: set up, then `spe up` on embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/spe up "$@"
