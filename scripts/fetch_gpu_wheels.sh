#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels the lent GPU machine lacks; the device tool carries
# .whl with the working tree (carry: [".whl"]) and scripts/gpu_check.sh installs them there.
#
# The H200 image (see the device tool's KINDS.md) has Python 3.12, torch 2.11 (CUDA 13), triton 3.6,
# transformers 5.17, accelerate 1.15, huggingface_hub 1.33, tokenizers 0.23.2, safetensors 0.8, pytest,
# pytest-xdist and hypothesis, and no internet. It lacks:
#   transformers 5.24.0   our quantizer needs >= 5.23 (pyproject's "hf" extra); the version CI tests with
#   bitsandbytes 0.50.2   the comparison (its wheel holds libbitsandbytes_cuda130.so for CUDA 13)
#   regex                 transformers checks regex >= 2025.10.22 at import; the image's version is not recorded
# Their other requirements are in the image. The working tree and the carried folders together may
# hold 64 MiB; this script prints the sizes and fails if they would not fit.
#
#   bash scripts/fetch_gpu_wheels.sh        (PYTHON=... to pick the pip; it downloads for Python 3.12 either way)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=(transformers==5.24.0 bitsandbytes==0.50.2 regex==2026.11.19)
CARRY_LIMIT_BYTES=$((64 * 1024 * 1024))
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"

echo "wheels for the GPU machine (.whl/):"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
for wheel in .whl/*.whl; do
    echo "  $(basename "$wheel")  $(mib "$(stat -c %s "$wheel")") MiB"
done
wheels=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -n 1 | cut -f1)
total=$((wheels + tree))
echo "wheels $(mib "$wheels") MiB + working tree $(mib "$tree") MiB = $(mib "$total") MiB of the 64 MiB the device tool carries"
if [ "$total" -gt "$CARRY_LIMIT_BYTES" ]; then
    echo "too large for one call of the device tool: carry fewer wheels" >&2
    exit 1
fi
