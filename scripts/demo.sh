#!/usr/bin/env bash
# The README's first command: GF-Screen end to end on synthetic CT, on the CPU.
# Creates ./.venv on first use (scripts/setup_env.sh), then runs the lab's demo (python -m gfscreen_lab.experiments.demo,
# from the repository: the lab is not installed): generate synthetic test cases, predict them dense and gated with the
# model shipped in gfscreen_lab/demo_model/, evaluate both, draw a picture per case and print one comparison table
# (also written to demo_output/results.md and .json). A few minutes on 2 CPU cores once the venv exists. With --train
# it plans, preprocesses and trains the model from scratch first (about 45 minutes; a re-run skips the finished
# dataset, preprocessing and training).
# Quick smoke version (a few minutes, tiny dataset, GFScreenTrainer_Tiny): GFSCREEN_DEMO_QUICK=1 bash scripts/demo.sh
# Extra arguments go to the demo (see: bash scripts/demo.sh -h).
source "$(dirname "$0")/setup_env.sh"
cd "$REPO_ROOT"
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" -m gfscreen_lab.experiments.demo "$@"
