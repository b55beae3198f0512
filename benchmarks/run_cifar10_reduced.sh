#!/usr/bin/env bash
# Session-budget variant of the protocol: same split, model and recipe, but 10,000 of the 40,000
# training images (stratified, split seed 0) and 10 epochs, for both methods alike.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in deterministic stochastic; do
  flags=$([ "$name" = deterministic ] && echo --no-stochastic || true)
  { time bash benchmarks/cifar10_protocol.sh "$name-10k" --train-limit 10000 $flags ; } > "benchmarks/logs/cifar10-$name-10k.log" 2>&1
done
