#!/usr/bin/env bash
# The one CIFAR-10 CPU protocol every suite reuses (issue 2, section 8).
#   data:   the shared JPEG training set (50,000 images), split once with split seed 0 into
#           40,000 train / 5,000 validation / 5,000 test (stratified; stochvit.data.load_data defaults)
#   model:  vit_tiny_patch4_32 (width 192, 6 blocks, 3 heads, patch 4, GELU), 2.7 M parameters
#   recipe: AdamW lr 1e-3, wd 0.05, batch 128, 2 warmup epochs then cosine, clip 1.0, crop+flip,
#           10 epochs, precision auto (bf16 autocast on this CPU), seed 0; final eval K=10 passes
# Each run directory is trained once, kept under benchmarks/runs/cifar10/<name>, and reused by the
# calibration, robustness, privacy and transfer suites. Usage: bash benchmarks/cifar10_protocol.sh NAME [extra train flags]
set -euo pipefail
cd "$(dirname "$0")/.."
name=$1; shift
DATA=${CIFAR10_JPEG:-../shared/data/cifar10-jpeg}
stochvit train --data "imagefolder:$DATA" --model vit_tiny_patch4_32 --epochs 10 --batch-size 128 --lr 1e-3 \
  --seed 0 --split-seed 0 --out "benchmarks/runs/cifar10/$name" "$@"
