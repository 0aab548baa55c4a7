#!/usr/bin/env bash
# FLARE pan-cancer submission entry point: <case>_0000.nii.gz in, binary <case>.nii.gz out.
#   bash predict.sh [INPUT_DIR [OUTPUT_DIR]]    (defaults: /workspace/inputs /workspace/outputs)
# The model is an nnU-Net results folder (nnUNet_results, default /workspace/nnUNet_results) holding one
# trained GF-Screen model. Settings through the environment: GFSCREEN_DATASET (default: the only dataset
# in nnUNet_results), GFSCREEN_CONFIGURATION (3d_fullres), GFSCREEN_TRAINER (GFScreenTrainer),
# GFSCREEN_PLANS (nnUNetPlans), GFSCREEN_FOLDS ("0"), GFSCREEN_DEVICE (cuda), GFSCREEN_EXTRA_ARGS.
# Only finished masks are moved into the output folder; nnU-Net's side files and reports stay behind.
# FLARE runs "sh predict.sh": re-run under bash (this line is POSIX sh)
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail
INPUT_DIR="${1:-/workspace/inputs}"
OUTPUT_DIR="${2:-/workspace/outputs}"
export nnUNet_results="${nnUNet_results:-/workspace/nnUNet_results}"
export nnUNet_raw="${nnUNet_raw:-/tmp/nnUNet_raw}"
export nnUNet_preprocessed="${nnUNet_preprocessed:-/tmp/nnUNet_preprocessed}"

if [ ! -d "$INPUT_DIR" ] || [ -z "$(ls "$INPUT_DIR"/*_0000.nii.gz 2>/dev/null)" ]; then
  echo "predict.sh: no <case>_0000.nii.gz files in $INPUT_DIR" >&2
  exit 2
fi
if [ -z "${GFSCREEN_DATASET:-}" ]; then
  datasets=("$nnUNet_results"/Dataset*)
  if [ "${#datasets[@]}" -ne 1 ] || [ ! -d "${datasets[0]}" ]; then
    echo "predict.sh: set GFSCREEN_DATASET; found ${#datasets[@]} candidates in $nnUNet_results" >&2
    exit 2
  fi
  GFSCREEN_DATASET="$(basename "${datasets[0]}")"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# shellcheck disable=SC2086
nnUNetv2_predict_gfscreen -i "$INPUT_DIR" -o "$work" -d "$GFSCREEN_DATASET" \
  -c "${GFSCREEN_CONFIGURATION:-3d_fullres}" -tr "${GFSCREEN_TRAINER:-GFScreenTrainer}" \
  -p "${GFSCREEN_PLANS:-nnUNetPlans}" -f ${GFSCREEN_FOLDS:-0} -device "${GFSCREEN_DEVICE:-cuda}" \
  --disable_progress_bar ${GFSCREEN_EXTRA_ARGS:-}
mkdir -p "$OUTPUT_DIR"
for f in "$work"/*.nii.gz; do
  mv "$f" "$OUTPUT_DIR/"
done
echo "predict.sh: wrote $(ls "$OUTPUT_DIR"/*.nii.gz | wc -l) masks to $OUTPUT_DIR"
