#!/usr/bin/env bash
# The README's test command: sets up ./.venv if needed, then runs the whole test suite on the CPU.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$REPO_ROOT"
exec "$VENV/bin/python" -m pytest -q "$@" tests
