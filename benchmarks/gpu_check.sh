#!/usr/bin/env bash
# The GPU check: bash benchmarks/gpu_check.sh [--smoke] [--out DIR] [--budget_s S]
# Measures GFScreenTrainer's epoch time and memory against nnUNetTrainer, recompilations in the final
# validation, and the four predictors on one CT and a folder, in-process and as whole commands (benchmarks/gpu_check.py
# says how); writes
# DIR/gpu_check.json and prints a table. On a GPU machine without nnU-Net (docs/benchmarks.md): wheels carried in .whl/
# (benchmarks/gpu_wheels.sh downloads them) are installed into /tmp/site first where nnU-Net is missing.
# --smoke: CPU, tiny data.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import nnunetv2" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# the repository: nnunetv2_gfscreen and the lab beside it (gfscreen_lab: synthetic data, CPU plans; in no wheel)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import SimpleITK" 2> /dev/null; then
  echo "[gpu_check] SimpleITK is not installed: using benchmarks/simpleitk_stub (NIfTI goes through NibabelIO)"
  export PYTHONPATH="$PWD/benchmarks/simpleitk_stub:$PYTHONPATH"
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py "$@"
