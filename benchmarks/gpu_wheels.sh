#!/usr/bin/env bash
# Downloads into .whl/ (git-ignored) exactly the wheels the GPU check needs on a bare GPU machine that has
# Python, torch, timm, scipy, scikit-image, pandas, matplotlib, ... but no nnU-Net and no package registry. benchmarks/gpu_check.sh installs them from .whl/ into /tmp/site when they are there.
# Not carried: SimpleITK (a 52 MB wheel; benchmarks/simpleitk_stub stands in, data goes through NibabelIO),
# imagecodecs, yacs, graphviz, future, unittest2, pydantic (required by nnU-Net's or blosc2's metadata, but
# not imported on the check's code paths: the smoke test runs with all of them blocked).
# Usage: bash benchmarks/gpu_wheels.sh   (needs pip and network access here; prints the total size)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
DEST=.whl
MAX_MIB=48   # the working tree that travels is limited to 64 MiB in all; the repository takes about 10
mkdir -p "$DEST"
rm -f "$DEST"/*.whl   # one version of each package, or the install on the machine stops
TARGET=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64)
BINARY=(nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6
        blosc2==4.14.1 ndindex==1.10.1 numexpr==2.14.2 connected-components-3d==4.1.1 nibabel==5.4.2)
SDIST_ONLY=(acvl-utils==0.2.6)   # pure Python, published as a source archive only: built into a wheel here
for pkg in "${BINARY[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "$pkg"
done
for pkg in "${SDIST_ONLY[@]}"; do
  "$PY" -m pip wheel -q --no-deps -w "$DEST" "$pkg"
done
ls -l "$DEST"/*.whl
total_kib=$(du -sk "$DEST" | cut -f1)
echo "[gpu_wheels] $(ls "$DEST"/*.whl | wc -l) wheels, $((total_kib / 1024)) MiB in $DEST"
if [ "$total_kib" -gt $((MAX_MIB * 1024)) ]; then
  echo "[gpu_wheels] more than $MAX_MIB MiB: the working tree would not travel" >&2
  exit 1
fi
