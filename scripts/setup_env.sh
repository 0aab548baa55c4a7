# Sourced by scripts/test.sh and scripts/demo.sh: creates ./.venv once and installs the project into it.
# torch 2.14.1 + torchvision 0.29.1 come first (see docs/nnunet_internals.md, section 1: with torch 2.13 torchvision
# does not import and nnU-Net's trainer lookup crashes); then the package, editable, with its test extra.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GFSCREEN_VENV:-$REPO_ROOT/.venv}"
PYTHON_BIN="${PYTHON_BIN:-$(command -v python3.11 || command -v python3)}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PYTHON_BIN"
  "$PYTHON_BIN" -m venv "$VENV"
fi
stamp="$VENV/.gfscreen-installed"
if [ ! -f "$stamp" ] || [ "$REPO_ROOT/setup.cfg" -nt "$stamp" ] || [ "$REPO_ROOT/setup.py" -nt "$stamp" ]; then
  echo "[setup] installing torch, nnU-Net and nnunetv2-gfscreen into $VENV (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q -e "$REPO_ROOT[test]"
  touch "$stamp"
fi
export VENV
# OpenMP threads that busy-wait slow torch down several-fold on small shared machines (measured here)
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
export PATH="$VENV/bin:$PATH"
