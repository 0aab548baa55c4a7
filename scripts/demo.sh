#!/usr/bin/env bash
# The README's first command: GF-Screen end to end on synthetic CT, on the CPU.
# Creates ./.venv on first use (scripts/setup_env.sh), then runs nnUNetv2_gfscreen_demo: generate synthetic
# test cases, predict them dense and gated with the model shipped in nnunetv2_gfscreen/experiments/demo_model/, evaluate
# both, draw a picture per case and print one comparison table (also written to demo_output/results.md and
# .json). A few minutes on 2 CPU cores once the venv exists. With --train it plans, preprocesses and trains
# the model from scratch first (about 45 minutes; a re-run skips the finished dataset, preprocessing and training).
# Quick smoke version (a few minutes, tiny dataset, GFScreenTrainer_Tiny): GFSCREEN_DEMO_QUICK=1 bash scripts/demo.sh
# Extra arguments go to the demo (see: bash scripts/demo.sh -h).
source "$(dirname "$0")/setup_env.sh"
cd "$REPO_ROOT"
exec "$VENV/bin/python" -c "import sys; sys.argv[0] = 'nnUNetv2_gfscreen_demo'; \
from nnunetv2_gfscreen.experiments.demo import demo_entry_point; demo_entry_point()" "$@"
